"""Any training layout to any other, through a layout-free training state: `lcl convert reshard`.

    lcl convert reshard --checkpoint DIR --layout tp=N,pp=N,dp=N[,zero=0-3] --out DIR [--weights-only]
    lcl convert reshard --checkpoint DIR --layout consolidated --out DIR

The source is read from its files, one model-parallel rank at a time, in this
one process (convert/deepspeed_files.py): a checkpoint of any number of GPUs
converts on one machine, with memory for its canonical state. Every
parameter's full fp32 master and Adam moments (ZeRO 0-3, pipeline stages,
TP shards joined) are named as in the single-process model. That canonical
training state is written to OUT:

    model.safetensors      the source's consolidated weights (copied)
    optimizer.safetensors  fp32/NAME, exp_avg/NAME, exp_avg_sq/NAME, canonical names and shapes
    optimizer.json         Adam's step, the LR scheduler, the engine's step/sample counters
    loader_dpXXXXX.json    the data position of every target data-parallel rank
    config.yaml            the source's config with the target layout (global batch kept)
    COMPLETE               manifest

`lcl train --resume` on a run whose newest checkpoint is OUT loads it into an
engine of any layout with `load_canonical_state`. `consolidated` is
tp = pp = dp = 1; eval and the exports read it too.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import yaml

from lcl_megatron.config import Config, ConfigError, ParallelConfig, validate_config
from lcl_megatron.convert.deepspeed_files import STATES, UnreadableCheckpoint, read_training_state
from lcl_megatron.convert.native import CheckpointMismatch, check_tensors
from lcl_megatron.convert.output import add_output_flags, write_guarded
from lcl_megatron.layout import Layout
from lcl_megatron.training.checkpoint import CONFIG_FILE, MODEL_FILE, read_manifest, write_manifest

RESHARD = "lcl convert reshard"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"
MOMENTS = STATES[1:]


class ReshardError(ValueError):
    """A layout or checkpoint this command cannot convert: one line, exit code 2."""


def parse_layout(text: str) -> dict:
    """'consolidated' or 'tp=N,pp=N,dp=N[,zero=N]' -> {'tp', 'pp', 'dp', 'zero'}; zero None: keep the source's.
    The sizes are checked by the layout's own rules; the model's, by the target config."""
    if text == "consolidated":
        return {"tp": 1, "pp": 1, "dp": 1, "zero": 0}
    expected = "expected 'consolidated' or tp=N,pp=N,dp=N[,zero=0-3]"
    layout = {"tp": 1, "pp": 1, "dp": 1, "zero": None}
    for part in text.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or key not in layout or not value.isdigit():
            raise ReshardError(f"--layout '{text}': {expected}")
        layout[key] = int(value)
    zero = 0 if layout["zero"] is None else layout["zero"]
    try:
        Layout(ParallelConfig(tp=layout["tp"], pp=layout["pp"], zero_stage=zero),
               world=layout["tp"] * layout["pp"] * layout["dp"])
    except ConfigError as e:
        raise ReshardError(f"--layout '{text}': {e}; {expected}") from None
    return layout


# ---------------------------------------------------------------- one parameter: local TP shard <-> canonical


def _tp():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())


def _local_shape(param) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 empties param.shape and keeps it here


def _shard_tp(name: str, full: torch.Tensor, param) -> torch.Tensor:
    from lcl_megatron.model.sharding import shard_tensor

    _, tp, rank = _tp()
    # shard_tensor reads the local shape from .shape, which ZeRO-3 empties: hand it the real one.
    view = SimpleNamespace(shape=_local_shape(param), partition_dim=getattr(param, "partition_dim", 0),
                           tensor_model_parallel=getattr(param, "tensor_model_parallel", False),
                           glu_fc1=getattr(param, "glu_fc1", False))
    return shard_tensor(name, full, view, tp, rank)


def canonical_names(engine) -> dict:
    """Local parameter name -> single-process name (pipeline stages rename theirs)."""
    from lcl_megatron.training.engine import is_pipeline

    names = [name for name, _ in engine.module.named_parameters()]
    if not is_pipeline(engine):
        return {n: n for n in names}
    from lcl_megatron.model.pipeline import canonical_name

    layers = {int(name): module for name, module in engine.module.named_children() if name.isdigit()}
    return {n: canonical_name(n, layers) for n in names}


# ---------------------------------------------------------------- DeepSpeed's optimizer state, per parameter


def _partitioned(param) -> bool:
    """DeepSpeed holds this parameter's master and moments in partitions (ZeRO 1-3, bf16 optimizer)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _base_optimizer(engine):
    """torch's AdamW: ZeRO and DeepSpeed's bf16 optimizer wrap it, plain fp32 training hands it over as is."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _flat_masters(wrapper) -> list | None:
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(wrapper, attr):  # ZeRO-3, ZeRO-1/2, bf16 optimizer
            return getattr(wrapper, attr)
    return None  # per-parameter masters and state: plain fp32, or bf16 without ZeRO


def _link_partitioned_state(engine) -> None:
    """DeepSpeed creates Adam's flat partitioned state at the first step and links each parameter's view
    of it there; create what is missing (zeros) and link the views now, so safe_get/set_full_* reach them."""
    wrapper, base = engine.optimizer, _base_optimizer(engine)
    flats = _flat_masters(wrapper)
    if flats is None:
        return
    for flat in flats:
        if flat not in base.state:
            base.state[flat] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in MOMENTS}}
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 and bf16; ZeRO-3 looks state up
        wrapper._hp_optimizer_states_linked = False  # relink to the tensors present now
        wrapper._lazy_init_hp_params_optimizer_state()


def _unpartitioned_masters(engine) -> dict:
    """id(parameter) -> its fp32 master where DeepSpeed keeps one per parameter (bf16 without ZeRO);
    a parameter missing here is its own master."""
    wrapper = engine.optimizer
    pairs = zip(getattr(wrapper, "fp16_groups", ()), getattr(wrapper, "fp32_groups", ()))
    return {id(low): high for lows, highs in pairs for low, high in zip(lows, highs)}


def _set_full_local(engine, masters: dict, param, key: str, value: torch.Tensor, step: int) -> None:
    """Put this TP rank's whole shard `value` of the master (key 'fp32') or a moment into DeepSpeed's partitions."""
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state,
                                 safe_set_local_fp32_param, safe_set_local_optimizer_state)

    if hasattr(param, "ds_id"):
        # ZeRO-3: piece r of the flat value, padded to equal pieces (DeepSpeed's full setter would
        # read past the end of the last piece when the size is not a multiple of the DP size).
        group = param.ds_process_group
        piece = param.ds_tensor.numel()
        flat = torch.nn.functional.pad(value.flatten(), (0, piece * dist.get_world_size(group) - value.numel()))
        local = flat.narrow(0, piece * dist.get_rank(group), piece).to(param.ds_tensor.device)
        safe_set_local_fp32_param(param, local) if key == "fp32" else safe_set_local_optimizer_state(param, local, key)
    elif _partitioned(param):
        value = value.to(param.device)
        safe_set_full_fp32_param(param, value) if key == "fp32" else safe_set_full_optimizer_state(param, value, key)
    else:
        master = masters.get(id(param), param)
        if key == "fp32":
            with torch.no_grad():
                master.copy_(value)
        else:
            state = _base_optimizer(engine).state.setdefault(master, {"step": torch.tensor(float(step))})
            state[key] = value.to(master.device, master.dtype).clone()


# ---------------------------------------------------------------- save and load


def _save_tensors(tensors: dict, path: Path) -> None:
    from lcl_megatron.training.checkpoint import save_model_file

    save_model_file(tensors, path)  # atomic


def load_canonical_state(engine, ckpt_dir: Path) -> dict:
    """Collective: load a canonical checkpoint (weights, fp32 masters, Adam moments, LR scheduler,
    counters) into a freshly built engine of any layout. Returns optimizer.json plus the checkpoint's
    `step` (from its manifest)."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    weights = load_file(str(ckpt_dir / MODEL_FILE))
    tensors = load_file(str(ckpt_dir / OPTIMIZER_TENSORS))
    meta = json.loads((ckpt_dir / OPTIMIZER_STATE).read_text())
    step = int(meta["adam_step"])
    names = canonical_names(engine)
    params = dict(engine.module.named_parameters())
    missing = sorted({f"{key}/{names[n]}" for n in params for key in STATES} - tensors.keys()
                     | {names[n] for n in params} - weights.keys())
    if missing:
        raise CheckpointMismatch(f"checkpoint '{ckpt_dir}' lacks {', '.join(missing[:8])}"
                                 + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    _load_weights(engine, {n: _shard_tp(n, weights[names[n]], p) for n, p in params.items()})
    _link_partitioned_state(engine)
    masters = _unpartitioned_masters(engine)
    for name, param in params.items():
        for key in STATES:
            value = _shard_tp(name, tensors[f"{key}/{names[name]}"], param)
            _set_full_local(engine, masters, param, key, value, step)
    for state in _base_optimizer(engine).state.values():
        state["step"] = torch.tensor(float(step))
    _load_schedule_and_counters(engine, meta)
    return {**meta, "step": int(read_manifest(ckpt_dir)["step"])}


def _load_weights(engine, local: dict) -> None:
    """The module's weights (ZeRO-3: gathered, written, partitioned again by DeepSpeed)."""
    import deepspeed

    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            value = local[name]
            if hasattr(param, "ds_id"):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.data.copy_(value.to(param.device, param.dtype))
            else:  # ZeRO-1/2 parameters are views into DeepSpeed's flat buffers: copy in place
                param.data.copy_(value.to(param.device, param.dtype))


def _load_schedule_and_counters(engine, meta: dict) -> None:
    if engine.lr_scheduler is not None and meta.get("lr_scheduler"):
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        # A scheduler's state leaves its optimizer's rates as they were: set them too.
        for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = int(meta.get("global_steps") or 0)
    engine.global_samples = int(meta.get("global_samples") or 0)
    engine.skipped_steps = int(meta.get("skipped_steps") or 0)


# ---------------------------------------------------------------- the command


def target_config(cfg: Config, layout: dict, source_dp: int) -> Config:
    """The source's config on the target layout, with the same global batch."""
    out = copy.deepcopy(cfg)
    p = out.parallel
    p.tp, p.pp = layout["tp"], layout["pp"]
    p.zero_stage = cfg.parallel.zero_stage if layout["zero"] is None else layout["zero"]
    p.sp = cfg.parallel.sp and p.tp > 1
    global_batch = cfg.train.micro_batch_size * source_dp
    if global_batch % layout["dp"]:
        raise ReshardError(f"the global batch of {global_batch} samples per micro-step does not split "
                           f"over dp={layout['dp']}")
    out.train.micro_batch_size = global_batch // layout["dp"]
    try:
        validate_config(out, check_data=False)
    except ConfigError as e:
        raise ReshardError(f"--layout: {e}") from None
    return out


def _write_loader_states(ckpt: Path, out: Path, cfg: Config, source_dp: int, target_dp: int) -> None:
    states = sorted(ckpt.glob("loader_dp*.json"))
    if cfg.data.split == "samples":  # every rank reads the same global batches: one position serves all
        if states:
            for rank in range(target_dp):
                shutil.copyfile(states[0], out / f"loader_dp{rank:05d}.json")
    elif target_dp == source_dp:
        for state in states:
            shutil.copyfile(state, out / state.name)
    else:
        print(f"lcl convert reshard: note: with data.split=shards the data position of {source_dp} ranks does "
              f"not carry over to {target_dp}; the new ranks start their shards from the beginning", file=sys.stderr)


def _has_deepspeed_state(manifest: dict) -> bool:
    return any(name.endswith(".pt") for name in manifest["files"])


def write_canonical_state(ckpt: Path, out: Path, cfg: Config, world_size: int) -> None:
    """OUT/optimizer.safetensors and OUT/optimizer.json from the DeepSpeed files of a source of `world_size` ranks."""
    from lcl_megatron.utils import atomic_write_text

    tensors, meta = read_training_state(ckpt, cfg, world_size)
    _save_tensors(tensors, out / OPTIMIZER_TENSORS)
    atomic_write_text(out / OPTIMIZER_STATE, json.dumps(meta, indent=1, default=float))


def reshard(src: Path, out: Path, layout: dict, weights_only: bool = False) -> Path:
    from lcl_megatron.convert.inspect import open_checkpoint
    from lcl_megatron.convert.writer import atomic_directory, read_checkpoint
    from lcl_megatron.model.build import expected_tensor_shapes

    ckpt, manifest = open_checkpoint(src)  # every listed file present, full size, SHA-256
    cfg, _ = read_checkpoint(ckpt)  # the config against the consolidated tensors
    world = int(manifest.get("world_size", 1))
    source_dp = world // (cfg.parallel.tp * cfg.parallel.pp)
    target = target_config(cfg, layout, source_dp)
    canonical = (ckpt / OPTIMIZER_TENSORS).is_file()
    if not weights_only and not canonical and not _has_deepspeed_state(manifest):
        raise ReshardError(f"checkpoint '{ckpt}' holds no optimizer state; --weights-only writes the weights alone")
    with atomic_directory(out, RESHARD) as tmp:
        if not weights_only:
            if canonical:
                for name in (OPTIMIZER_TENSORS, OPTIMIZER_STATE):
                    shutil.copyfile(ckpt / name, tmp / name)
            else:
                write_canonical_state(ckpt, tmp, cfg, world)
            from safetensors import safe_open

            with safe_open(str(tmp / OPTIMIZER_TENSORS), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            expected = expected_tensor_shapes(cfg.model)
            check_tensors({f"{key}/{n}": s for key in STATES for n, s in expected.items()}, shapes,
                          what=f"optimizer state of '{ckpt}'")
        shutil.copyfile(ckpt / MODEL_FILE, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(target.to_dict(), sort_keys=False))
        _write_loader_states(ckpt, tmp, cfg, source_dp, layout["dp"])
        source_layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": source_dp,
                         "zero": cfg.parallel.zero_stage}
        write_manifest(tmp, {"step": manifest.get("step", 0), "world_size": layout["tp"] * layout["pp"] * layout["dp"],
                             "resharded_from": str(ckpt), "source_layout": source_layout})
    return Path(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=RESHARD, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  lcl convert reshard --checkpoint runs/x --layout tp=1,pp=1,dp=2,zero=3 "
                                       "--out runs/x-dp2/checkpoints/step_00000300")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--layout", required=True, help="tp=N,pp=N,dp=N[,zero=0-3] or 'consolidated' (tp=pp=dp=1)")
    add_output_flags(p, "output checkpoint directory (written atomically)")
    p.add_argument("--weights-only", action="store_true", help="leave out the optimizer state")
    args = p.parse_args(argv)
    write = lambda: reshard(Path(args.checkpoint), Path(args.out), parse_layout(args.layout), args.weights_only)
    return 0 if write_guarded(RESHARD, args, write, errors=(ReshardError, UnreadableCheckpoint)) is not None else 2
