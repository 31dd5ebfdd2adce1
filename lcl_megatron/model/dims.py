"""The contrastive temperature and its range, derived from the model config in this one place.

Layer widths are the config's own (`VisionConfig.ffn_width`, `TextConfig.ffn_width`): the layout
rules below the model need them too.
"""

from __future__ import annotations

import torch

from lcl_megatron.model.names import FP32_MASTER_ATTRIBUTE


# The temperature parameter (log of the logit scale) lives in [MIN_LOGIT_SCALE, model.max_logit_scale].
MIN_LOGIT_SCALE = 0.0


def exp_logit_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """The contrastive temperature: exp of the parameter, in fp32. Its cap is kept by clamping
    the parameter to `logit_scale_range` after each optimizer step, as the reference does:
    clamping the parameter, not its use, keeps its gradient alive at the cap.

    Where the parameter itself is held in bf16 (ZeRO-3 under bf16 gathers it so), the value is its
    fp32 master and the gradient still flows into the parameter: the forward sees ln 100, not 4.594."""
    value = logit_scale.float()
    master = getattr(logit_scale, FP32_MASTER_ATTRIBUTE, None)
    if master is not None:
        value = value + (master.to(value.device) - value).detach()
    return value.exp().squeeze(0)


def logit_scale_range(cfg) -> tuple[float, float]:
    """[low, high] the temperature parameter is clamped to, from a ModelConfig."""
    return MIN_LOGIT_SCALE, cfg.max_logit_scale
