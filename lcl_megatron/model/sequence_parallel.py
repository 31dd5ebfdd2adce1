"""Sequence parallelism around megatron-core layers, on CPU and GPU alike.

Between layers each tensor-parallel rank keeps only its slice of the sequence
([s/tp, b, h]); a column-parallel linear all-gathers the sequence first and a
row-parallel linear reduce-scatters its output back to slices (Megatron-LM's
scheme). megatron-core's own sequence-parallel path allocates its buffers with
`torch.cuda.current_device()`, so these layers take its place in the spec.
Parameters that see only a slice of the sequence (norms inside the layers,
row-parallel biases) get gradients summed over the TP group by a hook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from kernels.collectives import all_gather_into, all_gather_rows, reduce_scatter_into, reduce_scatter_rows_with_grad


def _group():
    return parallel_state.get_tensor_model_parallel_group()


def _own_slice(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)].contiguous()


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _own_slice(x, _group())

    @staticmethod
    def backward(ctx, grad):
        return all_gather_rows(grad, _group())


class _GatherForReplicated(torch.autograd.Function):
    """All-gather whose backward keeps this rank's slice: the gradients of a replicated
    computation are equal on every rank. (Into a tensor-parallel computation they are partial
    sums: the column linear's backward reduce-scatters them.)"""

    @staticmethod
    def forward(ctx, x):
        return all_gather_rows(x, _group())

    @staticmethod
    def backward(ctx, grad):
        return _own_slice(grad, _group())


def scatter_to_sequence(x: torch.Tensor) -> torch.Tensor:
    """Full [s, b, h] (identical on every TP rank) -> this rank's [s/tp, b, h]."""
    return _ScatterToSequence.apply(x)


def gather_from_sequence(x: torch.Tensor) -> torch.Tensor:
    """This rank's [s/tp, b, h] -> full [s, b, h] feeding replicated computation."""
    return _GatherForReplicated.apply(x)


class _GatheredInputLinear(torch.autograd.Function):
    """y = all-gather(x) @ W^T over the sequence, with Megatron-LM's overlapped backward: the input
    is gathered again (only this rank's slice is kept between forward and backward) while the
    input gradient is computed, and that gradient is reduce-scattered back to the slices' owners
    while the weight gradient is computed."""

    @staticmethod
    def forward(ctx, x, weight, group):
        ctx.save_for_backward(x, weight)
        ctx.group = group
        return F.linear(all_gather_rows(x, group), weight)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        group = ctx.group
        world = dist.get_world_size(group)
        gathered = x.new_empty((world * x.shape[0], *x.shape[1:]))
        gathering = all_gather_into(gathered, x.contiguous(), group=group, async_op=True)
        grad_gathered = grad_output.matmul(weight)  # while the input is gathered
        gathering.wait()
        grad_x = grad_gathered.new_empty((x.shape[0], *grad_gathered.shape[1:]))
        scattering = reduce_scatter_into(grad_x, grad_gathered.contiguous(), group=group, async_op=True)
        grad_weight = None
        if ctx.needs_input_grad[1]:  # while the input gradient is reduce-scattered
            grad_weight = grad_output.reshape(-1, grad_output.shape[-1]).t().matmul(
                gathered.reshape(-1, gathered.shape[-1]))
        scattering.wait()
        return grad_x, grad_weight, None


class SequenceParallelColumnLinear(ColumnParallelLinear):
    """Column-parallel linear on sequence slices: gathers the sequence, keeps its output columns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.gather_output:
            raise ValueError("a sequence-parallel column linear keeps its output columns (gather_output=False)")

    def forward(self, input_, weight=None, runtime_gather_output=None):
        output = _GatheredInputLinear.apply(input_, self.weight if weight is None else weight, _group())
        if self.bias is None or self.skip_bias_add:
            return output, self.bias
        return output + self.bias, None


class SequenceParallelRowLinear(RowParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.bias is not None:
            self.bias.sequence_parallel = True

    def forward(self, input_):
        output = reduce_scatter_rows_with_grad(F.linear(input_, self.weight), _group())
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None


def install_grad_hooks(model: torch.nn.Module) -> None:
    """Sum, over the TP group, the gradients of parameters that saw one sequence slice."""
    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return

    def all_reduce(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=_group())
        return grad

    for p in model.parameters():
        if getattr(p, "sequence_parallel", False):
            p.register_hook(all_reduce)
