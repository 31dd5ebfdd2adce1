"""The causal language model: megatron-core layers between a vocab-parallel
embedding and a vocab-parallel LM head.

`arch: clip` is the reference's decoder (learned absolute positions, LayerNorm,
GELU); `arch: llama` uses rotary positions, RMSNorm, SwiGLU and grouped-query
attention. The image tokens replace the `<img_placehold>` embeddings.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from torch import nn

from lcl_megatron import tokens
from lcl_megatron.config import TextConfig
from lcl_megatron.model.layers import build_layers, run_layers, transformer_layer_spec
from lcl_megatron.model.norms import build_norm


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocab rows are split evenly over TP ranks; the padding rows are masked out of the softmax."""
    return math.ceil(vocab_size / tp) * tp


class LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig, tconfig, checkpoint_layers: bool = False):
        super().__init__()
        width = cfg.width
        self.arch = cfg.arch
        self.vocab_size = cfg.vocab_size
        self.checkpoint_layers = checkpoint_layers
        tp = tconfig.tensor_model_parallel_size
        init = torch.nn.init.normal_
        self.token_embedding = VocabParallelEmbedding(
            padded_vocab_size(cfg.vocab_size, tp), width, init_method=lambda w: init(w, std=0.02), config=tconfig)
        if cfg.arch == "clip":
            self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, width) * 0.01)
            self.rotary = None
        else:
            self.positional_embedding = None
            self.rotary = RotaryEmbedding(kv_channels=width // cfg.heads, rotary_percent=1.0,
                                          rotary_base=cfg.rotary_base, use_cpu_initialization=True)
        self.layers = build_layers(tconfig, transformer_layer_spec(causal=True))
        # ln_final + text_projection give the context feature; lm_head is its own norm + linear.
        self.ln_final = build_norm(tconfig, width)
        self.text_projection = nn.Parameter(torch.randn(width, width) * width ** -0.5)
        self.head_norm = build_norm(tconfig, width)
        self.output_layer = ColumnParallelLinear(
            width, padded_vocab_size(cfg.vocab_size, tp), config=tconfig,
            init_method=lambda w: init(w, std=width ** -0.5), bias=False, gather_output=False)

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L], image_tokens [N, P, D] -> embeddings [B, L, D] with images spliced in."""
        x = self.token_embedding(input_ids)
        img_mask = input_ids == tokens.IMG_ID
        if image_tokens.numel():
            x = x.masked_scatter(img_mask.unsqueeze(-1), image_tokens.to(x.dtype))
        if self.positional_embedding is not None:
            x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        return x

    def forward(self, embeddings: torch.Tensor, packed_seq_params=None) -> torch.Tensor:
        """[B, L, D] -> LM outputs [B, L, D] (before ln_final / the head's norm)."""
        x = embeddings.transpose(0, 1)
        kwargs = {"packed_seq_params": packed_seq_params} if packed_seq_params is not None else {}
        if self.rotary is not None:
            kwargs["rotary_pos_emb"] = self.rotary(x.shape[0])
        x = run_layers(self.layers, x, checkpoint=self.checkpoint_layers, **kwargs)
        return x.transpose(0, 1)

    def context_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM outputs at <start_of_img> [n, D] -> L2-normalised context features [n, D] in fp32."""
        feats = self.ln_final(hidden) @ self.text_projection.to(hidden.dtype)
        return torch.nn.functional.normalize(feats.float(), dim=-1)
