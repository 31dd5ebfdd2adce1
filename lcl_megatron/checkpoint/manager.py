"""Save, resume and prune the checkpoints of a training run (the one owner of `<run>/checkpoints/`).

Each save is collective: DeepSpeed's per-rank files, every data-parallel rank's
data position, the consolidated `model.safetensors`, the config, then the
`COMPLETE` manifest and `latest`. A resume takes the newest complete checkpoint
whose files all match their manifest, DeepSpeed's own or a layout-free one
written by `lcl convert reshard`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
import yaml

from lcl_megatron.checkpoint.consolidated import write_model_file
from lcl_megatron.checkpoint.format import (CONFIG_FILE, LATEST, OPTIMIZER_TENSORS, complete_checkpoints, is_complete,
                                            is_step_directory, loader_file, read_step, tag_for, verify_collectively,
                                            write_manifest)
from lcl_megatron.checkpoint.training_state import load_canonical_state
from lcl_megatron.config import Config, ConfigError, config_from_dict
from lcl_megatron.utils import atomic_write_text


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
        atomic_write_text(ckpt_dir / loader_file(dp_rank), json.dumps(loader_state))
    write_model_file(engine, ckpt_dir, vocab_size)
    if rank == 0:
        atomic_write_text(ckpt_dir / CONFIG_FILE, config_text)
    dist.barrier()
    if rank == 0:
        write_manifest(ckpt_dir, {"step": step, "world_size": dist.get_world_size()})
        atomic_write_text(Path(root) / LATEST, tag)
        prune(Path(root), keep, upto=tag)
    dist.barrier()
    return ckpt_dir


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
        if is_step_directory(path) and not is_complete(path) and path.name < newest:
            shutil.rmtree(path, ignore_errors=True)


def pick_resume_checkpoint(ckpt_root: Path, cfg: Config) -> Path | None:
    """Collective: the newest complete checkpoint whose files all match their manifest. One that
    does not is set aside with a warning and the run continues from the one before; none left
    that matches, or a model config that differs from the run's, is a ConfigError."""
    from lcl_megatron.parallel import is_main_process

    candidates = complete_checkpoints(ckpt_root)
    for candidate in reversed(candidates):
        problem = verify_collectively(candidate)
        if problem is None:
            saved = config_from_dict(yaml.safe_load((candidate / CONFIG_FILE).read_text())).to_dict()["model"]
            differ = sorted(_differences(saved, cfg.to_dict()["model"], "model."))
            if differ:
                raise ConfigError(f"--resume: the model config differs from that of {candidate}: "
                                  + ", ".join(differ) + "; resume with the run's model config")
            return candidate
        if is_main_process():
            # Renamed, not deleted: kept for the user to inspect, but never found, loaded or pruned again.
            aside = candidate.with_name(candidate.name + ".damaged")
            candidate.rename(aside)
            print(f"lcl train: warning: {problem}; moved it to {aside.name} and falling back to the previous "
                  "complete checkpoint", file=sys.stderr, flush=True)
    if candidates:
        raise ConfigError(f"--resume: no checkpoint in '{ckpt_root}' matches its manifest "
                          f"({', '.join(c.name for c in candidates)} are damaged); set run.dir to a fresh directory "
                          "to start over")
    return None


def _differences(saved: dict, given: dict, prefix: str):
    for key, value in saved.items():
        if isinstance(value, dict):
            yield from _differences(value, given.get(key, {}), f"{prefix}{key}.")
        elif given.get(key) != value:
            yield f"{prefix}{key}={given.get(key)!r} (checkpoint: {value!r})"


def load_checkpoint(engine, ckpt_dir: Path, dp_rank: int) -> tuple[int, dict]:
    """Restore engine state; returns (step, this DP rank's loader state, {} if it has none).

    A layout-free checkpoint (`lcl convert reshard`, with `optimizer.safetensors`)
    goes into an engine of any layout; a DeepSpeed one needs the layout it was written with.
    """
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / OPTIMIZER_TENSORS).is_file():
        load_canonical_state(engine, ckpt_dir)
    else:
        engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    step = read_step(ckpt_dir)
    state_file = ckpt_dir / loader_file(dp_rank)
    loader_state = json.loads(state_file.read_text()) if state_file.exists() else {}
    return step, loader_state
