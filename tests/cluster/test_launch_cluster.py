"""`lcl launch slurm` on a real two-node Slurm cluster (tests/slurm_cluster.py): a job trains to the
end; the warning signal stops it with a checkpoint and requeues it; a SIGKILLed rank is restarted.
Interrupted runs must log exactly the uninterrupted run's losses, step for step."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.support.configs import TINY_MODEL
from tests.support.launch import REPO, read_metrics


STEPS, EVERY = 32, 8
TINY = TINY_MODEL + [
    "train.micro_batch_size=4", "data.heldout=", "logging.every=1", "logging.progress=false",
    "logging.tensorboard=false", f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=2",
    "parallel.timeout_s=60",
]
# Generous: on a shared 2-core machine one start of the job can take minutes. They only bound a hang.
START_S, FINISH_S = 300, 420
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def launch(cluster, config: Path, run_dir: Path, *flags: str) -> str:
    """`lcl launch slurm` for 2 nodes x 1 process of the tiny demo; returns the job id."""
    proc = cluster.run([sys.executable, "-m", "lcl_megatron.cli", "launch", "slurm", "--config", str(config),
                        "--nodes", "2", "--gpus-per-node", "1", "--max-restarts", "1", "--shutdown-timeout", "15",
                        *flags, f"run.dir={run_dir}", *TINY], cwd=REPO, timeout=300,
                       env={"OMP_NUM_THREADS": "1"})
    records = [json.loads(line) for line in (run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert f"submitted job {records[-1]['job_id']}" in proc.stdout
    return records[-1]["job_id"]


def losses_by_step(run_dir: Path) -> dict[int, tuple]:
    """The last logged losses of each step (an interrupted run logs the steps it repeats twice)."""
    return {r["step"]: (r["loss"], r["generation_loss"], r["contrastive_loss"]) for r in read_metrics(run_dir)}


def wait_for_step(cluster, job_id: str, run_dir: Path, step: int, timeout: float = START_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and max(losses_by_step(run_dir), default=0) >= step:
            return
        state = cluster.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {state}:\n{tail(job_output(run_dir))}"
        time.sleep(0.3)
    raise TimeoutError(f"step {step} not reached in {timeout}s:\n{tail(job_output(run_dir))}")


def job_output(run_dir: Path) -> str:
    """The batch output of every job of the run (all ranks, prefixed [rankN]:)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("slurm-*.out")))


def tail(text: str, chars: int = 4000) -> str:
    return text[-chars:]


def assert_same_losses(run_dir: Path, reference: dict) -> None:
    got = losses_by_step(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), f"steps logged: {sorted(got)}"
    for step, values in reference.items():
        for a, b in zip(got[step], values):
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), f"step {step}: {got[step]} != {values}"


def worker_pids(cluster, rank: int) -> list[int]:
    """Training processes (not torchrun agents) of the cluster's jobs with this global rank."""
    found = []
    for pid in cluster.marked_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lcl_megatron.cli" in cmdline and f"RANK={rank}".encode() in environ:
            found.append(pid)
    return found


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """One snapshot of the demo config for every job of the module, in a directory with a space."""
    path = tmp_path_factory.mktemp("slurm") / "config dir" / "demo.yaml"
    path.parent.mkdir()
    shutil.copy(REPO / "configs" / "demo.yaml", path)
    return path


@pytest.fixture(scope="module")
def reference(slurm_cluster, config, tmp_path_factory):
    """A 2-node job trains, checkpoints and exits 0. Its losses are the reference."""
    run_dir = tmp_path_factory.mktemp("slurm") / "reference run"
    job_id = launch(slurm_cluster, config, run_dir)
    info = slurm_cluster.wait_job(job_id, FINISHED, timeout=FINISH_S)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), tail(job_output(run_dir))
    return run_dir, job_id, losses_by_step(run_dir)


