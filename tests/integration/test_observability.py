"""What a run tells its user: progress lines in log files, a profiler window, W&B runs that survive a resume."""

import json

from tests.support.configs import with_base
from tests.support.launch import run_lcl


def test_log_file_progress_profiler_and_wandb_across_a_resume(tmp_path):
    run_dir = tmp_path / "run"
    common = ["train", "--config", "configs/demo.yaml", f"run.dir={run_dir}",
              *with_base("train.steps=4", "checkpoint.every=2", "data.heldout=", "logging.every=1",
                         "logging.progress=true", "logging.tensorboard=false", "logging.wandb=true",
                         "logging.wandb_project=lcl-test")]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    first = run_lcl(common + ["train.exit_interval=2"], env=env)
    second = run_lcl(common + ["train.profile_steps=3:3", "--resume"], env=env)

    # stderr is a pipe, not a terminal: one line per logged step, no carriage-return bar
    assert "\r" not in first.stderr + second.stderr
    assert "step 1/4: loss" in first.stderr and "step 4/4: loss" in second.stderr

    traces = list((run_dir / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any(e.get("name") == "step 3" for e in events)

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(r.name.endswith(run_id) for r in offline_runs)
