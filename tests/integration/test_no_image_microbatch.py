"""A micro-batch without any image trains on every layout without hanging (DeepSpeed issue 5792)."""

import os
import subprocess
import sys

import pytest

from tests.support.launch import REPO, free_port
from tests.support.configs import TINY

# The layouts whose collectives an image-less rank could skip: ZeRO-3's parameter gathers,
# TP/SP all-gathers and reduce-scatters, pipeline sends; with accumulation, a step whose feature
# cache holds no image on that rank.
LAYOUTS = {
    "dp2_zero3_accum2": (2, ["parallel.zero_stage=3", "train.grad_accumulation=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "pp2_dp2_accum2": (4, ["parallel.pp=2", "parallel.zero_stage=1", "train.grad_accumulation=2"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_microbatch_without_images(tmp_path, layout):
    nproc, overrides = LAYOUTS[layout]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           str(REPO / "tests" / "support" / "scripts" / "no_image_step.py"), str(tmp_path / "run"), *TINY, *overrides,
           "train.micro_batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "NO_IMAGE_STEPS_OK" in proc.stdout
