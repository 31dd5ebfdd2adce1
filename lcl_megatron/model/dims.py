"""The contrastive temperature and its range, derived from the model config in this one place.

Layer widths are the config's own (`VisionConfig.ffn_width`, `TextConfig.ffn_width`): the layout
rules below the model need them too.
"""

from __future__ import annotations

import torch


# The temperature parameter (log of the logit scale) lives in [MIN_LOGIT_SCALE, model.max_logit_scale].
MIN_LOGIT_SCALE = 0.0


def exp_logit_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """The contrastive temperature: exp of the parameter, in fp32. Its cap is kept by clamping
    the parameter to `logit_scale_range` after each optimizer step, as the reference does:
    clamping the parameter, not its use, keeps its gradient alive at the cap."""
    return logit_scale.float().exp().squeeze(0)


def logit_scale_range(cfg) -> tuple[float, float]:
    """[low, high] the temperature parameter is clamped to, from a ModelConfig."""
    return MIN_LOGIT_SCALE, cfg.max_logit_scale
