"""Checkpoints and exports built directly for conversion tests, without training."""

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lcl_megatron.config import Config, ModelConfig, load_config
from lcl_megatron.checkpoint.consolidated import write_checkpoint
from lcl_megatron.convert.output import atomic_directory
from lcl_megatron.model.build import build_model
from lcl_megatron.model.state import model_tensors
from tests.support.configs import DEMO, TINY_MODEL


def demo_model_config() -> ModelConfig:
    return load_config(DEMO).model


def tiny_model_config() -> ModelConfig:
    return load_config(DEMO, TINY_MODEL).model


def random_checkpoint(model_cfg: ModelConfig, out, seed: int = 0):
    """A checkpoint whose every tensor is random (biases and norms too, so no layout error hides)."""
    torch.manual_seed(seed)
    cfg = Config(model=model_cfg)
    cfg.data.path = ["embedded:digits"]
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    with atomic_directory(out, "tests: random_checkpoint") as tmp:
        write_checkpoint(tmp, cfg, model_tensors(model.state_dict()), meta={"step": 1234, "source": "test"})
    return Path(out)


def images_for(size: int) -> list[Image.Image]:
    """Two RGB photos-to-be of other sizes, whose centre crop margins are even (see the model card)."""
    rng = np.random.default_rng(0)
    shapes = [(size * 3 // 2, size * 2), (size * 2, size)]  # (height, width): landscape, portrait
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def load_export_module(hfdir, name: str = "lcl_pool_project.py"):
    """A module the export ships, imported from the export's own copy."""
    spec = importlib.util.spec_from_file_location(f"{name[:-3]}_{abs(hash(str(hfdir)))}", hfdir / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
