"""Profiling a run: a `torch.profiler` trace of chosen steps, and a CUDA memory snapshot on out-of-memory.

`train.profile_steps=START:END` records steps START..END (1-based, inclusive)
into `RUN_DIR/profile/`: one `*.pt.trace.json` per rank, which Chrome's
trace viewer (chrome://tracing, Perfetto) and TensorBoard's profiler plugin
both open.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lcl_megatron.config import parse_profile_steps


class StepProfiler:
    """Wraps each step; records the chosen ones and writes their trace when the last has run."""

    def __init__(self, profile_steps: str, out_dir: Path, device_type: str):
        self.window = parse_profile_steps(profile_steps)
        self.out_dir, self.device_type = Path(out_dir), device_type
        self.profiler = None

    @contextlib.contextmanager
    def step(self, step: int):
        if self.window is None or not self.window[0] <= step <= self.window[1]:
            yield
            return
        if self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device_type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.profiler = torch.profiler.profile(
                activities=activities, record_shapes=True,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.out_dir)))
            self.profiler.__enter__()
        with torch.profiler.record_function(f"step {step}"):
            yield
        if step == self.window[1]:
            self.profiler.__exit__(None, None, None)
            self.profiler = None


def record_cuda_memory_history() -> None:
    """Keep allocation history on CUDA so that an out-of-memory error can leave a snapshot."""
    if torch.cuda.is_available():
        torch.cuda.memory._record_memory_history(max_entries=100_000)


def dump_cuda_memory_snapshot(path: Path) -> Path | None:
    """Write the allocation history (open it at https://pytorch.org/memory_viz); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))
    return path
