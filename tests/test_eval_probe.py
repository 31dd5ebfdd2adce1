"""`lcl eval probe`: the probes on features whose answer is known, and the command end to end on an image folder."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lcl_megatron.eval.probe import attentive_probe, latent_spread, linear_probe
from tests.paths import REPO


def separable(n, dim=16, classes=4, seed=0, noise=0.3):
    """Train and test sets (n and n // 2 rows) of points around one centre per class."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim) * 3
    labels = torch.arange(n + n // 2) % classes
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return (x[:n], labels[:n]), (x[n:], labels[n:])


def test_linear_probe_separates_classes_and_not_random_labels():
    torch.manual_seed(0)
    (x, y), (tx, ty) = separable(400)
    assert linear_probe(x, y, tx, ty) == 1.0
    shuffled = y[torch.randperm(400, generator=torch.Generator().manual_seed(0))]
    assert linear_probe(x, shuffled, tx, ty) < 0.5  # chance is 0.25


def test_attentive_probe_finds_the_informative_token_and_is_deterministic():
    # The class is carried by one of 6 tokens, at a random position; the others are noise.
    def hide(x, seed):
        g = torch.Generator().manual_seed(seed)
        out = torch.randn(x.shape[0], 6, x.shape[1], generator=g)
        out[torch.arange(x.shape[0]), torch.randint(0, 6, (x.shape[0],), generator=g)] = x
        return out

    torch.manual_seed(0)
    (x, y), (tx, ty) = separable(400)
    x, tx = hide(x, 1), hide(tx, 2)
    first = attentive_probe(x, y, tx, ty, seed=0, epochs=30)
    assert first > 0.7  # chance 0.25
    assert attentive_probe(x, y, tx, ty, seed=0, epochs=30) == first


def test_latent_spread_detects_collapse():
    spread = latent_spread(torch.randn(200, 32))
    collapsed = latent_spread(torch.ones(200, 32) + 1e-4 * torch.randn(200, 32))
    assert spread["latent_effective_rank"] > 20 and spread["latent_variance"] > 0.9
    assert collapsed["latent_variance"] < 1e-6


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


@pytest.mark.slow
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


@pytest.mark.slow
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
