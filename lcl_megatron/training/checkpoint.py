"""Checkpoints: DeepSpeed's sharded engine state plus a consolidated `model.safetensors`.

A checkpoint is the directory `<run>/checkpoints/step_XXXXXXXX/`. It counts as
complete only once every rank has written its shards and rank 0 has written
`COMPLETE` (a manifest with each file's size and SHA-256); `latest` is then
replaced atomically. A crash mid-save therefore leaves the previous checkpoint
as the newest complete one. Loading never unpickles code: DeepSpeed's files are
read with `weights_only=True` and an allow-list of the plain data classes they
contain.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from safetensors.torch import load_file, save_file

from lcl_megatron.utils import atomic_write, atomic_write_text

COMPLETE = "COMPLETE"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _safe_globals():
    """Plain data classes DeepSpeed puts in its checkpoints (no code runs on load)."""
    import argparse
    import collections

    from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [argparse.Namespace, collections.OrderedDict, LossScaler, DynamicLossScaler, ZeroStageEnum,
            fragment_address]


def safe_torch_load(path, map_location="cpu"):
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch engine with atomic saves and weights-only loads."""

    def save(self, state_dict, path: str):
        atomic_write(path, lambda tmp: torch.save(state_dict, tmp))

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(ckpt_dir: Path, meta: dict) -> None:
    files = {}
    for path in sorted(ckpt_dir.rglob("*")):
        if path.is_file() and path.name != COMPLETE and not path.name.endswith(".tmp"):
            files[str(path.relative_to(ckpt_dir))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    atomic_write_text(ckpt_dir / COMPLETE, json.dumps({**meta, "files": files}, indent=1))


def read_manifest(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / COMPLETE).read_text())


def read_step(ckpt_dir: Path) -> int:
    return int(read_manifest(ckpt_dir)["step"])


def is_complete(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if _STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def newest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint given as itself, as a run directory or as its checkpoints/ directory."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        newest = newest_checkpoint(root)
        if newest is not None:
            return newest
    raise FileNotFoundError(f"no complete checkpoint found at '{path}'")


def prune(root: Path, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints, and incomplete ones older than them."""
    complete = complete_checkpoints(root)
    if not complete:
        return
    for path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    newest = complete[-1].name
    for path in Path(root).iterdir():
        if _STEP_DIR.match(path.name) and not is_complete(path) and path.name < newest:
            shutil.rmtree(path, ignore_errors=True)


def save_model_file(state_dict: dict, path: Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def load_model_file(path: Path) -> dict:
    return load_file(str(path))


def save_checkpoint(engine, root: Path, step: int, *, config_text: str, loader_state: dict,
                    dp_rank: int, keep: int, vocab_size: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    tag = tag_for(step)
    ckpt_dir = Path(root) / tag
    rank = dist.get_rank()
    if rank == 0 and ckpt_dir.exists():  # a leftover of an interrupted save of this step
        shutil.rmtree(ckpt_dir)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    atomic_write_text(ckpt_dir / f"loader_dp{dp_rank:05d}.json", json.dumps(loader_state))
    write_consolidated(engine, ckpt_dir, vocab_size)
    if rank == 0:
        atomic_write_text(ckpt_dir / CONFIG_FILE, config_text)
    dist.barrier()
    if rank == 0:
        write_manifest(ckpt_dir, {"step": step, "world_size": dist.get_world_size()})
        atomic_write_text(Path(root) / LATEST, tag)
        prune(Path(root), keep)
    dist.barrier()
    return ckpt_dir


def write_consolidated(engine, ckpt_dir: Path, vocab_size: int) -> None:
    """Collective: `model.safetensors` with every tensor under its single-process name and shape.

    ZeRO-3 partitions are gathered by DeepSpeed, TP shards over the TP group;
    pipeline stages each write a part that rank 0 merges.
    """
    from megatron.core import parallel_state

    rank = dist.get_rank()
    if engine.zero_optimization_partition_weights():
        from lcl_megatron.convert.native import model_tensors

        tensors = model_tensors(engine._zero3_consolidated_16bit_state_dict() or {})
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
    if parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0:
        save_model_file(tensors, part)
    dist.barrier()
    if rank == 0:
        merged = {}
        for i in range(pp):
            stage_file = ckpt_dir / f"model.stage{i:03d}.safetensors"
            merged.update(load_model_file(stage_file))
            stage_file.unlink()
        save_model_file(merged, ckpt_dir / MODEL_FILE)


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


def load_checkpoint(engine, ckpt_dir: Path, dp_rank: int) -> tuple[int, dict]:
    """Restore engine state; returns (step, this DP rank's loader state, {} if it has none).

    A layout-free checkpoint (`lcl convert reshard`, with `optimizer.safetensors`)
    goes into an engine of any layout; a DeepSpeed one needs the layout it was written with.
    """
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "optimizer.safetensors").is_file():
        from lcl_megatron.convert.reshard import load_canonical_state

        load_canonical_state(engine, ckpt_dir)
    else:
        engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    step = read_step(ckpt_dir)
    loader_file = ckpt_dir / f"loader_dp{dp_rank:05d}.json"
    loader_state = json.loads(loader_file.read_text()) if loader_file.exists() else {}
    return step, loader_state
