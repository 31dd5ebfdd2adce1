"""Derived sizes (model/dims.py) and canonical names / stage membership (model/names.py): pure functions."""

from __future__ import annotations

import pytest

from lcl_megatron.config import TextConfig, VisionConfig
from lcl_megatron.model.names import block_prefixes, stage_of
from lcl_megatron.model.pipeline import stage_boundaries


def test_ffn_widths():
    assert TextConfig(arch="llama", width=4096).ffn_width == 11008  # Llama-2 7B
    assert TextConfig(arch="llama", width=4096, ffn_hidden_size=14336).ffn_width == 14336
    assert TextConfig(arch="clip", width=512, mlp_ratio=4.0).ffn_width == 2048
    assert VisionConfig(width=1024, mlp_ratio=4.0).ffn_width == 4096


@pytest.mark.parametrize("layers,pp,first", [(4, 2, -1), (6, 3, 1), (5, 2, 0), (3, 1, -1)])
def test_stage_of_agrees_with_the_pipeline_cut(layers, pp, first):
    """The stage the planner names for a tensor is the one whose pipeline blocks hold it."""
    parts = stage_boundaries(layers, pp, first)
    lm_per_stage = [parts[i + 1] - parts[i] - (i == 0) - (i == pp - 1) for i in range(pp)]
    for block, prefixes in enumerate(block_prefixes(layers)):
        stage = next(s for s in range(pp) if parts[s] <= block < parts[s + 1])
        for prefix in prefixes.values():
            assert stage_of(prefix + ".weight", lm_per_stage) == stage, prefix
    assert stage_of("logit_scale", lm_per_stage) == pp - 1
    with pytest.raises(RuntimeError):
        stage_of("text.layerz.0.weight", lm_per_stage)