def test_two_node_job_trains_checkpoints_and_exits_0(reference):
    from lcl_megatron.checkpoint.format import complete_checkpoints, read_manifest

    run_dir, job_id, losses = reference
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS][0] < losses[1][0]
    kept = complete_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in kept] == [f"step_{STEPS - EVERY:08d}", f"step_{STEPS:08d}"]  # checkpoint.keep=2
    assert read_manifest(kept[-1])["world_size"] == 2
    logs = run_dir / "logs" / f"job{job_id}_restart0"
    for node in (0, 1):  # one torchrun per node, each writing its rank's log
        assert list((logs / f"node{node}").glob("*/attempt_0/0/stderr.log")), f"no rank log of node {node}"
    output = job_output(run_dir)
    assert "2 node(s) x 1 process(es)" in output and "[rank1]:" in output
    assert (run_dir / "slurm" / "job.sbatch").read_text().startswith("#!/bin/bash")


def test_warning_signal_checkpoints_requeues_and_resumes(slurm_cluster, config, reference, tmp_path):
    """Slurm's warning signal mid-run (what `--signal=USR1@T` sends before the time limit)."""
    run_dir = tmp_path / "requeued run"
    job_id = launch(slurm_cluster, config, run_dir)
    wait_for_step(slurm_cluster, job_id, run_dir, EVERY // 2 + 1)
    slurm_cluster.run(["scancel", "--signal=USR1", job_id])
    deadline = time.monotonic() + START_S
    while (info := slurm_cluster.job(job_id))["JobState"] != "PENDING" or info.get("Restarts") != "1":
        assert info["JobState"] not in FINISHED, f"job {job_id} ended {info['JobState']} instead of requeueing:\n" \
                                                 + tail(job_output(run_dir))
        assert time.monotonic() < deadline, f"job {job_id} was not requeued:\n{tail(job_output(run_dir))}"
        time.sleep(0.5)
    slurm_cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])  # skip Slurm's requeue hold
    info = slurm_cluster.wait_job(job_id, FINISHED, timeout=FINISH_S)
    output = job_output(run_dir)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), tail(output)
    assert "got SIGUSR1" in output and f"requeued Slurm job {job_id}" in output
    stopped_at = int(output.split("resumed from")[1].split("at step ")[1].split()[0])
    assert EVERY // 2 + 1 <= stopped_at < STEPS  # the checkpoint written on the signal, not a periodic one
    assert "lcl: job %s restart 1" % job_id in output
    assert_same_losses(run_dir, reference[2])


def test_killed_rank_restarts_and_resumes(slurm_cluster, config, reference, tmp_path):
    """One rank SIGKILLed after a checkpoint: torchrun restarts both nodes' workers from it."""
    run_dir = tmp_path / "killed run"
    job_id = launch(slurm_cluster, config, run_dir)
    wait_for_step(slurm_cluster, job_id, run_dir, EVERY + 1)
    victims = worker_pids(slurm_cluster, rank=1)
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)
    info = slurm_cluster.wait_job(job_id, FINISHED, timeout=FINISH_S)  # raises if the job hangs
    output = job_output(run_dir)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), tail(output)
    assert f"resumed from {run_dir / 'checkpoints'}" in output
    restarted = run_dir / "logs" / f"job{job_id}_restart0"
    assert list(restarted.glob("node*/*/attempt_1/0/stderr.log")), "torchrun did not restart the workers"
    assert_same_losses(run_dir, reference[2])


def test_chain_submits_jobs_that_wait_for_each_other(slurm_cluster, config, tmp_path):
    run_dir = tmp_path / "chained run"
    launch(slurm_cluster, config, run_dir, "--chain", "2", "--sbatch=--hold")  # held: checked, never run
    first, second = [json.loads(line) for line in (run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()]
    try:
        assert second["after"] == first["job_id"]
        assert slurm_cluster.job(second["job_id"])["Dependency"].startswith(f"afterany:{first['job_id']}")
    finally:
        slurm_cluster.run(["scancel", first["job_id"], second["job_id"]])
