"""`lcl eval probe` end to end on an image folder, and its one-line refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.support.paths import REPO


def test_probe_command_on_an_image_folder(tmp_path):
    """Two classes told apart by brightness: every probe of an untrained model reads them."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for name, level in (("dark", 40), ("light", 210)):
            (tmp_path / "set" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(level + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "set" / split / name / f"{i}.png")
    (tmp_path / "tiny.yaml").write_text(TINY)
    done = lcl("--config", str(tmp_path / "tiny.yaml"), "--data", str(tmp_path / "set"), "train.seed=3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[0])
    assert result["num_train"] == 48 and result["num_test"] == 16
    assert result["linear_patch_top1"] == 1.0 and result["attentive_top1"] >= 0.9
    assert len(lines) == 2 and lines[1].startswith("probes on ")


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/demo.yaml", "--data", "/nonexistent"], "neither embedded:NAME nor a directory"),
    (["--config", "configs/demo.yaml", "--probes", "linear,knn"], "--probes"),
    (["--checkpoint", "/nonexistent/run"], "nonexistent"),
])
def test_probe_command_rejects_bad_input_in_one_line(args, message):
    done = lcl(*args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert not any(line.startswith("{") for line in done.stdout.splitlines())  # no result


TINY = """
model:
  embed_dim: 32
  vision: {image_size: 16, patch_size: 8, width: 32, layers: 1, head_width: 16}
  text: {context_length: 16, width: 32, heads: 2, layers: 1}
  pool_heads: 2
data: {path: [embedded:digits], heldout: ""}
"""


def lcl(*args):
    return subprocess.run([sys.executable, "-m", "lcl_megatron.cli", "eval", "probe", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
