"""Core attention for megatron-core layer specs: `kernels.attention` (SDPA, PyTorch varlen, flash-attn).

megatron-core's own DotProductAttention allocates CUDA buffers; this module
takes its place in the layer spec (`SelfAttentionSubmodules.core_attention`).
It receives megatron's [s, b, heads, head_dim] tensors (heads already split
over the tensor-parallel group) and returns [s, b, heads * head_dim].
"""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from kernels.attention import attention


class CoreAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type="self",
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("attention dropout is not supported (the LCL recipe uses none)")
        self.causal = attn_mask_type == AttnMaskType.causal
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("CoreAttention masks by causality and document boundaries only")
        causal = self.causal if attn_mask_type is None else attn_mask_type == AttnMaskType.causal
        # megatron: [s, b, h, d] -> kernels.attention: [b, s, h, d]
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        cu_seqlens = max_seqlen = None
        if packed_seq_params is not None:
            cu_seqlens, max_seqlen = packed_seq_params.cu_seqlens_q, packed_seq_params.max_seqlen_q
        out = attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                        softmax_scale=self.softmax_scale)
        b, s = query.shape[1], query.shape[0]
        return out.reshape(b, s, -1).transpose(0, 1).contiguous()
