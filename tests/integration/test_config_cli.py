"""`lcl train` with a bad config: one line, exit code 2, as a user sees it."""

import subprocess
import sys

import pytest

from tests.support.launch import REPO


@pytest.mark.parametrize("args", [
    ["optim.lrr=0.1"],
    ["optim.lr=-1"],
    ["data.path=/nonexistent/shards"],
    ["--config", "configs/does-not-exist.yaml"],
])
def test_lcl_train_exits_2_with_one_line(args, tmp_path):
    cmd = [sys.executable, "-m", "lcl_megatron.cli", "train"]
    if args[0] != "--config":
        cmd += ["--config", "configs/demo.yaml"]
    proc = subprocess.run(cmd + args + [f"run.dir={tmp_path}/run"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line
             and "warnings.warn" not in line]
    assert len(lines) == 1 and lines[0].startswith("lcl train: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started
