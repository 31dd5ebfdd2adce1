"""`lcl launch local`: train on this machine with N processes under torchrun.

    lcl launch local --config X --nproc N [--max-restarts R] [--dry-run] [key=value ...]

It is `torchrun --standalone` around `lcl train --resume`: a failed rank
restarts the group (up to R times) from the newest complete checkpoint, and
SIGTERM or SIGUSR1 makes every rank checkpoint and stop.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="lcl launch local", description="Train on this machine with N processes under torchrun (lcl train --resume, restarting failed ranks).", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  lcl launch local --config configs/demo.yaml --nproc 2 --dry-run train.steps=20")
    p.add_argument("--config", required=True, help="YAML config of the run")
    p.add_argument("--nproc", type=int, required=True, help="processes (GPUs) on this machine")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a failed rank")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p.parse_args(argv)


def command(args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
            f"--max-restarts={args.max_restarts}", "-m", "lcl_megatron.cli", "train", "--config", args.config,
            "--resume", *args.overrides]


def main(argv=None) -> int:
    from lcl_megatron.config import ConfigError, load_config
    from lcl_megatron.layout import Layout

    args = parse_args(argv)
    try:
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
        if args.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {args.max_restarts}")
        Layout.of(load_config(args.config, args.overrides), args.nproc)
    except ConfigError as e:
        print(f"lcl launch local: {e}", file=sys.stderr)
        return 2
    cmd = command(args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    # A fresh worker store for every restart: the shared one still holds the failed attempt's addresses.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # torchrun takes this process's place: signals reach it directly
