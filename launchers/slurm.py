"""`lcl launch slurm`: write a run's sbatch script into its run directory and submit it.

    lcl launch slurm --config X --nodes N --gpus-per-node G [--partition P] [--time T]
                     [--account A] [--chain K] [--dry-run] [key=value ...]

The job resumes from the run's newest complete checkpoint whenever it starts
(first start, requeue, torchrun restart, next link of a chain), so submitting
again is always safe. Submissions are recorded in <run>/slurm/jobs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from launchers.sbatch import JobSpec, ScriptError, render


# Data-loader workers decode images on the host: a GPU process with fewer cores starves.
CPUS_PER_GPU = 8
DEFAULT_WARNING_S = 300

def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="lcl launch slurm", description="Submit a training run to Slurm (see docs/slurm.md).", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  lcl launch slurm --config configs/lcl_vit_b16_laion.yaml --nodes 8 --gpus-per-node 8 --partition gpu \\\n      --time 2-00:00:00 --dry-run data.path=/data/laion400m run.dir=/scratch/$USER/runs/b16")
    p.add_argument("--config", required=True, help="YAML config of the run")
    p.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    p.add_argument("--gpus-per-node", type=int, required=True,
                   help="GPUs per node; on nodes without GPUs, training processes per node (gloo)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--time", help="time limit (Slurm format, e.g. 2-00:00:00)")
    p.add_argument("--account", help="Slurm account to charge")
    p.add_argument("--job-name", help="job name (default: the config's run.name)")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start from these weights while the run has no checkpoint of its own "
                        "(a new layout: see docs/slurm.md)")
    p.add_argument("--cpus-per-task", type=int,
                   help=f"CPUs per node for its training processes and their data loaders (default: "
                        f"{CPUS_PER_GPU} per GPU, 1 per process on --cpu-nodes)")
    p.add_argument("--mem", default="0",
                   help="memory per node, in Slurm's units (default 0: all of the node's memory)")
    p.add_argument("--cpu-nodes", action="store_true",
                   help="the nodes have no GPUs: request none and run --gpus-per-node processes over gloo "
                        "(detected automatically when sinfo shows no GPUs in the partition)")
    p.add_argument("--chain", type=int, default=1, metavar="K",
                   help="submit K jobs, each starting after the previous ends (--dependency=afterany)")
    p.add_argument("--warning", type=int, default=None, metavar="SECONDS",
                   help="ask Slurm for the checkpoint-and-requeue signal this long before the time limit "
                        f"(default: {DEFAULT_WARNING_S}, or more when `lcl plan` estimates a longer save)")
    p.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts after a failed rank")
    p.add_argument("--rdzv-timeout", type=int, default=600, metavar="SECONDS",
                   help="how long torchrun waits for every node to join")
    p.add_argument("--shutdown-timeout", type=int, default=120, metavar="SECONDS",
                   help="time ranks get to checkpoint after SIGTERM before they are killed")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="export this variable in the job (repeatable), e.g. NCCL_SOCKET_IFNAME=ib0")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option (repeatable), e.g. --sbatch=--qos=high")
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p.parse_args(argv)


def partition_has_gpus(partition: str | None) -> bool | None:
    """Whether the partition's nodes advertise GPUs; None when Slurm cannot be asked."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "--noheader", "--format=%G"] + (["--partition", partition] if partition else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return "gpu" in proc.stdout


