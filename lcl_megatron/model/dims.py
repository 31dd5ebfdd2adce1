"""Sizes and ranges derived from the model config: the one place each rule is written.

The model, the planner and the exporters all ask here, so that what `lcl plan`
costs, what `lcl train` builds and what an export describes cannot disagree.
"""

from __future__ import annotations

import math

import torch

from lcl_megatron.config import Config, TextConfig, VisionConfig

# Llama rounds its SwiGLU width up to a multiple of this.
LLAMA_FFN_MULTIPLE = 256
# The temperature parameter (log of the logit scale) lives in [MIN_LOGIT_SCALE, model.max_logit_scale].
MIN_LOGIT_SCALE = 0.0


def vit_ffn_hidden_size(v: VisionConfig) -> int:
    return int(v.width * v.mlp_ratio)


def lm_ffn_hidden_size(t: TextConfig) -> int:
    """The LM's MLP width: for llama the configured SwiGLU width or Llama's own rule
    (2/3 of 4 x width, rounded up to a multiple of 256); else width x mlp_ratio."""
    if t.arch != "llama":
        return int(t.width * t.mlp_ratio)
    if t.ffn_hidden_size:
        return t.ffn_hidden_size
    return LLAMA_FFN_MULTIPLE * math.ceil(int(2 * 4 * t.width / 3) / LLAMA_FFN_MULTIPLE)


def max_images_per_microbatch(cfg: Config) -> int:
    """Image rows a micro-batch may carry: the pipeline's static latent buffer, the planner's ViT batch."""
    return cfg.parallel.max_images or cfg.train.micro_batch_size * cfg.data.max_images


def exp_logit_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """The contrastive temperature: exp of the parameter, in fp32. Its cap is kept by clamping
    the parameter to `logit_scale_range` after each optimizer step, as the reference does:
    clamping the parameter, not its use, keeps its gradient alive at the cap."""
    return logit_scale.float().exp().squeeze(0)


def logit_scale_range(cfg) -> tuple[float, float]:
    """[low, high] the temperature parameter is clamped to, from a ModelConfig."""
    return MIN_LOGIT_SCALE, cfg.max_logit_scale
