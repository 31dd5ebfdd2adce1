"""Checkpoints: DeepSpeed's sharded engine state plus a consolidated `model.safetensors`.

A checkpoint is the directory `<run>/checkpoints/step_XXXXXXXX/`. It counts as
complete only once every rank has written its shards and rank 0 has written
`COMPLETE` (a manifest with each file's size and SHA-256); `latest` is then
replaced atomically. A crash mid-save therefore leaves the previous checkpoint
as the newest complete one. Every load checks the files it reads against the
manifest (size and SHA-256), so a damaged checkpoint is refused, never trained
on or evaluated. Loading never unpickles code: DeepSpeed's files are read with
`weights_only=True` and an allow-list of the plain data classes they contain.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from safetensors.torch import load as _load_safetensors, save_file

from lcl_megatron.errors import UserError
from lcl_megatron.utils import atomic_write, atomic_write_text

COMPLETE = "COMPLETE"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError):
    """A checkpoint that is missing, unfinished or damaged."""


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
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:  # torch's own text would advise weights_only=False: running the file's code
            raise CheckpointError(f"'{path}' holds objects other than tensors and plain data; refused, since "
                                  "loading them could run code") from None


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
    """The COMPLETE manifest; CheckpointError when it is unreadable."""
    try:
        manifest = json.loads((Path(ckpt_dir) / COMPLETE).read_text())
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("it lists no files")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint '{ckpt_dir}' has an unreadable {COMPLETE} manifest: {e}") from None
    return manifest


def read_verified(ckpt_dir: Path, name: str, entry: dict, keep: bool = True) -> bytes | None:
    """Read one listed file once, checking its size and SHA-256 as it streams by;
    its bytes when `keep`. CheckpointError names the file that does not match."""
    path = Path(ckpt_dir) / name
    h, chunks, size = hashlib.sha256(), [], 0
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)  # hashlib releases the GIL on large blocks: threads hash in parallel
                size += len(block)
                if keep:
                    chunks.append(block)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{ckpt_dir}': file '{name}' listed in {COMPLETE} is missing") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint '{ckpt_dir}': cannot read '{name}': {e.strerror}") from None
    if size != entry["bytes"]:
        state = "truncated" if size < entry["bytes"] else "longer than recorded"
        raise CheckpointError(f"checkpoint '{ckpt_dir}': file '{name}' is {state} "
                              f"({size} bytes, {COMPLETE} says {entry['bytes']})")
    if h.hexdigest() != entry["sha256"]:
        raise CheckpointError(f"checkpoint '{ckpt_dir}': file '{name}' does not match its SHA-256 in {COMPLETE}")
    return b"".join(chunks) if keep else None


def verify_checkpoint(ckpt_dir: Path, names=None, keep=()) -> dict[str, bytes]:
    """Check the listed files (all, or `names`) in parallel; returns the bytes of those in `keep`
    so that a caller loads what was checked without reading it again."""
    listed = read_manifest(ckpt_dir)["files"]
    names = sorted(listed) if names is None else list(names)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        data = list(pool.map(lambda n: read_verified(ckpt_dir, n, listed[n], keep=n in keep), names))
    return {name: blob for name, blob in zip(names, data) if blob is not None}


def verify_collectively(ckpt_dir: Path) -> str | None:
    """Collective: every rank hashes its round-robin share of the checkpoint's files, so each
    file is read once across the job; returns the first problem any rank found (None: all match),
    the same on every rank."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problem = None
    try:
        names = sorted(read_manifest(ckpt_dir)["files"])
        verify_checkpoint(ckpt_dir, names[rank::world])
    except CheckpointError as e:
        problem = str(e)
    if world == 1:
        return problem
    problems = [None] * world
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


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


def step_directories(root: Path) -> list[Path]:
    """Every step directory under `root`, complete or not, oldest first."""
    if not Path(root).is_dir():
        return []
    return sorted((p for p in Path(root).iterdir() if _STEP_DIR.match(p.name)), key=lambda p: p.name)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The one way a checkpoint is found: given as itself, as a run directory or as its
    checkpoints/ directory (then its newest complete one). A directory whose save never
    finished (no COMPLETE) is refused, never loaded."""
    path = Path(path)
    if is_complete(path):
        return path
    if (path / MODEL_FILE).exists() or any(path.glob("*model_states.pt")):
        raise CheckpointError(f"checkpoint '{path}' has no {COMPLETE} manifest: its save never finished")
    for root in (path / "checkpoints", path):
        newest = newest_checkpoint(root)
        if newest is not None:
            return newest
    if not path.exists():
        raise CheckpointError(f"no checkpoint at '{path}': it does not exist")
    raise CheckpointError(f"no complete checkpoint found at '{path}'")


def prune(root: Path, keep: int, upto: str) -> None:
    """Delete all but the `keep` newest complete checkpoints up to the one just saved (`upto`), and
    incomplete ones older than them. Newer ones (a damaged checkpoint a resume passed over) stay."""
    complete = [p for p in complete_checkpoints(root) if p.name <= upto]
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


def load_safetensors_bytes(data: bytes) -> dict:
    """The tensors of a safetensors file's bytes, in name order as `load_file` gives them
    (safetensors' own `load` returns them in an order that changes from run to run)."""
    return dict(sorted(_load_safetensors(data).items()))


def load_model_file(path: Path) -> dict:
    """Tensors of a safetensors file; one listed in its checkpoint's manifest is checked
    against it in the same single read."""
    path = Path(path)
    listed = read_manifest(path.parent)["files"] if is_complete(path.parent) else {}
    if path.name in listed:
        data = read_verified(path.parent, path.name, listed[path.name])
    else:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot read '{path}': {e.strerror}") from None
    try:
        return load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"cannot read '{path}': {str(e).splitlines()[0]}") from None


def save_checkpoint(engine, root: Path, step: int, *, config_text: str, loader_state: dict | None,
                    dp_rank: int, keep: int, vocab_size: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    tag = tag_for(step)
    ckpt_dir = Path(root) / tag
    rank = dist.get_rank()
    if rank == 0 and ckpt_dir.exists():  # a leftover of an interrupted save of this step
        shutil.rmtree(ckpt_dir)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    if loader_state is not None:  # only the rank that reads the data of this data-parallel rank
        atomic_write_text(ckpt_dir / f"loader_dp{dp_rank:05d}.json", json.dumps(loader_state))
    write_consolidated(engine, ckpt_dir, vocab_size)
    if rank == 0:
        atomic_write_text(ckpt_dir / CONFIG_FILE, config_text)
    dist.barrier()
    if rank == 0:
        write_manifest(ckpt_dir, {"step": step, "world_size": dist.get_world_size()})
        atomic_write_text(Path(root) / LATEST, tag)
        prune(Path(root), keep, upto=tag)
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
