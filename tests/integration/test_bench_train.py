"""`lcl bench train` as users start it: every rank fed as `lcl train` feeds it, one JSON line."""

import json
import math

import pytest

from tests.support.configs import TINY_MODEL
from tests.support.launch import run_lcl


@pytest.mark.parametrize("nproc, layout", [(2, ["parallel.pp=2", "train.grad_accumulation=2"]),
                                           (2, ["parallel.tp=2"])], ids=["pp2_accum2", "tp2"])
def test_bench_train_runs_the_training_step_of_a_layout(tmp_path, nproc, layout):
    proc = run_lcl(["bench", "train", "--config", "configs/demo.yaml", "--synthetic", "--steps", "2", "--warmup", "1",
                    *TINY_MODEL, "train.micro_batch_size=2", f"run.dir={tmp_path / 'run'}", *layout], nproc=nproc)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1, proc.stdout  # printed once, by rank 0
    row = rows[0]
    assert row["world_size"] == nproc and row["global_batch"] == 2 * (2 if "train.grad_accumulation=2" in layout else 1)
    assert row["step_s"] > 0 and math.isfinite(row["samples_per_s"]) and row["tokens_per_s"] > 0