def build_spec(args) -> JobSpec:
    """Check the config and layout (ConfigError on bad input) and describe the job."""
    from lcl_megatron.config import ConfigError, load_config
    from lcl_megatron.layout import Layout

    if args.nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {args.nodes}")
    if args.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be at least 1, got {args.gpus_per_node}")
    if args.chain < 1:
        raise ConfigError(f"--chain must be at least 1, got {args.chain}")
    warning = 1 if args.warning is None else args.warning  # None: computed below
    for flag, value in (("--warning", warning), ("--rdzv-timeout", args.rdzv_timeout),
                        ("--shutdown-timeout", args.shutdown_timeout)):
        if value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    cfg = load_config(args.config, args.overrides)
    init_from = None
    if args.init_from:
        from lcl_megatron.checkpoint.format import resolve_checkpoint

        try:
            init_from = str(resolve_checkpoint(os.path.abspath(args.init_from)))
        except FileNotFoundError as e:
            raise ConfigError(f"--init-from: {e}") from None
    Layout.of(cfg, args.nodes * args.gpus_per_node)
    warning_s = checkpoint_warning(cfg, args)
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--env {item!r} is not of the form NAME=VALUE")
        env[name] = value
    gpus = not args.cpu_nodes
    if gpus and not args.dry_run and partition_has_gpus(args.partition) is False:
        print(f"lcl launch slurm: no GPUs in the partition; {args.gpus_per_node} process(es) per node over gloo",
              file=sys.stderr)
        gpus = False
    # run.dir reaches the job as LCL_RUN_DIR (absolute), so it is left out of the overrides.
    return JobSpec(
        python=sys.executable, workdir=os.getcwd(), config=os.path.abspath(args.config),
        run_dir=os.path.abspath(cfg.run_dir), job_name=args.job_name or cfg.run.name, nodes=args.nodes,
        procs_per_node=args.gpus_per_node, gpus=gpus, overrides=[o for o in args.overrides if not o.strip().startswith("run.dir=")], init_from=init_from,
        time=args.time,
        partition=args.partition, account=args.account, mem=args.mem,
        cpus_per_task=args.cpus_per_task or args.gpus_per_node * (CPUS_PER_GPU if gpus else 1),
        warning_s=warning_s, max_restarts=args.max_restarts, rdzv_timeout_s=args.rdzv_timeout,
        shutdown_timeout_s=args.shutdown_timeout, env=env, sbatch_options=list(args.sbatch))


def checkpoint_warning(cfg, args) -> int:
    """Seconds of warning before the time limit: enough for the save `lcl plan` estimates, plus a
    margin (plan/checkpoint.py). One given with --warning is kept, with a note when it is shorter."""
    from lcl_megatron.plan.checkpoint import estimate_save
    from lcl_megatron.plan.costs import make_plan

    needed = estimate_save(make_plan(cfg, args.nodes, args.gpus_per_node), cfg).warning_s
    if args.warning is None:
        return max(DEFAULT_WARNING_S, needed)
    if args.warning < needed:
        print(f"lcl launch slurm: note: --warning {args.warning} s is shorter than the {needed} s `lcl plan` "
              "estimates a checkpoint needs; a save cut off by the time limit leaves the previous checkpoint",
              file=sys.stderr)
    return args.warning


class SubmitError(RuntimeError):
    """sbatch refused the job: one line, exit code 1."""


def submit(script: Path, dependency: str | None = None) -> str:
    """`sbatch` the script; returns the job id."""
    cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterany:{dependency}"] if dependency else []) + [str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def record(run_dir: Path, entry: dict) -> None:
    """Append one submission to <run>/slurm/jobs.jsonl (one short line: appends are atomic)."""
    with open(run_dir / "slurm" / "jobs.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def main(argv=None) -> int:
    from lcl_megatron.config import ConfigError
    from lcl_megatron.utils import atomic_write_text

    args = parse_args(argv)
    if not args.dry_run and shutil.which("sbatch") is None:
        print("lcl launch slurm: sbatch not found; run on a Slurm login node (or use --dry-run)", file=sys.stderr)
        return 2
    try:
        spec = build_spec(args)
        text = render(spec)
    except (ConfigError, ScriptError) as e:
        print(f"lcl launch slurm: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    run_dir = Path(spec.run_dir)
    for sub in ("slurm", "logs"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)  # Slurm opens the output file before the job runs
    script = run_dir / "slurm" / "job.sbatch"
    atomic_write_text(script, text)
    previous = None
    try:
        for _ in range(args.chain):
            job_id = submit(script, previous)
            record(run_dir, {"job_id": job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "script": str(script), "after": previous, "nodes": spec.nodes,
                             "procs_per_node": spec.procs_per_node, "gpus": spec.gpus,
                             "argv": list(sys.argv[1:] if argv is None else argv)})
            print(f"submitted job {job_id}" + (f" (after {previous})" if previous else ""))
            previous = job_id
    except SubmitError as e:
        print(f"lcl launch slurm: {e}", file=sys.stderr)
        return 1
    out_file = shlex.quote(str(run_dir / "logs" / f"slurm-{previous}.out"))
    print(f"script: {script}\nwatch: squeue -j {previous}; tail -f {out_file}")
    return 0
