"""Per-run logging: `metrics.jsonl` (one JSON object per logged step), TensorBoard, Weights & Biases
(optional), a progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lcl_megatron.utils import atomic_write_text


class MetricsLogger:
    """Logs of one run directory. A run resumed at `start_step` continues them: rows and events of
    steps after it (written before an interruption, and about to be trained again) are dropped,
    so every step appears once."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, progress: bool,
                 total_steps: int, start_step: int, wandb=None):
        self.enabled, self.total_steps = enabled, total_steps
        self.wandb = wandb if enabled else None  # a WandbRun (training/wandb_run.py) or None
        path = Path(run_dir) / "metrics.jsonl"
        if enabled and path.exists():
            drop_rows_after(path, start_step)
        self.file = open(path, "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        self.bar = None
        # In a terminal a live bar; in a log file (Slurm, nohup) one line per logged step instead
        # of a carriage-return update per step.
        self.lines = enabled and progress and not sys.stderr.isatty()
        if enabled and progress and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def _write_row(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._write_row(record)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            for reason, count in record.get("data_skipped", {}).items():
                self.tb.add_scalar(f"data/{reason}", count, record["step"])
        if self.wandb is not None:
            self.wandb.log(record, record["step"], "train")
        skipped = record.get("data_skipped", {})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}", **skipped)
        if self.lines:
            extra = f", MFU {record['mfu']:.1%}" if "mfu" in record else ""
            if skipped:
                extra += ", skipped " + " ".join(f"{reason}={count}" for reason, count in skipped.items())
            print(f"step {record['step']}/{self.total_steps}: loss {record['loss']:.4f}, "
                  f"{record['samples_per_s']:.1f} samples/s{extra}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        """A line for the user that does not land inside the progress bar's line."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log_eval(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self._write_row({"step": step, **values})
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"eval/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(values, step, "eval")

    def log_checkpoint(self, step: int, values: dict) -> None:
        """A save's time, size and memory: a row of metrics.jsonl (without `loss`, like evaluations')."""
        if not self.enabled:
            return
        self._write_row({"step": step, **values})
        if self.tb is not None:
            for key in ("checkpoint_save_s", "checkpoint_blocking_s"):
                self.tb.add_scalar(f"checkpoint/{key[len('checkpoint_'):]}", values[key], step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of `metrics.jsonl` up to `step` (an unreadable last line, torn by a kill, goes too)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
