"""`lcl profile`: where a config's training step spends its time, before a cluster run.

    lcl profile --config configs/demo.yaml [--steps 3] [--synthetic] [--out DIR] [key=value ...]

Runs a warm-up step, then records `--steps` steps of `lcl train`'s own step
with torch.profiler and prints the operators with the most time of their own
(CUDA time on a GPU, CPU time elsewhere). `--out DIR` also keeps the trace
(`*.pt.trace.json`, for chrome://tracing, Perfetto or TensorBoard).
"""

from __future__ import annotations

import argparse
import sys

import torch

from lcl_megatron.bench.train import prepare_steps, step_config
from lcl_megatron.config import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lcl profile", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  lcl profile --config configs/demo.yaml --steps 2")
    p.add_argument("--config", required=True, help="YAML config to profile")
    p.add_argument("--steps", type=int, default=3, help="profiled optimizer steps (default 3)")
    p.add_argument("--synthetic", action="store_true", help="random rows in the config's shape instead of its data")
    p.add_argument("--top", type=int, default=15, help="operators to list (default 15)")
    p.add_argument("--out", help="folder to keep the trace in")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    if args.steps < 1 or args.top < 1:
        raise ConfigError(f"--steps and --top must be >= 1, got {args.steps} and {args.top}")
    cfg = step_config(args.config, args.overrides, args.synthetic)

    _model, engine, step_fn, batches, device_type = prepare_steps(cfg, args.synthetic)
    step_fn(engine, batches, cfg, 1)  # warm-up: first-call allocations and compilation stay out of the table
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    handler = torch.profiler.tensorboard_trace_handler(args.out) if args.out else None
    with torch.profiler.profile(activities=activities, on_trace_ready=handler) as profiler:
        for step in range(args.steps):
            step_fn(engine, batches, cfg, step + 2)
    if torch.distributed.get_rank() == 0:
        sort = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort, row_limit=args.top))
        if args.out:
            print(f"trace written to {args.out}", file=sys.stderr)
    return 0
