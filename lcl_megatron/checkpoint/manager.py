"""Save, resume and prune the checkpoints of a training run (the one owner of `<run>/checkpoints/`).

Each save is collective: DeepSpeed's per-rank files, every data-parallel rank's
data position, the consolidated model file when `checkpoint.consolidate` asks
for it, the config, then the `COMPLETE` manifest and `latest`. Every rank
writes and hashes its own files; rank 0 assembles the manifest from their
reports. The ranks wait for each other on a gloo group of the checkpoint's own
(`checkpoint.timeout_s`), never on the training group's timeout, which a long
save could exceed. With `checkpoint.async_save` the state is copied to host
memory and written by a background thread while training goes on; the next
save, and the end of the run, wait for it. A kill before the manifest leaves the
previous checkpoint the newest complete one. A resume takes the newest complete
checkpoint whose files all match their manifest, DeepSpeed's own or a
layout-free one written by `lcl convert reshard`.
"""

from __future__ import annotations

import datetime
import json
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist
import yaml

from lcl_megatron.checkpoint.consolidated import gather_model_file
from lcl_megatron.checkpoint.format import (CONFIG_FILE, LATEST, OPTIMIZER_TENSORS, CheckpointError, assemble_manifest,
                                            complete_checkpoints, is_complete, is_step_directory, loader_file,
                                            read_step, safetensors_writer, tag_for, tensor_bytes, verify_collectively,
                                            write_hashed, write_manifest)
from lcl_megatron.checkpoint.training_state import load_canonical_state
from lcl_megatron.config import CheckpointConfig, Config, ConfigError, config_from_dict
from lcl_megatron.utils import DiskFull, atomic_write_text

GiB = 1024 ** 3


def consolidates(schedule: str, save_index: int, final: bool) -> bool:
    """Whether the save numbered `save_index` (1, 2, ... in this run) writes the consolidated
    model file: `every` save, every N-th (`N`), or only the run's `end` (its last save)."""
    if schedule == "every":
        return True
    if schedule == "end":
        return final
    return final or save_index % int(schedule) == 0


def summarize_save(step: int, reports: list[dict], background: bool) -> dict:
    """The save's row for metrics.jsonl from every rank's report: wall time (slowest rank), rank 0's,
    bytes and files written, per-rank peak host memory."""
    return {"checkpoint_step": step,
            "checkpoint_save_s": round(max(r["seconds"] for r in reports), 3),
            "checkpoint_rank0_s": round(reports[0]["seconds"], 3),
            "checkpoint_rank_s": [round(r["seconds"], 3) for r in reports],
            "checkpoint_blocking_s": round(max(r["blocking_s"] for r in reports), 3),
            "checkpoint_bytes": sum(e["bytes"] for r in reports for e in r["files"].values()),
            "checkpoint_files": sum(len(r["files"]) for r in reports),
            "checkpoint_peak_host_bytes": [r["peak_host_bytes"] for r in reports],
            "checkpoint_snapshot_bytes": [r["snapshot_bytes"] for r in reports],
            "checkpoint_background": background}


def describe_save(row: dict) -> str:
    peaks, snaps = row["checkpoint_peak_host_bytes"], row["checkpoint_snapshot_bytes"]
    mode = (f"in the background, training blocked {row['checkpoint_blocking_s']:.1f} s"
            if row["checkpoint_background"] else "synchronously")
    return (f"lcl train: checkpoint step {row['checkpoint_step']}: {row['checkpoint_bytes'] / GiB:.2f} GiB in "
            f"{row['checkpoint_files']} files saved in {row['checkpoint_save_s']:.1f} s {mode} (rank 0 "
            f"{row['checkpoint_rank0_s']:.1f} s); peak host memory per rank {min(peaks) / GiB:.2f}-"
            f"{max(peaks) / GiB:.2f} GiB, of which the save's copy of the state {max(snaps) / GiB:.2f} GiB")


