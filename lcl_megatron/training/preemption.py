"""Stopping cleanly when the scheduler asks: finish the step, checkpoint, requeue.

Slurm's warning signal (`#SBATCH --signal=USR1@T`, sent T seconds before the
time limit) and SIGTERM (preemption, `scontrol requeue`, scancel, torchrun
shutting its workers down) only set a flag here. Once per step all ranks agree
on it (`stop_requested`, an all-reduce MAX), so every rank leaves the loop after
the same step and writes the same checkpoint. After that checkpoint,
`after_final_checkpoint` requeues the job on the warning signal, since a time
limit does not requeue by itself; on SIGTERM Slurm has already decided the
job's fate (requeue or cancel) and nothing more is done. Ctrl-C (SIGINT) is
handled like SIGTERM, so an interactive run keeps its last steps; a second
Ctrl-C aborts at once.

In the training loop (every rank):

    watcher = PreemptionWatcher()               # once, in the main thread
    while step < total:
        ...one step...
        if watcher.stop_requested():            # collective, once per step
            break
    save_checkpoint(...)
    watcher.close()                             # the previous signal handlers again
    return watcher.after_final_checkpoint()     # process exit code
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist

WARNING_SIGNAL = signal.SIGUSR1


class PreemptionWatcher:
    def __init__(self, signals=(WARNING_SIGNAL, signal.SIGTERM, signal.SIGINT)):
        self.received: int = 0  # the first signal this process got; 0: none
        self.stop_signal: int = 0  # the signal all ranks stop on; 0: no stop
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            print("lcl train: second Ctrl-C; aborting without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGINT)
        if not self.received:
            self.received = signum
            print(f"lcl train: got {signal.Signals(signum).name}; stopping after this step with a checkpoint",
                  file=sys.stderr, flush=True)

    def stop_requested(self) -> bool:
        """Collective: True on every rank once any rank got a signal. On SIGTERM and the
        warning together, SIGTERM wins (its number is larger): Slurm is already ending the job;
        SIGINT (2) is smaller than both and stops the run the way SIGTERM does."""
        if self.stop_signal:
            return True
        flag = torch.tensor([self.received], dtype=torch.int32, device=_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stop_signal = int(flag.item())
        return bool(self.stop_signal)

    def after_final_checkpoint(self) -> int:
        """Requeue the job on the warning signal (rank 0 asks Slurm); returns the process exit code:
        0 when training finished or the job was requeued, 128 + signal when it stopped otherwise."""
        if not self.stop_signal:
            return 0
        name = signal.Signals(self.stop_signal).name
        job_id = os.environ.get("SLURM_JOB_ID")
        if self.stop_signal == WARNING_SIGNAL and job_id:
            if _rank() == 0:
                ok = requeue(job_id)
                print(f"lcl train: {name}: checkpoint written; "
                      + (f"requeued Slurm job {job_id}" if ok else f"could not requeue Slurm job {job_id}"),
                      file=sys.stderr, flush=True)
                return 0 if ok else 1
            return 0
        if _rank() == 0:
            print(f"lcl train: {name}: checkpoint written; continue with --resume", file=sys.stderr, flush=True)
        return 128 + self.stop_signal

    def close(self) -> None:
        """Put back the handlers this watcher replaced."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def requeue(job_id: str) -> bool:
    """`scontrol requeue JOB`: the job ends now and is queued again with its id, script and settings."""
    try:
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"lcl train: scontrol requeue {job_id}: {e}", file=sys.stderr)
        return False
    if proc.returncode != 0:
        print(f"lcl train: scontrol requeue {job_id}: {proc.stderr.strip()}", file=sys.stderr)
    return proc.returncode == 0


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
