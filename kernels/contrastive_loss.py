"""Symmetric InfoNCE of local rows against gathered columns, without the logits matrix.

loss = (CE(s * img @ all_txt^T, targets) + CE(s * txt @ all_img^T, targets)) / 2

Both directions are a softmax over the M gathered columns for each of the n
local rows, i.e. a linear cross-entropy with `all_*` as the "weight" and the
temperature `s` as a scale: `chunked_linear_ce` computes each one a chunk of
rows at a time with the online log-sum-exp of `cross_entropy_rows` (invalid
columns, the zero padding of ranks with fewer pairs, are masked to -inf).
Memory is linear in n + M: the gradients of the four feature tensors plus one
[rows, M] chunk. All math is fp32, as in the reference.

In data parallelism `all_*` come from an all-gather with gradient and
`image_features` / `text_features` are this rank's own rows (usually also
inside `all_*`); the gradients returned for each input are those of this
rank's loss, and autograd adds the two paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import pick_impl
from kernels.chunked_linear_ce import chunked_linear_cross_entropy

# A chunk of rows x M fp32 scores on GPU: small, since the memory saving is the point here.
CONTRASTIVE_CHUNK_BYTES = {"cuda": 64 << 20, "cpu": 32 << 20}
REDUCTIONS = ("mean", "sum")


def _check(image_features, text_features, all_image_features, all_text_features, logit_scale, targets,
           column_valid, reduction):
    n, width = image_features.shape
    m = all_image_features.shape[0]
    if text_features.shape != (n, width) or all_text_features.shape != (m, width) or all_image_features.shape != (m, width):
        raise ValueError("expected image/text features [n, D] and all image/text features [M, D], got "
                         f"{[tuple(t.shape) for t in (image_features, text_features, all_image_features, all_text_features)]}")
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must hold one value, got shape {tuple(logit_scale.shape)}")
    if targets.shape != (n,):
        raise ValueError(f"expected targets [{n}], got {tuple(targets.shape)}")
    if column_valid is not None and (column_valid.shape != (m,) or column_valid.dtype != torch.bool):
        raise ValueError(f"column_valid must be a bool tensor [{m}]")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


class ContrastiveLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_features, text_features, all_image_features, all_text_features, logit_scale,
                targets, column_valid, reduction, impl, chunk_rows, needs):
        n = image_features.shape[0]
        scale = logit_scale.detach().float().reshape(())
        row_weight = torch.full((n,), 0.5 / max(n, 1) if reduction == "mean" else 0.5,
                                dtype=torch.float32, device=image_features.device)
        need_img, need_txt, need_all_img, need_all_txt, need_scale = needs
        chunk_bytes = CONTRASTIVE_CHUNK_BYTES.get(image_features.device.type, CONTRASTIVE_CHUNK_BYTES["cpu"])

        def direction(rows, cols, need_rows, need_cols):
            return chunked_linear_cross_entropy(
                rows.float(), cols.float(), targets, row_weight, impl=impl, scale=scale, col_valid=column_valid,
                need_grad_hidden=need_rows, need_grad_weight=need_cols, need_grad_scale=need_scale,
                chunk_rows=chunk_rows, chunk_bytes=chunk_bytes)

        loss_i2t, grad_img, grad_all_txt, scale_i2t = direction(image_features, all_text_features, need_img, need_all_txt)
        loss_t2i, grad_txt, grad_all_img, scale_t2i = direction(text_features, all_image_features, need_txt, need_all_img)
        grad_scale = scale_i2t + scale_t2i if need_scale else None
        ctx.save_for_backward(grad_img, grad_txt, grad_all_img, grad_all_txt, grad_scale)
        ctx.meta = [(t.dtype, t.shape) for t in (image_features, text_features, all_image_features,
                                                 all_text_features, logit_scale)]
        return loss_i2t + loss_t2i

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads = [None if g is None else g.mul_(grad_loss).to(dtype).reshape(shape)
                 for g, (dtype, shape) in zip(ctx.saved_tensors, ctx.meta)]
        return (*grads,) + (None,) * 6


def contrastive_loss(image_features, text_features, all_image_features, all_text_features, logit_scale,
                     targets, column_valid=None, reduction="mean", *, impl=None, chunk_rows=None):
    """(CE(s * img @ all_txt^T) + CE(s * txt @ all_img^T)) / 2 over the n local rows.

    image_features, text_features [n, D]; all_image_features, all_text_features [M, D];
    logit_scale: the temperature s, already exponentiated (one value); targets [n]:
    the column of each row's positive; column_valid [M] bool or None: False columns
    are masked out. "mean" averages over the n rows, "sum" adds them (the two
    directions are always averaged). `impl`/`chunk_rows` as in fused_linear_cross_entropy.
    """
    _check(image_features, text_features, all_image_features, all_text_features, logit_scale, targets,
           column_valid, reduction)
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t.requires_grad for t in (image_features, text_features, all_image_features,
                                                         all_text_features, logit_scale))
    return ContrastiveLossFunction.apply(
        image_features, text_features, all_image_features, all_text_features, logit_scale,
        targets.long().contiguous(), None if column_valid is None else column_valid.contiguous(), reduction,
        pick_impl(image_features, impl), chunk_rows, needs)


def contrastive_loss_reference(image_features, text_features, all_image_features, all_text_features, logit_scale,
                               targets, column_valid=None, reduction="mean"):
    """Plain torch: both [n, M] score matrices in full, in the inputs' dtype."""
    logits_i2t = logit_scale * image_features @ all_text_features.t()
    logits_t2i = logit_scale * text_features @ all_image_features.t()
    if column_valid is not None:
        logits_i2t = logits_i2t.masked_fill(~column_valid, float("-inf"))
        logits_t2i = logits_t2i.masked_fill(~column_valid, float("-inf"))
    return (F.cross_entropy(logits_i2t, targets, reduction=reduction)
            + F.cross_entropy(logits_t2i, targets, reduction=reduction)) / 2
