"""Per-run logging: `metrics.jsonl` (one JSON object per logged step), TensorBoard, a progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, progress: bool,
                 total_steps: int, start_step: int):
        self.enabled = enabled
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.bar = None
        if enabled and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            for reason, count in record.get("data_skipped", {}).items():
                self.tb.add_scalar(f"data/{reason}", count, record["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}",
                                 **record.get("data_skipped", {}))

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log_eval(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"eval/{key}", value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
