"""Backend spec providers (model/backends.py): the decision table, and the local provider building
exactly the layers the hand-written megatron-core spec builds."""

from __future__ import annotations

import itertools

import pytest
import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from lcl_megatron.model.backends import (ApexBackend, LocalBackend, TransformerEngineBackend, backend_for_this_machine,
                                         choose_backend)
from lcl_megatron.model.core_attention import CoreAttention
from lcl_megatron.model.layers import build_layers, transformer_config
from lcl_megatron.model.norms import build_norm


@pytest.mark.parametrize("on_cuda,te,apex", list(itertools.product([False, True], repeat=3)))
def test_decision_table(on_cuda, te, apex):
    expected = LocalBackend if not on_cuda else TransformerEngineBackend if te else ApexBackend if apex else LocalBackend
    assert choose_backend(on_cuda, te, apex) is expected


def test_this_cpu_machine_gets_the_local_provider():
    assert not torch.cuda.is_available()
    assert backend_for_this_machine() is LocalBackend


class _TorchNorm:
    """The norm the layer spec used before providers: torch's, no sequence parallelism."""

    def __new__(cls, config, hidden_size, eps=1e-5, **_unused):
        return build_norm(config, hidden_size, eps)


def _hand_written_spec(causal: bool) -> ModuleSpec:
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=_TorchNorm,
        self_attention=ModuleSpec(module=SelfAttention,
                                  params={"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask},
                                  submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                                     core_attention=CoreAttention,
                                                                     linear_proj=RowParallelLinear)),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=_TorchNorm,
        mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                           linear_fc2=RowParallelLinear)),
        mlp_bda=get_bias_dropout_add))


@pytest.mark.parametrize("arch,causal", [("clip", False), ("llama", True)])
def test_local_provider_builds_the_hand_written_layers(arch, causal):
    from lcl_megatron.model.build import ensure_single_process_groups

    ensure_single_process_groups()
    config = transformer_config(width=64, heads=4, layers=2, ffn_hidden_size=160, arch=arch)
    torch.manual_seed(0)
    ours = build_layers(config, LocalBackend(), causal=causal)
    torch.manual_seed(0)
    theirs = torch.nn.ModuleList(build_module(_hand_written_spec(causal), config=config, layer_number=i + 1)
                                 for i in range(2))
    assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) if a[k] is not None else b[k] is None for k in a)  # None: megatron's extra state
    assert not any(getattr(p, "sequence_parallel", False) for p in ours.parameters())
    x = torch.randn(8, 2, 64)
    assert torch.equal(ours[0](x, attention_mask=None)[0], theirs[0](x, attention_mask=None)[0])


def test_sequence_parallel_provider_marks_its_norms():
    backend = LocalBackend(sequence_parallel=True)
    assert backend.column_parallel_linear().__name__ == "SequenceParallelColumnLinear"
    norm = build_module(backend.layer_norm(), config=transformer_config(width=8, heads=2, layers=1,
                                                                        ffn_hidden_size=32, arch="clip"),
                        hidden_size=8, eps=1e-5)
    assert all(p.sequence_parallel for p in norm.parameters())
