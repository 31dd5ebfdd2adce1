"""The consolidated checkpoint: the whole model under its single-process names, with its config.

A directory holding `config.yaml`, `model.safetensors` (every tensor under the
name and shape it has in the single-process model, whatever layout trained it)
and `COMPLETE`. Training writes one into every checkpoint beside DeepSpeed's
files; the convert commands write and read them; eval and `--init-from` load them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from lcl_megatron.checkpoint.format import (CONFIG_FILE, MODEL_FILE, CheckpointError, load_model_file,
                                            load_safetensors_bytes, resolve_checkpoint, save_model_file,
                                            verify_checkpoint, write_manifest)
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
    after checking every file its manifest lists (each read once, in parallel)."""
    ckpt = resolve_checkpoint(path)
    verified = verify_checkpoint(ckpt, keep=(MODEL_FILE, CONFIG_FILE))
    if MODEL_FILE not in verified:
        raise CheckpointError(f"checkpoint '{ckpt}' lists no {MODEL_FILE} in its manifest")
    try:
        cfg = config_from_dict(yaml.safe_load(verified.get(CONFIG_FILE) or (ckpt / CONFIG_FILE).read_bytes()))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"checkpoint '{ckpt}' has no readable {CONFIG_FILE}: {e}") from None
    try:
        tensors = load_safetensors_bytes(verified[MODEL_FILE])
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointMismatch(f"cannot read '{ckpt / MODEL_FILE}': {str(e).splitlines()[0]}") from None
    if check:
        from lcl_megatron.model.build import expected_tensor_shapes

        check_tensors(expected_tensor_shapes(cfg.model), tensors, what=f"checkpoint '{ckpt}'")
    return cfg, tensors


# ---------------------------------------------------------------- a training engine of any layout


def stage_canonical_tensors(engine, vocab_size: int) -> dict:
    """Collective over TP: this pipeline stage's (or the whole model's) tensors, unsharded,
    under their single-process names. Not for ZeRO-3, whose partitions DeepSpeed gathers."""
    from megatron.core import parallel_state

    from lcl_megatron.model.sharding import canonical_shapes, gather_canonical

    tensors = gather_canonical(engine.module, canonical_shapes(engine.module, vocab_size))
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensors
    from lcl_megatron.model.pipeline import canonical_name

    layers = {int(name): module for name, module in engine.module.named_children() if name.isdigit()}
    return {canonical_name(k, layers): v for k, v in tensors.items()}


def writes_stage(parallel_state) -> bool:
    """The one rank of each pipeline stage that holds its gathered tensors for the others
    (data-parallel and TP ranks hold the same ones)."""
    return parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0


def write_model_file(engine, ckpt_dir: Path, vocab_size: int) -> None:
    """Collective: `model.safetensors` with every tensor under its single-process name and shape.

    ZeRO-3 partitions are gathered by DeepSpeed, TP shards over the TP group;
    pipeline stages each write a part that rank 0 merges.
    """
    from megatron.core import parallel_state

    rank = dist.get_rank()
    if engine.zero_optimization_partition_weights():
        tensors = model_tensors(engine._zero3_consolidated_16bit_state_dict() or {})
        # the fp32 parameters' exact values, not the bf16 copies ZeRO-3 gathers (model/dims.py)
        tensors.update({name: getattr(p, FP32_MASTER_ATTRIBUTE).detach().cpu()
                        for name, p in engine.module.named_parameters() if hasattr(p, FP32_MASTER_ATTRIBUTE)})
        if rank == 0:
            save_model_file(tensors, ckpt_dir / MODEL_FILE)
        return
    tensors = stage_canonical_tensors(engine, vocab_size)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1:
        if rank == 0:
            save_model_file(tensors, ckpt_dir / MODEL_FILE)
        return
    stage = parallel_state.get_pipeline_model_parallel_rank()
    part = ckpt_dir / f"model.stage{stage:03d}.safetensors"
    if writes_stage(parallel_state):
        save_model_file(tensors, part)
    dist.barrier()
    if rank == 0:
        merged = {}
        for i in range(pp):
            stage_file = ckpt_dir / f"model.stage{i:03d}.safetensors"
            merged.update(load_model_file(stage_file))
            stage_file.unlink()
        save_model_file(merged, ckpt_dir / MODEL_FILE)


def whole_model_tensors(engine, vocab_size: int) -> dict:
    """Collective: every pipeline stage's tensors, under their single-process names, on every
    rank (host memory), for a plain model that every rank evaluates. Not for ZeRO-3."""
    from megatron.core import parallel_state

    tensors = stage_canonical_tensors(engine, vocab_size)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: v.cpu() for k, v in tensors.items()} if writes_stage(parallel_state) else {})
    return {k: v for part in parts for k, v in part.items()}
