"""The checkpoint format: its file names, its manifest, how a checkpoint is found, and safe reads and writes.

A checkpoint is the directory `<run>/checkpoints/step_XXXXXXXX/`. It counts as
complete only once every rank has written and hashed its own files and rank 0
has written `COMPLETE`, a manifest assembled from what every rank reports
(each file's size and SHA-256); `latest` is then replaced atomically. A crash
mid-save therefore leaves the previous checkpoint as the newest complete one.
Every load checks the files it reads against the manifest (size and SHA-256),
so a damaged checkpoint is refused, never trained on or evaluated. Loading never unpickles code: DeepSpeed's files are read with
`weights_only=True` and an allow-list of the plain data classes they contain.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from safetensors.torch import load as _load_safetensors, save_file

from lcl_megatron.errors import UserError
from lcl_megatron.utils import atomic_write, atomic_write_text

CHECKPOINTS_DIR = "checkpoints"  # under the run directory
COMPLETE = "COMPLETE"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
_MODEL_PART = re.compile(r"^model\.stage(\d{3})\.safetensors$")  # a pipeline stage's share of MODEL_FILE
CONFIG_FILE = "config.yaml"
# The layout-free training state (checkpoint/training_state.py):
OPTIMIZER_TENSORS = "optimizer.safetensors"  # fp32/NAME, exp_avg/NAME, exp_avg_sq/NAME
OPTIMIZER_STATE = "optimizer.json"  # Adam's step, the LR scheduler, the engine's counters
LOADER_STATES = "loader_dp*.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError):
    """A checkpoint that is missing, unfinished or damaged."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_step_directory(path: Path) -> bool:
    return _STEP_DIR.match(Path(path).name) is not None


def model_part_file(stage: int) -> str:
    return f"model.stage{stage:03d}.safetensors"


def is_model_part(name: str) -> bool:
    return _MODEL_PART.match(name) is not None


