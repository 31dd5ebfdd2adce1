"""Fused linear + cross-entropy for the LM head, plain and vocabulary-parallel.

The loss of `hidden @ weight^T` against `targets` without materialising the
logits: see `chunked_linear_ce` for the chunk loop and `cross_entropy_rows` for
the Triton kernels. `linear_cross_entropy_reference` is the plain-torch
computation the tests hold both paths to.

Semantics (both functions): rows whose target equals `ignore_index` take no
part; "mean" divides by the number of the other rows (a batch with none of them
gives loss 0 and zero gradients, where torch would give NaN); "sum" does not
divide. Other targets must lie in [0, V) (in [0, V_global) for the parallel
variant); they are not checked, as a check would stall the GPU stream.
Gradients are accumulated in fp32 and returned in the inputs' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import pick_impl
from kernels.chunked_linear_ce import chunked_linear_cross_entropy

REDUCTIONS = ("mean", "sum")


def _check(hidden, weight, targets, reduction):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _row_weights(targets, ignore_index, reduction):
    """Per-row loss multipliers: 0 for ignored rows, 1/count for the others under "mean"."""
    valid = targets != ignore_index
    row_weight = valid.float()
    if reduction == "mean":
        row_weight = row_weight / valid.sum().clamp(min=1)
    return row_weight, valid


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Loss forward; its gradients are computed in the same pass and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, impl, chunk_rows,
                need_grad_hidden, need_grad_weight, vocab_start, group):
        row_weight, valid = _row_weights(targets, ignore_index, reduction)
        local_targets = torch.where(valid, targets - vocab_start, -1)
        loss, grad_hidden, grad_weight, _ = chunked_linear_cross_entropy(
            hidden, weight, local_targets, row_weight, impl=impl, group=group, chunk_rows=chunk_rows,
            need_grad_hidden=need_grad_hidden, need_grad_weight=need_grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grads = [None if g is None else g.mul_(grad_loss).to(dtype) for g, dtype in zip((grad_hidden, grad_weight), ctx.dtypes)]
        return (*grads,) + (None,) * 9


def _apply(hidden, weight, targets, ignore_index, reduction, impl, chunk_rows, vocab_start, group):
    _check(hidden, weight, targets, reduction)
    grad_on = torch.is_grad_enabled()
    return FusedLinearCrossEntropyFunction.apply(
        hidden, weight, targets.long(), ignore_index, reduction, pick_impl(hidden, impl), chunk_rows,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad, vocab_start, group)


def fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", *,
                               impl=None, chunk_rows=None):
    """Cross-entropy of hidden [N, D] @ weight [V, D]^T against targets [N], one chunk of logits at a time.

    `impl` forces "triton" or "torch" (default: triton on CUDA or under the
    interpreter); `chunk_rows` overrides the rows per chunk.
    """
    return _apply(hidden, weight, targets, ignore_index, reduction, impl, chunk_rows, 0, None)


def vocab_parallel_fused_linear_cross_entropy(hidden, weight_shard, targets, vocab_start: int, group,
                                              ignore_index=-100, reduction="mean", *, impl=None, chunk_rows=None):
    """The same loss with the vocabulary split over the ranks of `group`.

    This rank holds rows [vocab_start, vocab_start + V_local) of the weight;
    `hidden` and the global `targets` are the same on every rank, and so is the
    returned loss. The weight gradient is this shard's. The hidden gradient is
    this rank's share (its vocabulary slice's term): the caller must all-reduce
    it over `group`, as Megatron does for the input of a column-parallel layer,
    e.g. by passing `copy_to_tensor_model_parallel_region(hidden)`.
    """
    return _apply(hidden, weight_shard, targets, ignore_index, reduction, impl, chunk_rows, vocab_start, group)


def linear_cross_entropy_reference(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    """Plain torch: the whole logits matrix in the inputs' dtype (16-bit logits upcast to fp32)."""
    logits = hidden @ weight.t()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)
