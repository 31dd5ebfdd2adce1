"""model.init=reference starts every tensor family with the reference's statistics: each family's
std within 5% of the plain-torch oracle's (tests/reference_lcl.py, built as the reference builds it)."""

import re

import pytest
import torch

from lcl_megatron.config import Config
from lcl_megatron.convert.openclip import from_openclip_state_dict, model_config_from_openclip
from lcl_megatron.model.build import build_model
from lcl_megatron.model.state import model_tensors
from lcl_megatron.tokens import VOCAB_SIZE
from tests.support.reference_lcl import SPECIAL_TOKEN_IDS, ReferenceLCL

# wide enough that a family's std is estimated to ~1% (the smallest family holds ~1,500 values)
CONFIG = {
    "embed_dim": 192,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 384, "head_width": 64},
    "text_cfg": {"context_length": 48, "vocab_size": VOCAB_SIZE, "width": 192, "heads": 4, "layers": 4},
    "pool_project_cfg": {"pool_proj_type": "attn", "input_dim": 384, "output_dim": 192, "attn_num_heads": 4},
    "special_token_ids": SPECIAL_TOKEN_IDS,
}


def families(tensors: dict) -> dict:
    out = {}
    for name, t in tensors.items():
        out.setdefault(re.sub(r"\.layers\.\d+\.", ".layers.*.", name), []).append(t.float().flatten())
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def both():
    torch.manual_seed(0)
    reference = ReferenceLCL(CONFIG)
    model_cfg = model_config_from_openclip(CONFIG)
    ref = families(from_openclip_state_dict({k: v.detach() for k, v in reference.state_dict().items()}, model_cfg))
    torch.manual_seed(1)
    ours = families(model_tensors(build_model(Config(model=model_cfg)).state_dict()))
    return ref, ours


def test_every_family_has_the_references_std(both):
    ref, ours = both
    assert ref.keys() == ours.keys()
    for name in ref:
        if ref[name].numel() < 2 or name == "logit_scale":
            continue
        r, o = float(ref[name].std()), float(ours[name].std())
        if r == 0:
            assert o == 0, name
        else:
            assert o == pytest.approx(r, rel=0.05), name
        assert float(ours[name].mean()) == pytest.approx(float(ref[name].mean()), abs=0.05 * max(r, 1e-3) + 0.02), name


def test_openclip_text_init_differs_where_the_reference_does(both):
    ref, _ = both
    model_cfg = model_config_from_openclip(CONFIG)
    model_cfg.init = "openclip_text"
    torch.manual_seed(1)
    other = families(model_tensors(build_model(Config(model=model_cfg)).state_dict()))
    assert float(other["visual.layers.*.mlp.linear_fc1.bias"].abs().max()) == 0  # zero biases
    assert float(ref["visual.layers.*.mlp.linear_fc1.bias"].std()) > 0
