"""The LCL model: ViT -> attentive pool-project -> image tokens spliced into a causal LM.

`forward` returns the losses (the LM head and the contrastive gather run
inside it, so that ZeRO-3 can gather their parameters like any other module),
or only the contrastive features (the feature cache of gradient accumulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from torch import nn

from lcl_megatron import tokens
from lcl_megatron.config import Config, LossConfig, ModelConfig
from lcl_megatron.loss import (Accumulation, combine_losses, contrastive_loss_sum, regression_loss_sum,
                               with_gradient_scaled, zero_keeping_graph)
from lcl_megatron.model.language_model import LanguageModel
from lcl_megatron.model.backends import LocalBackend, backend_for_this_machine
from lcl_megatron.model.dims import exp_logit_scale
from lcl_megatron.model.layers import transformer_config
from lcl_megatron.model.names import FP32_PARAMETERS
from lcl_megatron.model.pool_project import AttentivePoolProject
from lcl_megatron.model.sequence_parallel import install_grad_hooks
from lcl_megatron.model.sharding import mark_glu
from lcl_megatron.model.vision import VisionTransformer


def context_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None) -> torch.Tensor:
    """<start_of_img> positions that have context before them: not at the start of a row
    or, in packed rows, of a document."""
    soi = (input_ids == tokens.SOI_ID) & attention_mask
    soi[:, 0] = False
    if position_ids is not None:
        soi &= position_ids > 0
    return soi


def generation_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None):
    """Positions whose next token is predicted, and those next tokens.

    Image placeholders and <end_of_img> are never predicted; padding is
    recognised by the mask, never by id 0 (a real BPE token); in packed rows a
    document's first token is not predicted from the previous document.
    """
    nxt = input_ids[:, 1:]
    mask = attention_mask[:, 1:] & (nxt != tokens.IMG_ID) & (nxt != tokens.EOI_ID)
    if position_ids is not None:
        mask &= position_ids[:, 1:] > 0
    return mask, nxt[mask]


def loss_counts(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None):
    """(predicted tokens, image latent / context pairs) of a batch: what its losses are normalised by."""
    attention_mask = attention_mask.bool()
    return (generation_targets(input_ids, attention_mask, position_ids)[0].sum(),
            context_positions(input_ids, attention_mask, position_ids).sum())


def packed_params(cu_seqlens, row_length: int):
    """megatron's PackedSeqParams for documents packed into rows (sbhd layout, flattened offsets).

    No document is longer than a row: the row length bounds them without reading cu_seqlens back.
    """
    if cu_seqlens is None:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = cu_seqlens.to(torch.int32)
    max_seqlen = row_length
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


class LCLModel(nn.Module):
    def __init__(self, cfg: ModelConfig, loss: LossConfig, *, backend: type[LocalBackend] = LocalBackend, tp: int = 1,
                 sp: bool = False, dtype=torch.float32, checkpoint_vit: bool = False, checkpoint_lm: bool = False):
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        v, t = cfg.vision, cfg.text
        # The ViT's sequence (patches + class token) is sliced only when it divides evenly.
        vit_sp = sp and (v.num_patches + 1) % tp == 0
        vit_config = transformer_config(width=v.width, heads=v.heads, layers=v.layers, arch="clip",
                                        ffn_hidden_size=v.ffn_width,
                                        tp=tp, dtype=dtype)
        lm_config = transformer_config(width=t.width, heads=t.heads, layers=t.layers, arch=t.arch,
                                       ffn_hidden_size=t.ffn_width, tp=tp, dtype=dtype,
                                       num_query_groups=t.num_query_groups or t.heads)
        self.visual = VisionTransformer(v, vit_config, backend(sequence_parallel=vit_sp), checkpoint_layers=checkpoint_vit)
        self.pool_project = AttentivePoolProject(v.width, cfg.embed_dim, cfg.pool_heads)
        self.text = LanguageModel(t, lm_config, backend(sequence_parallel=sp), loss.impl, checkpoint_layers=checkpoint_lm)
        # Shape [1], not the reference's []: DeepSpeed cannot broadcast 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))  # see FP32_PARAMETERS
        self.loss_weights = {"generation_weight": loss.generation_weight, "contrastive_weight": loss.contrastive_weight,
                             "regression_weight": loss.regression_weight}
        self.loss_impl = loss.impl
        fp32 = {name: getattr(self, name).data for name in FP32_PARAMETERS}
        self.to(dtype)
        for name, data in fp32.items():
            getattr(self, name).data = data
        mark_glu(self)
        install_grad_hooks(self)

    @classmethod
    def from_config(cls, cfg: Config, backend: type[LocalBackend] | None = None) -> "LCLModel":
        """The model of `cfg` with the layer modules of `backend` (default: the best this machine runs)."""
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        model = cls(cfg.model, cfg.loss, backend=backend or backend_for_this_machine(), tp=cfg.parallel.tp,
                    sp=cfg.parallel.sp, dtype=dtype, checkpoint_vit=cfg.parallel.activation_checkpointing_vit,
                    checkpoint_lm=cfg.parallel.activation_checkpointing_lm)
        if cfg.model.init == "reference" and not model.logit_scale.is_meta:
            from lcl_megatron.model.init import reference_init_

            reference_init_(model, cfg.model)
        return model

    def scale(self) -> torch.Tensor:
        return exp_logit_scale(self.logit_scale)

    def encode_images(self, images: torch.Tensor):
        """images [N, 3, H, W] -> (latents [N, D], image tokens [N, P, D])."""
        return self.pool_project(self.visual(images))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encode_images(images)[0].float(), dim=-1)

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Zero-shot text features: the context feature at the one <start_of_img> of each row.

        Rows are in the zero-shot layout (see `zeroshot_text_ids`); right-padded rows
        are fine because attention is causal.
        """
        embeddings = self.text.embedding(input_ids, input_ids.new_zeros(0))
        hidden = self.text(embeddings)
        return self.text.context_head(hidden[input_ids == tokens.SOI_ID])

    def encode_images_always(self, images: torch.Tensor):
        return encode_images_always(self.visual, self.pool_project, images, self.cfg.vision.image_size)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, *,
                accumulation: Accumulation | None = None, features_only: bool = False):
        """Losses of a batch; packed rows (several documents each) come with `position_ids`
        restarting at 0 per document and `cu_seqlens` over the flattened B x L tokens.

        `accumulation`: the batch is one micro-batch of an optimizer step whose
        negatives and counts span every micro-batch. `features_only`: only the
        (image, context) features of the contrastive term, for that cache.
        """
        if (position_ids is None) != (cu_seqlens is None):
            raise ValueError("packed batches need both position_ids and cu_seqlens")
        latents, image_tokens = self.encode_images_always(images)
        hidden = self.text(self.text.embedding(input_ids, image_tokens, position_ids), packed_params(cu_seqlens, input_ids.shape[1]))
        attention_mask = attention_mask.bool()
        if features_only:
            return contrastive_features(latents, hidden, input_ids, attention_mask, position_ids, self.text.context_head)
        return lcl_losses(latents, hidden, input_ids, attention_mask, position_ids,
                          context_head=self.text.context_head, lm_head=self.text.lm_head, scale=self.scale(),
                          impl=self.loss_impl, accumulation=accumulation, **self.loss_weights)


