"""`lcl bench checkpoint`: seconds per rank to save the ZeRO-3 checkpoint of a model of `--params`
parameters with `--ranks` CPU processes, through the trainer's own saver (checkpoint/manager.py).

Each rank holds what DeepSpeed's ZeRO-3 gives it of a model trained in bf16 with Adam: its
1/ranks of the bf16 weights (its `zero_pp_rank_R_mp_rank_00_model_states.pt`) and of the fp32
master weights and both moments (`..._optim_states.pt`), 14 bytes per parameter in all. The
tensors are allocated and never filled (their pages read as zeros and take no memory, so a
1B-parameter state fits beside other jobs; the contents change neither the write nor
SHA-256's speed). Every rank
writes and hashes its own files, rank 0 assembles the manifest from their reports: rank 0's
time should match the others' (the goal: within 1.5x), since it no longer hashes their files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lcl_megatron.checkpoint.format import SafeCheckpointEngine, read_manifest, verify_checkpoint
from lcl_megatron.checkpoint.manager import CheckpointSaver
from lcl_megatron.config import Config
from lcl_megatron.data.bench import machine_name
from lcl_megatron.errors import UserError
from lcl_megatron.utils import atomic_write_text, write_markdown_section

GiB = 1024 ** 3


class ZeroThreeShard:
    """One rank's ZeRO-3 share of a model's training state, saved under DeepSpeed's file names with
    DeepSpeed's checkpoint-engine calls (what `engine.save_checkpoint` does for this rank)."""

    def __init__(self, params: int, rank: int, ranks: int):
        share = -(-params // ranks)
        self.rank = rank
        # Never written to: the pages stay unallocated (read as zeros), whatever the state's size.
        self.weights = torch.empty(share, dtype=torch.bfloat16)
        self.optimizer = {"fp32_flat_groups": [torch.empty(share)],
                          "state": {0: {"exp_avg": torch.empty(share), "exp_avg_sq": torch.empty(share)}}}
        self.checkpoint_engine = SafeCheckpointEngine()

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        ckpt = Path(root) / tag
        ckpt.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"module": {"flat": self.weights}, **client_state},
                                    str(ckpt / f"zero_pp_rank_{self.rank}_mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"optimizer_state_dict": self.optimizer},
                                    str(ckpt / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"))
        dist.barrier()  # DeepSpeed ends its save with one


def _rank(rank: int, ranks: int, port: int, params: int, root: str, saves: int, background: bool, out: str):
    os.environ.update(OMP_NUM_THREADS="1", LOCAL_WORLD_SIZE=str(ranks))  # as torchrun sets them
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    state = ZeroThreeShard(params, rank, ranks)
    cfg = Config()
    cfg.checkpoint.async_save, cfg.checkpoint.keep = background, 1
    saver = CheckpointSaver(state, Path(root), cfg, config_text="{}\n", dp_rank=rank)
    for step in range(1, saves + 1):
        saver.save(step, loader_state=None)
        saver.wait()
    rows = saver.finished
    dist.barrier()
    if rank == 0:
        atomic_write_text(Path(out), json.dumps(rows))
    dist.destroy_process_group()


def bench_checkpoint(params: int, ranks: int, saves: int, root: Path, background: bool) -> dict:
    from lcl_megatron.parallel import _free_port

    out = root / "rows.json"
    mp.spawn(_rank, args=(ranks, _free_port(), params, str(root / "checkpoints"), saves, background, str(out)),
             nprocs=ranks, join=True)
    rows = json.loads(out.read_text())
    newest = root / "checkpoints" / f"step_{saves:08d}"
    verify_checkpoint(newest)  # every file the manifest lists matches
    files = read_manifest(newest)["files"]
    return {"date": datetime.date.today().isoformat(),
            "machine": f"{machine_name()} (load average {os.getloadavg()[0]:.1f})",
            "params": params, "ranks": ranks, "background": background, "files": len(files),
            "bytes": sum(e["bytes"] for e in files.values()), "saves": rows}


def markdown(result: dict) -> str:
    rows = result["saves"]
    lines = [
        "## Checkpoint save", "",
        f"`lcl bench checkpoint`, {result['date']}, on {result['machine']}, torch {torch.__version__}. "
        f"{result['params'] / 1e9:.2f}B parameters, ZeRO-3 over {result['ranks']} CPU ranks (gloo): each rank "
        f"writes and hashes its bf16 weights and fp32 Adam state, 14 bytes per parameter "
        f"({result['bytes'] / GiB:.1f} GiB in {result['files']} files per checkpoint); "
        f"{'background' if result['background'] else 'synchronous'} saves, one after another. A rank's time "
        "runs from the start of the save to its own files written and hashed (in a synchronous save after "
        "DeepSpeed's closing barrier, so the ranks end together); rank 0 then assembles the manifest from "
        "the ranks' reports instead of hashing their files.", "",
        "| save | slowest rank s | rank 0 s | rank 0 / slowest other | peak host memory per rank GiB |",
        "|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, 1):
        lines.append(f"| {i} | {row['checkpoint_save_s']:.1f} | {row['checkpoint_rank0_s']:.1f} | "
                     f"{row['checkpoint_rank_s'][0] / max(row['checkpoint_rank_s'][1:]):.2f} | "
                     f"{min(row['checkpoint_peak_host_bytes']) / GiB:.2f}-"
                     f"{max(row['checkpoint_peak_host_bytes']) / GiB:.2f} |")
    worst = max(row["checkpoint_rank_s"][0] / max(row["checkpoint_rank_s"][1:]) for row in rows)
    lines += ["", f"- rank 0's save time / the slowest other rank's, worst save: {worst:.2f}x "
                  f"({'within' if worst <= 1.5 else 'NOT within'} the 1.5x goal)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lcl bench checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  lcl bench checkpoint --params 1e9 --ranks 4 --write BENCHMARKS.md")
    p.add_argument("--params", type=float, default=1e9, help="model parameters (default 1e9)")
    p.add_argument("--ranks", type=int, default=4, help="CPU processes (default 4)")
    p.add_argument("--saves", type=int, default=2, help="saves timed, one after another (default 2)")
    p.add_argument("--background", action="store_true", help="background saves (checkpoint.async_save)")
    p.add_argument("--dir", help="scratch directory (default: a temporary one, deleted after)")
    p.add_argument("--write", metavar="BENCHMARKS_MD",
                   help="put the results into this file's '## Checkpoint save' section")
    args = p.parse_args(argv)
    if args.params < 1 or args.ranks < 2 or args.saves < 1:
        raise UserError("--params and --saves must be positive and --ranks at least 2")
    scratch = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lcl-bench-checkpoint-"))
    try:
        result = bench_checkpoint(int(args.params), args.ranks, args.saves, scratch, args.background)
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    text = markdown(result)
    print(text, end="")
    if args.write:
        write_markdown_section(Path(args.write), "## Checkpoint save", text)
    return 0
