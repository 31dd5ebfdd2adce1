"""`lcl train` end to end on the embedded corpus: run directory, resume, checkpoints, failures."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from lcl_megatron.checkpoint.format import COMPLETE, complete_checkpoints, newest_checkpoint
from tests.support.configs import with_base
from tests.support.launch import read_metrics, run_lcl

KEYS = {"step", "loss", "contrastive_loss", "generation_loss", "lr", "grad_norm", "logit_scale", "samples_per_s", "token_utilisation",
        "tokens_per_s", "step_time_s", "mfu", "peak_memory_gib", "data_wait_fraction"}


def train(run_dir, *extra, resume=False, check=True):
    args = ["train", "--config", "configs/demo.yaml", *with_base(*extra), f"run.dir={run_dir}"]
    return run_lcl(args + (["--resume"] if resume else []), check=check)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(run_dir, "train.steps=4", "checkpoint.every=2", "data.heldout=embedded:digits", "logging.tensorboard=true")
    return run_dir


def test_run_directory(straight):
    metrics = read_metrics(straight)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(KEYS <= m.keys() for m in metrics)
    assert all(m["grad_norm"] == m["grad_norm"] and m["grad_norm"] > 0 for m in metrics)  # measured, not NaN
    assert all(m["mfu"] > 0 and 0 <= m["data_wait_fraction"] <= 1 and m["peak_memory_gib"] > 0 for m in metrics)
    evals = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines() if "zeroshot_top1" in line]
    assert len(evals) == 1 and 0 <= evals[0]["zeroshot_top1"] <= 1
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert (straight / "config.yaml").is_file()
    ckpts = complete_checkpoints(straight / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000002", "step_00000004"]
    manifest = json.loads((ckpts[-1] / COMPLETE).read_text())
    assert manifest["step"] == 4 and "model.safetensors" in manifest["files"]
    assert (straight / "checkpoints" / "latest").read_text() == "step_00000004"
    assert load_file(str(ckpts[-1] / "model.safetensors"))["logit_scale"].shape == (1,)


def test_resume_reproduces_the_uninterrupted_run(straight, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "train.steps=4", "train.exit_interval=2", "checkpoint.every=2", "data.heldout=")
    # A save interrupted after step 2: its directory exists but never became complete.
    (run_dir / "checkpoints" / "step_00000003").mkdir()
    proc = train(run_dir, "train.steps=4", "checkpoint.every=2", "data.heldout=", resume=True)
    assert "resumed from" in proc.stderr and "step_00000002" in proc.stderr
    ref = {m["step"]: m for m in read_metrics(straight)}
    got = {m["step"]: m for m in read_metrics(run_dir)}
    for step in (3, 4):
        for key in ("loss", "generation_loss", "contrastive_loss"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)
    assert newest_checkpoint(run_dir / "checkpoints").name == "step_00000004"
    assert not (run_dir / "checkpoints" / "step_00000003").exists()  # pruned once a newer one completed


def test_resumed_run_logs_every_step_once(straight, tmp_path):
    """Killed after logging steps 3-4 but before their checkpoint: the rerun's rows replace them."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    (run_dir / "checkpoints" / "latest").write_text("step_00000002")
    (run_dir / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text() + '{"step": 4, "lo')  # torn
    train(run_dir, "train.steps=4", "checkpoint.every=2", "data.heldout=embedded:digits", "logging.tensorboard=true",
          resume=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "zeroshot_top1" in r] == [4]


def test_keep_prunes_old_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "train.steps=3", "checkpoint.every=1", "checkpoint.keep=2", "data.heldout=")
    assert [c.name for c in complete_checkpoints(run_dir / "checkpoints")] == ["step_00000002", "step_00000003"]


def test_non_finite_loss_stops_and_names_the_step(tmp_path):
    proc = train(tmp_path / "run", "train.steps=6", "optim.lr=1e12", "optim.grad_clip=0", "schedule.warmup_steps=0",
                 "data.heldout=", check=False)
    assert proc.returncode == 1
    assert "non-finite loss at step" in proc.stderr and "Traceback" not in proc.stderr


def test_bf16_trains(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "train.precision=bf16", "train.steps=6", "optim.lr=3e-3", "data.heldout=")
    metrics = read_metrics(run_dir)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5
