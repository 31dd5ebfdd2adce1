"""`lcl plan` and `lcl train` refuse an impossible layout with the same line, as processes."""

from tests.support.configs import DEMO
from tests.support.launch import run_lcl


def test_plan_and_train_refuse_a_layout_with_the_same_line(tmp_path):
    message = "parallel.tp=3 does not divide the ViT heads (4); use a tp from {1, 2, 4} or change model.vision.head_width"
    plan = run_lcl(["plan", "--config", DEMO, "--nodes", "1", "--gpus-per-node", "3", "parallel.tp=3"], check=False)
    train = run_lcl(["train", "--config", DEMO, "parallel.tp=3", f"run.dir={tmp_path}/run"], check=False,
                    env={"WORLD_SIZE": "3"})
    assert (plan.returncode, plan.stdout, plan.stderr.splitlines()) == (2, "", [f"lcl plan: {message}"])
    assert (train.returncode, train.stderr.splitlines()[-1:]) == (2, [f"lcl train: {message}"])
    assert not (tmp_path / "run").exists()
