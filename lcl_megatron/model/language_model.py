"""The causal language model: megatron-core layers between a vocab-parallel
embedding and a vocab-parallel LM head.

`arch: clip` is the reference's decoder (learned absolute positions, LayerNorm,
GELU); `arch: llama` uses rotary positions, RMSNorm, SwiGLU and grouped-query
attention. Every parameter is used inside the forward of the module that owns
it (embedding, layers, context head, LM head): ZeRO-3 gathers parameters per
module forward, and pipeline stages are cut along these modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from torch import nn

from lcl_megatron import tokens
from lcl_megatron.config import TextConfig
from lcl_megatron.loss import token_cross_entropy_sum
from lcl_megatron.model.layers import build_layers, run_layers
from lcl_megatron.model.norms import build_norm
from lcl_megatron.model.rotary import RotaryEmbedding
from lcl_megatron.model.sequence_parallel import gather_from_sequence, scatter_to_sequence


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocab rows are split evenly over TP ranks; the padding rows take no part in the softmax."""
    return math.ceil(vocab_size / tp) * tp


def vocab_rows_init(vocab_size: int, std: float):
    """Initialise the real vocabulary rows of a (padded) master weight; zero the padding.

    The random stream then does not depend on the TP size, so every layout starts
    from the same weights as one process.
    """

    def init(weight: torch.Tensor) -> None:
        with torch.no_grad():
            torch.nn.init.normal_(weight[:vocab_size], std=std)
            weight[vocab_size:].zero_()

    return init


class TextEmbedding(nn.Module):
    """Token embeddings with the image tokens spliced in at `<img_placehold>`, plus positions."""

    def __init__(self, cfg: TextConfig, tconfig):
        super().__init__()
        tp = tconfig.tensor_model_parallel_size
        self.token_embedding = VocabParallelEmbedding(
            padded_vocab_size(cfg.vocab_size, tp), cfg.width, config=tconfig,
            init_method=vocab_rows_init(cfg.vocab_size, std=0.02))
        self.positional_embedding = (nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
                                     if cfg.arch == "clip" else None)

    def forward(self, input_ids: torch.Tensor, image_tokens: torch.Tensor, position_ids=None) -> torch.Tensor:
        """input_ids [B, L], image_tokens [N, P, D] -> [B, L, D]; positions restart per packed document."""
        x = self.token_embedding(input_ids)
        # Also with no image (an empty source): every rank's graph must hold the same modules.
        x = x.masked_scatter((input_ids == tokens.IMG_ID).unsqueeze(-1), image_tokens.to(x.dtype))
        if self.positional_embedding is not None:
            positions = self.positional_embedding[: x.shape[1]] if position_ids is None \
                else self.positional_embedding[position_ids]
            x = x + positions.to(x.dtype)
        return x


class ContextHead(nn.Module):
    """LM outputs at <start_of_img> -> L2-normalised context features (ln_final, text_projection)."""

    def __init__(self, width: int, tconfig):
        super().__init__()
        self.ln_final = build_norm(tconfig, width)
        self.text_projection = nn.Parameter(torch.randn(width, width) * width ** -0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        feats = self.ln_final(hidden) @ self.text_projection.to(hidden.dtype)
        return F.normalize(feats.float(), dim=-1)


class LMHead(nn.Module):
    """Norm + column-parallel linear over the vocabulary; returns the summed token cross-entropy."""

    def __init__(self, cfg: TextConfig, tconfig, impl: str):
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.impl = impl
        self.norm = build_norm(tconfig, cfg.width)
        self.output_layer = ColumnParallelLinear(
            cfg.width, padded_vocab_size(cfg.vocab_size, tconfig.tensor_model_parallel_size), config=tconfig,
            init_method=vocab_rows_init(cfg.vocab_size, std=cfg.width ** -0.5), bias=False, gather_output=False)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_cross_entropy_sum(self.norm(hidden), self.output_layer, targets, self.vocab_size, self.impl)


class LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig, tconfig, backend, loss_impl: str, checkpoint_layers: bool = False):
        super().__init__()
        self.checkpoint_layers = checkpoint_layers
        self.embedding = TextEmbedding(cfg, tconfig)
        self.rotary = RotaryEmbedding(cfg.width // cfg.heads, cfg.rotary_base) if cfg.arch == "llama" else None
        self.sequence_parallel = backend.sequence_parallel
        self.layers = build_layers(tconfig, backend, causal=True)
        self.context_head = ContextHead(cfg.width, tconfig)
        self.lm_head = LMHead(cfg, tconfig, loss_impl)

    def forward(self, embeddings: torch.Tensor, packed_seq_params=None) -> torch.Tensor:
        """Embeddings [B, L, D] -> LM outputs [B, L, D] (before ln_final / the head's norm)."""
        x = embeddings.transpose(0, 1)  # megatron layers take [s, b, h]
        kwargs = {"packed_seq_params": packed_seq_params} if packed_seq_params is not None else {}
        if self.rotary is not None and packed_seq_params is not None:
            raise NotImplementedError("packed sequences need learned positions (model.text.arch=clip); the layout check refuses packing with llama")
        if self.rotary is not None:
            kwargs["rotary_pos_emb"] = self.rotary(x.shape[0], x.device)
        if self.sequence_parallel:
            x = scatter_to_sequence(x)
        x = run_layers(self.layers, x, checkpoint=self.checkpoint_layers, **kwargs)
        if self.sequence_parallel:
            x = gather_from_sequence(x)
        return x.transpose(0, 1)
