"""The layout-free training state: written from DeepSpeed's files, loaded into an engine of any layout.

Beside a consolidated checkpoint's `model.safetensors` it is

    optimizer.safetensors  fp32/NAME, exp_avg/NAME, exp_avg_sq/NAME: every parameter's full fp32 master
                           and Adam moments under its single-process name and shape
    optimizer.json         Adam's step, the LR scheduler, the engine's step/sample counters

`write_canonical_state` makes it from the files of a DeepSpeed checkpoint of any
layout (checkpoint/deepspeed_files.py); `load_canonical_state` puts it into a
freshly built engine of any layout (ZeRO 0-3, pipeline stages, TP shards), which
is how `lcl train --resume` continues a run that `lcl convert reshard` moved.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from lcl_megatron.checkpoint.consolidated import CheckpointMismatch, check_tensors
from lcl_megatron.checkpoint.deepspeed_files import STATES, read_training_state
from lcl_megatron.checkpoint.format import (MODEL_FILE, OPTIMIZER_STATE, OPTIMIZER_TENSORS, load_model_file,
                                            read_manifest, save_model_file)
from lcl_megatron.config import Config
from lcl_megatron.utils import atomic_write_text

MOMENTS = STATES[1:]


# ---------------------------------------------------------------- one parameter: local TP shard <-> canonical


def _local_shape(param) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 empties param.shape and keeps it here


def _shard_tp(name: str, full: torch.Tensor, param) -> torch.Tensor:
    from megatron.core import parallel_state

    from lcl_megatron.model.sharding import shard_tensor

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    # shard_tensor reads the local shape from .shape, which ZeRO-3 empties: hand it the real one.
    view = SimpleNamespace(shape=_local_shape(param), partition_dim=getattr(param, "partition_dim", 0),
                           tensor_model_parallel=getattr(param, "tensor_model_parallel", False),
                           glu_fc1=getattr(param, "glu_fc1", False))
    return shard_tensor(name, full, view, tp, rank)


def canonical_names(engine) -> dict:
    """Local parameter name -> single-process name (pipeline stages rename theirs)."""
    from megatron.core import parallel_state

    names = [name for name, _ in engine.module.named_parameters()]
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
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


def zero3_partition_of(param, value: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 piece of a whole-parameter `value`: piece r of the flat value, padded to
    equal pieces (DeepSpeed's full setter would read past the end of the last piece when the size
    is not a multiple of the data-parallel size)."""
    group = param.ds_process_group
    piece = param.ds_tensor.numel()
    flat = torch.nn.functional.pad(value.flatten(), (0, piece * dist.get_world_size(group) - value.numel()))
    return flat.narrow(0, piece * dist.get_rank(group), piece).to(param.ds_tensor.device)


def _set_full_local(engine, masters: dict, param, key: str, value: torch.Tensor, step: int) -> None:
    """Put this TP rank's whole shard `value` of the master (key 'fp32') or a moment into DeepSpeed's partitions."""
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state,
                                 safe_set_local_fp32_param, safe_set_local_optimizer_state)

    if hasattr(param, "ds_id"):
        local = zero3_partition_of(param, value)
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


def load_canonical_state(engine, ckpt_dir: Path) -> dict:
    """Collective: load a canonical checkpoint (weights, fp32 masters, Adam moments, LR scheduler,
    counters) into a freshly built engine of any layout. Returns optimizer.json plus the checkpoint's
    `step` (from its manifest)."""
    ckpt_dir = Path(ckpt_dir)
    weights = load_model_file(ckpt_dir / MODEL_FILE)  # each checked against the manifest as it is read
    tensors = load_model_file(ckpt_dir / OPTIMIZER_TENSORS)
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


def check_canonical_state(directory: Path, cfg: Config, what: str) -> None:
    """Every parameter's master and moments in `directory`'s optimizer.safetensors, under its
    single-process name and shape (read from the file's header alone); CheckpointMismatch otherwise."""
    from safetensors import safe_open

    from lcl_megatron.model.build import expected_tensor_shapes

    with safe_open(str(Path(directory) / OPTIMIZER_TENSORS), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = expected_tensor_shapes(cfg.model)
    check_tensors({f"{key}/{n}": s for key in STATES for n, s in expected.items()}, shapes, what=what)


def write_canonical_state(ckpt: Path, out: Path, cfg: Config, world_size: int) -> None:
    """OUT/optimizer.safetensors and OUT/optimizer.json from the DeepSpeed files of a source of `world_size` ranks."""
    tensors, meta = read_training_state(ckpt, cfg, world_size)
    save_model_file(tensors, out / OPTIMIZER_TENSORS)  # atomic
    atomic_write_text(out / OPTIMIZER_STATE, json.dumps(meta, indent=1, default=float))
