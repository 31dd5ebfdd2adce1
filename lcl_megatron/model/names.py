"""Canonical tensor names (those of the single-process `LCLModel`) and which pipeline
stage holds each.

Checkpoints store tensors under these names whatever the layout. The pipeline
(model/pipeline.py) cuts the model into a first block, one block per LM layer
and a loss block; each block maps its submodules to canonical prefixes here,
and the planner asks here which stage holds a tensor.
"""

from __future__ import annotations

import re

# submodule of the block -> canonical prefix
FIRST_BLOCK = {"visual": "visual", "pool_project": "pool_project", "embedding": "text.embedding"}
LOSS_BLOCK = {"context_head": "text.context_head", "lm_head": "text.lm_head", "logit_scale": "logit_scale"}
LM_LAYER_PREFIX = "text.layers"
# Kept in fp32 whatever the training precision: the temperature's cap, ln 100, is 4.594 in bf16
# (a scale of 98.9), and an update of lr x ~1 barely moves a bf16 value near 4.6.
FP32_PARAMETERS = ("logit_scale",)
# Where ZeRO-3 gathers these parameters in bf16, the training engine hangs their exact fp32 master on
# the parameter under this attribute after every update; the model computes with it (model/dims.py).
FP32_MASTER_ATTRIBUTE = "fp32_master"
_LM_LAYER = re.compile(rf"^{re.escape(LM_LAYER_PREFIX)}\.(\d+)\.")


def lm_layer_block(index: int) -> dict:
    return {"layer": f"{LM_LAYER_PREFIX}.{index}"}


def block_prefixes(num_lm_layers: int) -> list[dict]:
    """The canonical map of each pipeline block, in pipeline order (no model needed)."""
    return [FIRST_BLOCK] + [lm_layer_block(i) for i in range(num_lm_layers)] + [LOSS_BLOCK]


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def stage_of(name: str, stage_layers: list[int]) -> int:
    """The pipeline stage holding canonical tensor `name`, given the LM layers on each stage."""
    if _under(name, FIRST_BLOCK.values()):
        return 0
    if _under(name, LOSS_BLOCK.values()):
        return len(stage_layers) - 1
    match = _LM_LAYER.match(name)
    if match is None:
        raise RuntimeError(f"no pipeline stage holds '{name}': it is not a canonical tensor name")
    layer, first = int(match.group(1)), 0
    for stage, count in enumerate(stage_layers):
        if layer < first + count:
            return stage
        first += count
    raise RuntimeError(f"LM layer {layer} is beyond the {first} layers of the stages")
