"""PreemptionWatcher: a signal on any rank stops every rank after the same step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from lcl_megatron.training.preemption import PreemptionWatcher
from tests.support.launch import REPO, free_port

# Shuts down in `lcl train`'s order (training/train.py): the watcher closed, then the process group
# destroyed before the interpreter exits (left to its teardown, its threads can abort a rank).
WORKER = """
import os, signal
import torch.distributed as dist
from lcl_megatron.training.preemption import PreemptionWatcher

dist.init_process_group("gloo")
watcher = PreemptionWatcher()
for step in range(1, 9):
    if dist.get_rank() == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGUSR1)
    if watcher.stop_requested():
        break
watcher.close()
print(step, watcher.stop_signal, watcher.after_final_checkpoint())
dist.destroy_process_group()
"""


def without_slurm() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


@pytest.fixture
def watcher(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    w = PreemptionWatcher()
    yield w
    w.close()


def test_no_signal_no_stop(watcher):
    assert not watcher.stop_requested()
    assert watcher.after_final_checkpoint() == 0


def test_sigterm_wins_over_the_warning(watcher):
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process lives on
    assert watcher.received == signal.SIGUSR1  # the first signal is kept locally ...
    assert watcher.stop_requested() and watcher.stop_requested()
    assert watcher.after_final_checkpoint() == 128 + signal.SIGUSR1  # ... and, alone, stops without requeue


def test_close_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    w = PreemptionWatcher()
    assert signal.getsignal(signal.SIGUSR1) != before
    w.close()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_warning_outside_a_batch_job_cannot_requeue(watcher, monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "999999")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here
    os.kill(os.getpid(), signal.SIGUSR1)
    assert watcher.stop_requested()
    assert watcher.after_final_checkpoint() == 1  # scontrol requeue failed: said so, exit 1


def test_one_rank_signalled_every_rank_stops_after_the_same_step():
    env = {**without_slurm(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [out.split() for out, _ in outputs] == [["3", "10", "138"]] * 2  # step 3, SIGUSR1, 128 + 10
