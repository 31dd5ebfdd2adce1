"""Reading and writing consolidated checkpoints (a directory: config.yaml, model.safetensors, COMPLETE)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from lcl_megatron.config import Config, ConfigError, config_from_dict
from lcl_megatron.convert.native import CheckpointMismatch, check_tensors
from lcl_megatron.convert.output import mark_directory
from lcl_megatron.training.checkpoint import (CONFIG_FILE, MODEL_FILE, CheckpointError, load_safetensors_bytes,
                                              resolve_checkpoint, save_model_file, verify_checkpoint, write_manifest)
from lcl_megatron.utils import follow_umask


@contextlib.contextmanager
def atomic_directory(out: Path, written_by: str):
    """Yield a temporary sibling directory to fill; on success it replaces `out` in one rename.

    A crash or an error leaves `out` as it was (an old `out` is only removed after the swap).
    `written_by` (the command) is recorded inside, so a later run knows the folder as its own
    (convert/output.py); callers check `out` with `check_output` first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    follow_umask(tmp)
    try:
        yield tmp
        mark_directory(tmp, written_by)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(out: Path, cfg: Config, tensors: dict, meta: dict, written_by: str) -> Path:
    """Write atomically: into a temporary sibling directory, then rename into place."""
    with atomic_directory(out, written_by) as tmp:
        save_model_file(tensors, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_manifest(tmp, {"step": 0, **meta})
    return Path(out)


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