def loader_file(dp_rank: int) -> str:
    """The data position of one data-parallel rank."""
    return f"loader_dp{dp_rank:05d}.json"


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
    """The one way a torch file is read: tensors, plain containers and the plain data classes
    DeepSpeed writes; anything else is refused (CheckpointError), never run."""
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:  # torch's own text would advise weights_only=False: running the file's code
            raise CheckpointError(f"'{path}' holds objects other than tensors and plain data; refused, since "
                                  "loading them could run code") from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch engine with atomic saves and weights-only loads; every file it
    writes is hashed on this rank and recorded in `written` (path -> manifest entry), so
    that the manifest needs no rank to read another's files.

    With `deferred` set to a list, `save` writes nothing: it appends (path, a writer of a
    host copy of the state, the copy's bytes) for a background writer (checkpoint/manager.py),
    so training goes on while the files are written; a state whose copy would take more than
    its rank's share (LOCAL_WORLD_SIZE) of half the free host memory is written at once instead."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.written: dict[str, dict] = {}
        self.deferred: list | None = None

    def save(self, state_dict, path: str):
        size = tensor_bytes(state_dict)
        # The copy must leave room for the rest of the job (the loader's workers, the next copies),
        # and every rank of the node copies its state at the same time.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if self.deferred is not None and size < host_memory_available() // (2 * local_ranks):
            state = host_copy(state_dict)
            self.deferred.append((path, lambda tmp: torch.save(state, tmp), size))
        else:
            self.written[str(path)] = write_hashed(path, lambda tmp: torch.save(state_dict, tmp))

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    """A file's manifest entry: its size and SHA-256."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def write_hashed(path, write) -> dict:
    """`atomic_write` that also returns the manifest entry of what was written (hashed from the
    temporary file before it is renamed, while its pages are still cached)."""
    entry = {}

    def write_and_hash(tmp: Path):
        write(tmp)
        entry.update(file_entry(tmp))
    atomic_write(path, write_and_hash)
    return entry


def host_copy(obj):
    """A copy of a state dict whose tensors live in host memory and share nothing with the
    live ones (which training goes on changing); other values are kept as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, host_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(host_copy(v) for v in obj)
    return obj


def host_memory_available() -> int:
    """Bytes of host memory the kernel can give without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def unlisted_files(ckpt_dir: Path, listed) -> list[str]:
    """Files in a checkpoint directory that no rank reported (DeepSpeed's recovery scripts)."""
    return sorted(str(p.relative_to(ckpt_dir)) for p in Path(ckpt_dir).rglob("*")
                  if p.is_file() and p.name != COMPLETE and not p.name.endswith(".tmp")
                  and str(p.relative_to(ckpt_dir)) not in listed)


def assemble_manifest(reports: list[dict], meta: dict) -> dict:
    """The manifest from every rank's report of the files it wrote (relative name -> entry).
    A file two ranks report with different contents means two writers raced: refused."""
    files = {}
    for rank, report in enumerate(reports):
        for name, entry in report.items():
            if name in files and files[name] != entry:
                raise CheckpointError(f"two ranks wrote '{name}' with different contents (rank {rank} is one)")
            files[name] = entry
    return {**meta, "files": dict(sorted(files.items()))}


def write_manifest(ckpt_dir: Path, meta: dict, files: dict | None = None) -> None:
    """`COMPLETE`, written last: `files` as the writers reported them, and every other file in the
    directory hashed here (all of them when `files` is None, as one-process writers do)."""
    ckpt_dir = Path(ckpt_dir)
    files = dict(files or {})
    files.update((name, file_entry(ckpt_dir / name)) for name in unlisted_files(ckpt_dir, files))
    atomic_write_text(ckpt_dir / COMPLETE, json.dumps({**meta, "files": dict(sorted(files.items()))}, indent=1))


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


def engine_files(manifest: dict) -> list[str]:
    """The DeepSpeed files (one set per rank, torch's format) a checkpoint's manifest lists."""
    return sorted(name for name in manifest["files"] if name.endswith(".pt"))


def read_step(ckpt_dir: Path) -> int:
    return int(read_manifest(ckpt_dir)["step"])


def is_complete(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if is_step_directory(p) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def newest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def step_directories(root: Path) -> list[Path]:
    """Every step directory under `root`, complete or not, oldest first."""
    if not Path(root).is_dir():
        return []
    return sorted((p for p in Path(root).iterdir() if is_step_directory(p)), key=lambda p: p.name)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The one way a checkpoint is found: given as itself, as a run directory or as its
    checkpoints/ directory (then its newest complete one), or as a `latest` file (then the
    checkpoint it names, or the newest complete one beside it when that one is not complete).
    A directory whose save never finished (no COMPLETE) is refused, never loaded."""
    path = Path(path)
    if is_complete(path):
        return path
    if (path / MODEL_FILE).exists() or any(path.glob("*model_states.pt")):
        raise CheckpointError(f"checkpoint '{path}' has no {COMPLETE} manifest: its save never finished")
    if path.name == LATEST and path.is_file():
        named = path.parent / path.read_text().strip()
        if is_step_directory(named) and is_complete(named):
            return named
        path = path.parent
    for root in (path / CHECKPOINTS_DIR, path):
        newest = newest_checkpoint(root)
        if newest is not None:
            return newest
    if not path.exists():
        raise CheckpointError(f"no checkpoint at '{path}': it does not exist")
    raise CheckpointError(f"no complete checkpoint found at '{path}'")


def open_checkpoint(path: str | os.PathLike) -> tuple[Path, dict]:
    """(checkpoint directory, its manifest), found by `resolve_checkpoint`; the files it lists
    are checked as they are read (`verify_checkpoint`)."""
    ckpt = resolve_checkpoint(path)
    return ckpt, read_manifest(ckpt)


def safetensors_writer(state_dict: dict):
    """A writer (for `write_hashed`) of these tensors as a safetensors file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    return lambda tmp: save_file(tensors, str(tmp))


def save_model_file(state_dict: dict, path: Path) -> dict:
    """A safetensors file written atomically; returns its manifest entry."""
    return write_hashed(path, safetensors_writer(state_dict))


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
