"""The reference's initialisation, by tensor family, applied to canonical (unsharded) tensors.

The reference's ViT keeps PyTorch's defaults (OpenCLIP's VisionTransformer
`init_parameters` does nothing): nn.MultiheadAttention's Xavier-uniform
in_proj with zero biases, nn.Linear's U(+-1/sqrt(fan_in)) for out_proj (zero
bias), c_fc and c_proj (uniform biases). Its text tower follows OpenCLIP's
TextTransformer (the constructor's normal inits; c_fc std (2 width)^-0.5, the
MLP biases left at nn.Linear's uniform default), and its LM head is an
nn.Linear default. The model's constructor already gives every other tensor
the reference's init; this module overwrites the ones where ours differs.

Tensors are drawn whole, in a fixed order from torch's generator (seeded alike
on every rank), and then split for tensor parallelism, so every layout starts
from the same weights.
"""

from __future__ import annotations

import math
import re

import torch

from lcl_megatron.config import ModelConfig

_LAYER = re.compile(r"\.layers\.\d+\.")


def _uniform(shape, bound: float) -> torch.Tensor:
    return torch.empty(shape).uniform_(-bound, bound)


def _normal(shape, std: float) -> torch.Tensor:
    return torch.empty(shape).normal_(0.0, std)


def reference_rules(cfg: ModelConfig) -> dict:
    """Tensor family ("visual.layers.*.mlp.linear_fc1.weight", ...) -> shape -> tensor."""
    vw, tw = cfg.vision.width, cfg.text.width
    vh, th = cfg.vision.ffn_width, cfg.text.ffn_width
    rules = {
        # nn.MultiheadAttention: xavier_uniform_ over in_proj [3w, w]; out_proj an nn.Linear, biases zeroed
        "visual.layers.*.self_attention.linear_qkv.weight": lambda s: _uniform(s, math.sqrt(6 / (vw + 3 * vw))),
        "visual.layers.*.self_attention.linear_proj.weight": lambda s: _uniform(s, vw ** -0.5),
        "visual.layers.*.mlp.linear_fc1.weight": lambda s: _uniform(s, vw ** -0.5),
        "visual.layers.*.mlp.linear_fc1.bias": lambda s: _uniform(s, vw ** -0.5),
        "visual.layers.*.mlp.linear_fc2.weight": lambda s: _uniform(s, vh ** -0.5),
        "visual.layers.*.mlp.linear_fc2.bias": lambda s: _uniform(s, vh ** -0.5),
        "text.lm_head.output_layer.weight": lambda s: _uniform(s, tw ** -0.5),
    }
    if cfg.text.arch == "clip":  # the llama decoder has no reference; it keeps the constructor's init
        rules.update({
            "text.layers.*.mlp.linear_fc1.weight": lambda s: _normal(s, (2 * tw) ** -0.5),
            "text.layers.*.mlp.linear_fc1.bias": lambda s: _uniform(s, tw ** -0.5),
            "text.layers.*.mlp.linear_fc2.bias": lambda s: _uniform(s, th ** -0.5),
        })
    return rules


def family(name: str) -> str:
    return _LAYER.sub(".layers.*.", name)


@torch.no_grad()
def reference_init_(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Re-draw the tensors whose init differs from the reference's (collective-free)."""
    from lcl_megatron.model.sharding import canonical_shapes, load_canonical

    rules = reference_rules(cfg)
    shapes = canonical_shapes(model, cfg.text.vocab_size)
    load_canonical(model, {name: rules[family(name)](shape) for name, shape in shapes.items() if family(name) in rules})
