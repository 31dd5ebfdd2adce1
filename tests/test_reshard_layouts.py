"""`lcl convert reshard` between layouts: training continues on the new layout as it would have on the old.

Three steps at TP=2 x PP=2 (4 processes, `lcl train` under torchrun, fp32 on
CPU, global batch fixed by data.split=samples), checkpointed; then steps 4-6
three ways: `--resume` on TP=2 x PP=2, on one process from the checkpoint
resharded to `consolidated`, and on DP=2 with ZeRO-3 from the checkpoint
resharded to `tp=1,pp=1,dp=2,zero=3`. The resumed runs read the config
reshard wrote (the target layout). Their losses must agree.
"""

import json

import pytest

from tests.launch import read_metrics, run_lcl
from tests.test_parallel_equivalence import GLOBAL_BATCH, TINY

TP2_PP2 = ["parallel.tp=2", "parallel.pp=2"]
STEPS = 6


def _train(run_dir, nproc, *args):
    run_lcl(["train", *args, f"run.dir={run_dir}", f"train.steps={STEPS}"], nproc=nproc)


@pytest.mark.slow
def test_reshard_tp2_pp2_to_one_process_and_to_dp2_zero3_continues_alike(tmp_path):
    original = tmp_path / "tp2_pp2"
    config = ["--config", "configs/demo.yaml", *TINY, *TP2_PP2, f"train.micro_batch_size={GLOBAL_BATCH}"]
    _train(original, 4, *config, "train.exit_interval=3")
    ckpt = original / "checkpoints" / "step_00000003"
    assert [m["step"] for m in read_metrics(original)] == [1, 2, 3]

    targets = {"consolidated": ("consolidated", 1), "dp2_zero3": ("tp=1,pp=1,dp=2,zero=3", 2)}
    for name, (layout, _) in targets.items():
        out = tmp_path / name / "checkpoints" / "step_00000003"
        proc = run_lcl(["convert", "reshard", "--checkpoint", str(ckpt), "--layout", layout, "--out", str(out)])
        assert "wrote" in proc.stdout
    # The canonical state is the same whatever the target layout.
    assert ((tmp_path / "consolidated" / "checkpoints" / "step_00000003" / "optimizer.safetensors").read_bytes()
            == (tmp_path / "dp2_zero3" / "checkpoints" / "step_00000003" / "optimizer.safetensors").read_bytes())

    _train(original, 4, *config, "--resume")
    expected = [m for m in read_metrics(original) if m["step"] > 3]
    assert [m["step"] for m in expected] == [4, 5, 6]
    for name, (_, nproc) in targets.items():
        run_dir = tmp_path / name
        written = run_dir / "checkpoints" / "step_00000003" / "config.yaml"
        _train(run_dir, nproc, "--config", str(written), "--resume")
        got = read_metrics(run_dir)
        assert [m["step"] for m in got] == [4, 5, 6], name
        for ref, m in zip(expected, got):
            for key in ("loss", "generation_loss", "contrastive_loss", "lr"):
                assert m[key] == pytest.approx(ref[key], rel=1e-4), (name, key, ref["step"])
    manifest = json.loads((tmp_path / "dp2_zero3" / "checkpoints" / "step_00000003" / "COMPLETE").read_text())
    assert manifest["world_size"] == 2 and manifest["source_layout"] == {"tp": 2, "pp": 2, "dp": 1, "zero": 0}