def encode_images_always(visual, pool_project, images: torch.Tensor, image_size: int):
    """(latents [N, D], image tokens [N, P, D]); the ViT also runs when N == 0.

    Skipping it would skip ZeRO-3 gathers and gradient buckets that other ranks
    enter (a hang); with no image a blank one runs and empty slices of its
    outputs carry exact zero gradients to every vision parameter.
    """
    if images.shape[0] > 0:
        return pool_project(visual(images))
    latents, image_tokens = pool_project(visual(images.new_zeros(1, 3, image_size, image_size)))
    return latents[:0], image_tokens[:0]


def contrastive_features(latents, hidden, input_ids, attention_mask, position_ids, context_head, keep=True):
    """(image features, context features) [n, D], L2-normalised fp32: each image latent that
    has context and the LM output at its <start_of_img>; no rows unless `keep`."""
    ctx = context_positions(input_ids, attention_mask, position_ids)
    has_context = ctx[input_ids == tokens.SOI_ID]  # per image, in row-major order
    pairs = slice(None) if keep else slice(0)
    return F.normalize(latents[has_context][pairs].float(), dim=-1), context_head(hidden[ctx][pairs])


def lcl_losses(latents, hidden, input_ids, attention_mask, position_ids=None, *, context_head, lm_head, scale, impl,
               generation_weight, contrastive_weight, regression_weight=0.0, accumulation: Accumulation | None = None):
    """The LCL losses from the image latents [N, D] and the LM outputs [B, L, D].

    Shared by the plain model and the last pipeline stage. A term of weight 0 is
    not computed: its heads run on zero rows instead, so that every parameter
    still takes part (with exact zero gradients) and the gradient reductions and
    ZeRO gathers stay the same whatever the weights.
    """
    dp_group = parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None
    image_feats, context_feats = contrastive_features(latents, hidden, input_ids, attention_mask, position_ids,
                                                      context_head, keep=contrastive_weight > 0 or regression_weight > 0)
    num_tokens, num_pairs = loss_counts(input_ids, attention_mask, position_ids)
    negatives, micro_batches = (image_feats, context_feats), 1
    if accumulation is not None:
        num_tokens, num_pairs = accumulation.num_tokens, accumulation.num_pairs
        if accumulation.image_features:  # empty when the contrastive term is off
            negatives, micro_batches = accumulation.with_live(image_feats, context_feats), len(accumulation.image_features)
            # The logit scale is live in every micro-batch's copy of the step's contrastive loss
            # (the features only in their own): each copy takes its share of the scale's gradient.
            scale = with_gradient_scaled(scale, 1 / micro_batches)
    if contrastive_weight > 0:
        con_sum = contrastive_loss_sum(*negatives, scale, dp_group, impl)
    else:
        con_sum = zero_keeping_graph(image_feats, context_feats, scale)
    reg_sum = regression_loss_sum(image_feats, context_feats) if regression_weight > 0 else None

    gen_mask, targets = generation_targets(input_ids, attention_mask, position_ids)
    rows = slice(None) if generation_weight > 0 else slice(0)
    gen_sum = lm_head(hidden[:, :-1][gen_mask][rows], targets[rows])
    out = combine_losses(gen_sum, num_tokens, con_sum, num_pairs, reg_sum, group=dp_group,
                         generation_weight=generation_weight, contrastive_weight=contrastive_weight,
                         regression_weight=regression_weight, contrastive_micro_batches=micro_batches)
    out["logit_scale"] = scale.detach()
    return out


def zeroshot_text_ids(token_rows: torch.Tensor, context_length: int) -> torch.Tensor:
    """Reference zero-shot layout: <end_of_text> becomes <start_of_img>, rows cut to 77
    tokens (or the model's context if shorter), ending in <start_of_img> if the cut removed it."""
    ids = token_rows.clone()
    ids[ids == tokens.EOT_ID] = tokens.SOI_ID
    ids = ids[:, : min(tokens.ZEROSHOT_CONTEXT_LENGTH, context_length)]
    missing = (ids == tokens.SOI_ID).sum(-1) == 0
    ids[missing, -1] = tokens.SOI_ID
    return ids
