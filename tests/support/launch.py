"""Starting `lcl` the way users do: one process, or torchrun with N processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LCL = [sys.executable, "-m", "lcl_megatron.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_lcl(args: list[str], nproc: int = 1, timeout: float = 600, check: bool = True, env=None):
    """`lcl ARGS` (nproc == 1) or `torchrun --nproc-per-node N -m lcl_megatron.cli ARGS`."""
    # A process group made inside pytest must not leak its rendezvous into the children.
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                              "TRITON_INTERPRET")}  # kernel tests interpret Triton; training runs take the CPU path
    env = {**inherited, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if nproc == 1:
        cmd = LCL + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "lcl_megatron.cli"] + args
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def with_overrides(base: list[str], *extra: str) -> list[str]:
    """`base` key=value overrides with the keys that `extra` sets replaced by its values
    (`lcl` refuses a key given twice)."""
    given = {e.split("=", 1)[0] for e in extra if "=" in e}
    return [b for b in base if b.split("=", 1)[0] not in given] + list(extra)


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]