def _peak_host_bytes() -> int:
    """The process's peak resident memory so far (a save's copy of the state shows in it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class CheckpointSaver:
    """The saves of one training run: collective, every rank calls `save` at the same step."""

    def __init__(self, engine, root: Path, cfg: Config, config_text: str, dp_rank: int):
        self.engine, self.root, self.config_text, self.dp_rank = engine, Path(root), config_text, dp_rank
        self.settings: CheckpointConfig = cfg.checkpoint
        self.vocab_size = cfg.model.text.vocab_size
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # Collective, made once: waiting ranks wait here, with a save-sized timeout, never in the
        # training group, whose timeout (and NCCL's watchdog) is sized for a training step.
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.settings.timeout_s))
        self.saves = 0
        self.finished: list[dict] = []  # rank 0: rows of saves that completed, for metrics.jsonl
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, step: int, loader_state: dict | None, final: bool = False) -> Path:
        """Collective: start the checkpoint of `step`. Returns its directory (complete once
        `wait` returns, or at once when the save is synchronous)."""
        self.wait()
        start = time.perf_counter()
        self.saves += 1
        ckpt_dir = self.root / tag_for(step)
        if self.rank == 0 and ckpt_dir.exists():  # a leftover of an interrupted save of this step
            shutil.rmtree(ckpt_dir)
        dist.barrier(group=self.group)
        background = self.settings.async_save
        files = self.engine.checkpoint_engine
        files.written, files.deferred = {}, ([] if background else None)
        try:
            self.engine.save_checkpoint(str(self.root), tag=ckpt_dir.name, client_state={"step": step},
                                        save_latest=False)
            writes, written = files.deferred or [], dict(files.written)
        finally:
            files.deferred = None
        snapshot_bytes = sum(size for _, _, size in writes)
        if loader_state is not None:  # only the rank that reads the data of this data-parallel rank
            text = json.dumps(loader_state).encode()
            writes.append((ckpt_dir / loader_file(self.dp_rank), lambda tmp: tmp.write_bytes(text), 0))
        if consolidates(self.settings.consolidate, self.saves, final):
            model_file = gather_model_file(self.engine, self.vocab_size)
            if model_file is not None:
                name, tensors = model_file
                snapshot_bytes += tensor_bytes(tensors)
                writes.append((ckpt_dir / name, safetensors_writer(tensors), 0))
        if self.rank == 0:
            config = self.config_text.encode()
            writes.append((ckpt_dir / CONFIG_FILE, lambda tmp: tmp.write_bytes(config), 0))
        report = {"snapshot_bytes": snapshot_bytes, "blocking_s": time.perf_counter() - start}
        args = (ckpt_dir, step, writes, written, report, start, background)
        if background:
            self._writer = threading.Thread(target=self._finish, args=args, name="checkpoint-writer", daemon=True)
            self._writer.start()
        else:
            self._finish(*args)
            self._raise_error()
        return ckpt_dir

    def wait(self) -> None:
        """Collective: the save in progress complete (its manifest written), or its error raised."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        self._raise_error()

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _finish(self, ckpt_dir: Path, step: int, writes: list, written: dict, report: dict, start: float,
                background: bool) -> None:
        """Write this rank's files and hash them, report to rank 0, which writes the manifest (last),
        `latest`, and prunes; every rank learns the outcome. Errors are kept for `wait`."""
        problem = None
        try:
            for path, write, _ in writes:
                written[str(path)] = write_hashed(path, write)
        except Exception as e:  # reported, so that no rank waits for this one until the timeout
            problem = e
        report.update(files={str(Path(p).relative_to(ckpt_dir)): entry for p, entry in written.items()},
                      seconds=time.perf_counter() - start, peak_host_bytes=_peak_host_bytes(),
                      error=None if problem is None else (type(problem).__name__, str(problem)))
        try:
            reports = [None] * self.world if self.rank == 0 else None
            dist.gather_object(report, reports, dst=0, group=self.group)
            outcome = [None]
            if self.rank == 0:
                failed = next((r["error"] for r in reports if r["error"]), None)
                outcome = [failed]
                if failed is None:
                    try:
                        manifest = assemble_manifest([r["files"] for r in reports], {})
                        write_manifest(ckpt_dir, {"step": step, "world_size": self.world}, manifest["files"])
                        atomic_write_text(self.root / LATEST, ckpt_dir.name)
                        prune(self.root, self.settings.keep, upto=ckpt_dir.name)
                        row = summarize_save(step, reports, background)
                        self.finished.append(row)
                        print(describe_save(row), flush=True)
                    except Exception as e:  # told to every rank: none waits on a manifest never written
                        outcome = [(type(e).__name__, str(e))]
            dist.broadcast_object_list(outcome, src=0, group=self.group)
        except BaseException as e:  # a rank that died, a timeout: this save is not complete
            self._error = e
            return
        if outcome[0] is not None:
            kind, text = outcome[0]
            self._error = problem if problem is not None else (DiskFull(text) if kind == "DiskFull"
                                                               else CheckpointError(text))


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
