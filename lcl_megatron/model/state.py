"""Which of the model's tensors are its state, and which of its parameters train without weight decay.

Checkpoints, the optimizer and the reader of DeepSpeed's files share these
rules: the optimizer's parameter groups are rebuilt from them when its saved
state is read back.
"""

from __future__ import annotations

import torch


def model_tensors(state_dict: dict) -> dict:
    """Drop megatron's `_extra_state` entries (None for our local layers)."""
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    # Norm gains, biases, class/query embeddings' 1-D gains and the temperature (OpenCLIP's rule).
    return param.ndim < 2 or "logit_scale" in name
