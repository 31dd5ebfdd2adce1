"""Building the model outside training (eval, conversion, planning): a world of one if none exists."""

from __future__ import annotations

import torch

from lcl_megatron.config import Config, ModelConfig, ParallelConfig


def ensure_single_process_groups() -> None:
    from lcl_megatron.parallel import init_distributed

    init_distributed(ParallelConfig())


def build_model(cfg: Config | ModelConfig, device: str | torch.device = "cpu"):
    from lcl_megatron.model.lcl import LCLModel

    ensure_single_process_groups()
    if isinstance(cfg, ModelConfig):
        cfg = Config(model=cfg)
    with torch.device(device):
        return LCLModel.from_config(cfg)


def expected_tensor_shapes(model_cfg: ModelConfig) -> dict:
    """Name -> shape of every tensor of the single-process model, without allocating it."""
    from lcl_megatron.model.state import model_tensors

    return {k: tuple(v.shape) for k, v in model_tensors(build_model(model_cfg, "meta").state_dict()).items()}


def count_parameters(model_cfg: ModelConfig) -> int:
    import math

    return sum(math.prod(s) for s in expected_tensor_shapes(model_cfg).values())
