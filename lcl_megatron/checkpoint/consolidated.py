"""The consolidated checkpoint: the whole model under its single-process names, with its config.

A directory holding `config.yaml`, `model.safetensors` (every tensor under the
name and shape it has in the single-process model, whatever layout trained it)
and `COMPLETE`. Training writes one beside DeepSpeed's files when
`checkpoint.consolidate` asks for it (under pipeline parallelism: one part per
stage, `model.stageNNN.safetensors`, each written by the rank that holds the
stage); the convert commands write and read them; eval and `--init-from` load
them. A training checkpoint without one is read from DeepSpeed's files instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from lcl_megatron.checkpoint.format import (CONFIG_FILE, MODEL_FILE, CheckpointError, engine_files, host_copy,
                                            is_model_part, load_safetensors_bytes, model_part_file, read_manifest,
                                            resolve_checkpoint, save_model_file, verify_checkpoint, write_manifest)
from lcl_megatron.config import Config, ConfigError, config_from_dict
from lcl_megatron.errors import UserError
from lcl_megatron.model.names import FP32_MASTER_ATTRIBUTE
from lcl_megatron.model.state import model_tensors


class CheckpointMismatch(UserError, ValueError):
    """Tensors that do not fit the model: one line listing them (CLI exit code 2)."""


def _summary(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tensors(expected: dict, given: dict, what: str = "checkpoint") -> None:
    """`expected` and `given` map names to tensors or shapes; raise CheckpointMismatch on any difference."""
    shape = lambda v: tuple(v.shape) if hasattr(v, "shape") else tuple(v)
    missing = expected.keys() - given.keys()
    unexpected = given.keys() - expected.keys()
    wrong = [f"{k} {shape(given[k])} != {shape(expected[k])}" for k in expected.keys() & given.keys()
             if shape(given[k]) != shape(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing {_summary(missing)}")
    if unexpected:
        problems.append(f"unexpected {_summary(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {_summary(wrong)}")
    if problems:
        raise CheckpointMismatch(f"{what} does not match the model: " + "; ".join(problems))


def load_model_state(model: torch.nn.Module, tensors: dict) -> None:
    """Single-process tensors into a single-process model, every name and shape checked first."""
    expected = model_tensors(model.state_dict())
    check_tensors(expected, tensors)
    model.load_state_dict(tensors, strict=False)


# ---------------------------------------------------------------- one process: read and write


def write_config(directory: Path, cfg: Config) -> None:
    (Path(directory) / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def write_checkpoint(directory: Path, cfg: Config, tensors: dict, meta: dict) -> Path:
    """A consolidated checkpoint in `directory` (a fresh one that the caller publishes
    atomically, e.g. with convert/output.py's `atomic_directory`)."""
    directory = Path(directory)
    save_model_file(tensors, directory / MODEL_FILE)
    write_config(directory, cfg)
    write_manifest(directory, {"step": 0, **meta})
    return directory


def read_checkpoint(path: Path, check: bool = True) -> tuple[Config, dict]:
    """(config, tensors) of a checkpoint directory or a run directory's newest checkpoint,
    after checking every file its manifest lists (each read once, in parallel). Without a
    consolidated model file the weights come from DeepSpeed's files (their fp32 masters)."""
    ckpt = resolve_checkpoint(path)
    listed = read_manifest(ckpt)["files"]
    parts = sorted(name for name in listed if is_model_part(name))
    verified = verify_checkpoint(ckpt, keep=(MODEL_FILE, CONFIG_FILE, *parts))
    try:
        cfg = config_from_dict(yaml.safe_load(verified.get(CONFIG_FILE) or (ckpt / CONFIG_FILE).read_bytes()))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"checkpoint '{ckpt}' has no readable {CONFIG_FILE}: {e}") from None
    tensors = {}
    try:
        for name in [MODEL_FILE] if MODEL_FILE in verified else parts:
            tensors.update(load_safetensors_bytes(verified[name]))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointMismatch(f"cannot read a model file of '{ckpt}': {str(e).splitlines()[0]}") from None
    if not tensors:
        if not engine_files(read_manifest(ckpt)):
            raise CheckpointError(f"checkpoint '{ckpt}' lists neither {MODEL_FILE} nor DeepSpeed's files")
        from lcl_megatron.checkpoint.deepspeed_files import read_training_state

        state, _ = read_training_state(ckpt, cfg, int(read_manifest(ckpt).get("world_size", 1)))
        tensors = {name[len("fp32/"):]: v for name, v in sorted(state.items()) if name.startswith("fp32/")}
    if check:
        from lcl_megatron.model.build import expected_tensor_shapes

        check_tensors(expected_tensor_shapes(cfg.model), tensors, what=f"checkpoint '{ckpt}'")
    return cfg, tensors


