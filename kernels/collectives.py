"""Row-wise all-gather and reduce-scatter under the names this torch prefers.

torch renamed `all_gather_into_tensor` / `reduce_scatter_tensor` to `all_gather_single` /
`reduce_scatter_single` and warns (FutureWarning) on every call of the old names, once per
step per rank in a data-parallel run; older builds (a cluster's CUDA torch) have only the old names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's rows, concatenated along dim 0 in rank order."""
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    all_gather_into(out, x.contiguous(), group=group)
    return out


def reduce_scatter_rows(x: torch.Tensor, group) -> torch.Tensor:
    """The sum over ranks of `x`, of which each rank keeps its own 1/world of the rows."""
    world = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
    reduce_scatter_into(out, x.contiguous(), group=group)
    return out


class _GatherRowsWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_rows(grad, ctx.group), None


class _ReduceScatterRowsWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_rows(grad, ctx.group), None


def gather_rows_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    """`all_gather_rows` whose backward sums every rank's gradient contributions back to the
    rows' owner (a reduce-scatter): for rows that feed a computation each rank does in part."""
    return _GatherRowsWithGrad.apply(x, group)


def reduce_scatter_rows_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    """`reduce_scatter_rows` whose backward all-gathers the gradient."""
    return _ReduceScatterRowsWithGrad.apply(x, group)
