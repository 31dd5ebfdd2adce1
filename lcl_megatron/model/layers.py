"""megatron-core transformer layers for the ViT and the language model.

Both towers are plain stacks of megatron-core `TransformerLayer`s built from a
module spec whose modules come from a backend spec provider (model/backends.py);
swapping an implementation (attention kernel, norm, linear) means choosing
another provider, never changing the model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from lcl_megatron.model.backends import LocalBackend


def transformer_config(*, width: int, heads: int, layers: int, ffn_hidden_size: int, arch: str,
                       tp: int = 1, dtype: torch.dtype = torch.float32,
                       num_query_groups: int | None = None) -> TransformerConfig:
    """A TransformerConfig for CPU or GPU with the fusions that need CUDA extensions turned off.

    Weights start as OpenCLIP's text transformer does: input projections with
    std width^-0.5, output projections with std width^-0.5 (2 layers)^-0.5
    (megatron's default of 0.02 leaves the blocks near identity, and the
    context features of different texts nearly equal at the start).
    """
    llama = arch == "llama"
    input_std = width ** -0.5
    output_std = input_std * (2 * layers) ** -0.5
    config = TransformerConfig(
        num_layers=layers,
        hidden_size=width,
        num_attention_heads=heads,
        num_query_groups=num_query_groups or heads,
        ffn_hidden_size=ffn_hidden_size,
        kv_channels=width // heads,
        layernorm_epsilon=1e-5,
        normalization="RMSNorm" if llama else "LayerNorm",
        activation_func=F.silu if llama else F.gelu,
        gated_linear_unit=llama,
        add_bias_linear=not llama,
        add_qkv_bias=not llama,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        sequence_parallel=False,  # megatron's own SP path needs CUDA; see sequence_parallel.py
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Master weights are initialised whole on the CPU and then split, so every layout
        # starts from the same weights (DeepSpeed moves the model to the GPU afterwards).
        use_cpu_initialization=True,
        init_method=lambda w: torch.nn.init.normal_(w, std=input_std),
        output_layer_init_method=lambda w: torch.nn.init.normal_(w, std=output_std),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
    return config


def transformer_layer_spec(backend: LocalBackend, causal: bool, rms_norm: bool = False) -> ModuleSpec:
    """A pre-norm layer (norm, self-attention, norm, MLP) from the provider's modules."""
    column, row, norm = backend.column_parallel_linear(), backend.row_parallel_linear(), backend.layer_norm(rms_norm)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    core_attention=backend.core_attention(),
                    linear_proj=row,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def build_layers(config: TransformerConfig, backend: LocalBackend, causal: bool) -> torch.nn.ModuleList:
    spec = transformer_layer_spec(backend, causal, rms_norm=config.normalization == "RMSNorm")
    return torch.nn.ModuleList(build_module(spec, config=config, layer_number=i + 1)
                               for i in range(config.num_layers))


def run_layers(layers, hidden, *, checkpoint: bool = False, **kwargs):
    """Run [s, b, h] hidden states through `layers`, optionally recomputing each in backward."""
    for layer in layers:
        if checkpoint and torch.is_grad_enabled():
            hidden = torch.utils.checkpoint.checkpoint(
                lambda h, layer=layer: layer(h, attention_mask=None, **kwargs)[0], hidden, use_reentrant=False)
        else:
            hidden = layer(hidden, attention_mask=None, **kwargs)[0]
    return hidden