# ---------------------------------------------------------------- a training engine of any layout


def _gather_to_writer(engine, vocab_size: int) -> dict:
    """Collective over the TP groups of data-parallel rank 0 (the other replicas hold the same
    weights and take no part): this stage's tensors, unsharded, under their single-process names,
    in host memory on its TP rank 0 alone; {} elsewhere. Tensor by tensor, so no GPU holds more
    than one unsharded tensor."""
    from megatron.core import parallel_state

    from lcl_megatron.model.sharding import canonical_shapes, join_shards

    if parallel_state.get_data_parallel_rank() != 0:
        return {}
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    writer = writes_stage(parallel_state)
    dst = dist.get_global_rank(group, 0)
    shapes = canonical_shapes(engine.module, vocab_size)
    params = dict(engine.module.named_parameters())
    tensors = {}
    for name, local in model_tensors(engine.module.state_dict()).items():
        param, shape = params.get(name), shapes[name]
        if tp > 1 and param is not None and getattr(param, "tensor_model_parallel", False):
            pieces = [torch.empty_like(local) for _ in range(tp)] if writer else None
            dist.gather(local.contiguous(), pieces, dst=dst, group=group)
            if writer:
                tensors[name] = join_shards(name, [p.cpu() for p in pieces], param, shape)
        elif writer:
            tensors[name] = local[tuple(slice(0, n) for n in shape)].to("cpu", copy=True)
    return _canonical_stage_names(engine, tensors)


def _canonical_stage_names(engine, tensors: dict) -> dict:
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensors
    from lcl_megatron.model.pipeline import canonical_name

    layers = {int(name): module for name, module in engine.module.named_children() if name.isdigit()}
    return {canonical_name(k, layers): v for k, v in tensors.items()}


def stage_canonical_tensors(engine, vocab_size: int) -> dict:
    """Collective over TP: this pipeline stage's (or the whole model's) tensors, unsharded,
    under their single-process names. Not for ZeRO-3, whose partitions DeepSpeed gathers."""
    from lcl_megatron.model.sharding import canonical_shapes, gather_canonical

    return _canonical_stage_names(engine, gather_canonical(engine.module, canonical_shapes(engine.module, vocab_size)))


def writes_stage(parallel_state) -> bool:
    """The one rank of each pipeline stage that holds its gathered tensors for the others
    (data-parallel and TP ranks hold the same ones)."""
    return parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0


def gather_model_file(engine, vocab_size: int) -> tuple[str, dict] | None:
    """Collective: (file name, host tensors) of the consolidated model file this rank writes, None
    on ranks that write none. ZeRO-3 partitions are gathered by DeepSpeed onto rank 0; TP shards
    onto each stage's writer; under pipeline parallelism every stage's writer has its own part
    (`model.stageNNN.safetensors`), which readers join, so no rank holds another stage's weights."""
    from megatron.core import parallel_state

    if engine.zero_optimization_partition_weights():
        tensors = model_tensors(engine._zero3_consolidated_16bit_state_dict() or {})
        # the fp32 parameters' exact values, not the bf16 copies ZeRO-3 gathers (model/dims.py)
        tensors.update({name: getattr(p, FP32_MASTER_ATTRIBUTE).detach().cpu()
                        for name, p in engine.module.named_parameters() if hasattr(p, FP32_MASTER_ATTRIBUTE)})
        return (MODEL_FILE, host_copy(tensors)) if dist.get_rank() == 0 else None
    tensors = _gather_to_writer(engine, vocab_size)
    if not writes_stage(parallel_state):
        return None
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return MODEL_FILE, tensors
    return model_part_file(parallel_state.get_pipeline_model_parallel_rank()), tensors


def whole_model_tensors(engine, vocab_size: int) -> dict:
    """Collective: every pipeline stage's tensors, under their single-process names, on every
    rank (host memory), for a plain model that every rank evaluates. Not for ZeRO-3."""
    from megatron.core import parallel_state

    tensors = stage_canonical_tensors(engine, vocab_size)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: v.cpu() for k, v in tensors.items()} if writes_stage(parallel_state) else {})
    return {k: v for part in parts for k, v in part.items()}
