"""Linear layer + softmax cross-entropy in one pass over chunks of rows.

For each chunk of C rows: z = hidden_c @ weight^T (the only logits that ever
exist, in one buffer reused by every chunk; the torch path adds a work buffer
of the same size), per-row statistics (`cross_entropy_rows`), the loss, and,
when gradients are wanted, dloss/dz (over z on the Triton path), then dhidden_c = dz @ weight and
dweight += dz^T @ hidden_c accumulated in fp32. Like Liger-Kernel, gradients are
produced during the forward pass and the backward only scales them by the
incoming gradient: one product fewer than recomputing the logits, and the
training step always runs the backward. The three matrix products run on
cuBLAS/MKL, where they are fastest; Triton does the memory-bound row passes.

Cut Cross-Entropy goes further and never stores even a chunk of logits; at the
chunk sizes used here (a bounded number of bytes, see `default_chunk_rows`) the
chunk costs less memory than the fp32 weight gradient, and keeping the products
on cuBLAS keeps the tensor cores busy.

Vocabulary parallelism (`group`): each rank holds columns
[vocab_start, vocab_start + V_local); after the local statistics of a chunk
the ranks all-gather (max, sumexp, target logit) per row, as Megatron's
vocab-parallel cross-entropy does, and each rank continues with the global
log-sum-exp. No host synchronisation happens in the loop (shapes alone drive it).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from kernels.collectives import all_gather_into
from kernels.cross_entropy_rows import row_softmax

# Bytes of one chunk of logits by default: large chunks keep the fp32 weight-gradient
# update (a read and write of [V, D] per chunk) rare on GPU; small ones keep CPU memory low.
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 128 << 20}


def default_chunk_rows(n_rows: int, n_cols: int, element_size: int, device: torch.device,
                       chunk_bytes: int | None = None) -> int:
    budget = chunk_bytes if chunk_bytes is not None else CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    rows = budget // max(1, n_cols * element_size)
    if rows >= 256:
        rows -= rows % 128  # whole matmul tiles
    return max(1, min(n_rows, rows))


def _project_into(out, hidden_c, weight):
    """Logits chunk in the inputs' dtype, as a GPU matmul would round it."""
    if hidden_c.is_cuda or hidden_c.dtype == torch.float32:
        torch.mm(hidden_c, weight.t(), out=out)
    else:
        out.copy_(hidden_c.float() @ weight.float().t())


@functools.cache
def _fp32_output_matmul(device_type: str) -> bool:
    """Whether 16-bit matmuls write fp32 results directly here (`out_dtype`, cuBLAS on recent torch).

    Probed once per device type on a tiny product of the exact form used below; where it is
    missing, the 16-bit operands are upcast instead (more memory traffic, same numbers).
    """
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
        acc = torch.zeros(2, 2, dtype=torch.float32, device=device_type)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        torch.mm(a, a, out_dtype=torch.float32, out=torch.empty_like(acc))
        return bool(acc[0, 0] == 2)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _grad_hidden_into(out, dz, weight):
    if dz.dtype == torch.float32:
        torch.mm(dz, weight, out=out)
    elif _fp32_output_matmul(dz.device.type):
        torch.mm(dz, weight, out_dtype=torch.float32, out=out)
    else:
        torch.mm(dz.float(), weight.float(), out=out)


def _accumulate_grad_weight_(grad_weight, dz, hidden_c):
    """grad_weight (fp32) += dz^T @ hidden_c, accumulated in fp32 even for 16-bit inputs."""
    if dz.dtype == torch.float32:
        grad_weight.addmm_(dz.t(), hidden_c)
    elif _fp32_output_matmul(dz.device.type):
        torch.addmm(grad_weight, dz.t(), hidden_c, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight.addmm_(dz.t().float(), hidden_c.float())


def _merge_over_ranks(row_max, sumexp, target_logit, group):
    """Combine every rank's per-row (max, sumexp, target logit) into global ones."""
    stats = torch.stack([row_max, sumexp, target_logit])
    world = dist.get_world_size(group)
    gathered = stats.new_empty(world * 3, stats.shape[1])  # flat along dim 0, as gloo requires
    all_gather_into(gathered, stats, group=group)
    gathered = gathered.view(world, 3, -1)
    global_max = gathered[:, 0].amax(0)
    global_sumexp = (gathered[:, 1] * torch.exp(gathered[:, 0] - global_max)).sum(0)
    return global_max, global_sumexp, gathered[:, 2].sum(0)


def chunked_linear_cross_entropy(hidden, weight, targets, row_weight, *, impl: str,
                                 need_grad_hidden: bool, need_grad_weight: bool,
                                 scale=None, col_valid=None, need_grad_scale: bool = False,
                                 group=None, chunk_rows: int | None = None,
                                 chunk_bytes: int | None = None):
    """Sum over rows of row_weight * CE(scale * hidden @ weight^T, targets), and its gradients.

    targets [N] are column indices into `weight` (this rank's rows); any value
    outside [0, V) selects no column here. row_weight [N] fp32 multiplies each
    row's loss and gradient (0 drops a row). Returns (loss fp32 [], grad_hidden
    fp32 [N, D] | None, grad_weight fp32 [V, D] | None, grad_scale fp32 [] | None),
    the gradients being those of the returned loss. With `group`, logits are
    normalised over all ranks' columns and grad_hidden is this rank's share.
    """
    n_rows, width = hidden.shape
    if impl == "torch" and hidden.dtype != torch.float32:
        hidden, weight = hidden.float(), weight.float()  # the CPU path computes in fp32 throughout
    device = hidden.device
    rows = chunk_rows or default_chunk_rows(n_rows, weight.shape[0], hidden.element_size(), device, chunk_bytes)
    need_dz = need_grad_hidden or need_grad_weight or need_grad_scale
    loss = torch.zeros((), dtype=torch.float32, device=device)
    grad_hidden = torch.empty(n_rows, width, dtype=torch.float32, device=device) if need_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_grad_weight else None
    grad_scale = torch.zeros((), dtype=torch.float32, device=device) if need_grad_scale else None
    softmax = row_softmax(impl, scale, col_valid, need_grad_scale)
    logits = torch.empty(min(rows, n_rows), weight.shape[0], dtype=hidden.dtype, device=device)
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        hidden_c, targets_c, weight_c = hidden[start:stop], targets[start:stop], row_weight[start:stop]
        z = logits[: stop - start]
        _project_into(z, hidden_c, weight)
        row_max, sumexp, target_logit = softmax.stats(z, targets_c)
        if group is not None:
            row_max, sumexp, target_logit = _merge_over_ranks(row_max, sumexp, target_logit, group)
        lse = row_max + torch.log(sumexp)
        loss += torch.where(weight_c != 0, weight_c * (lse - target_logit), 0.0).sum()
        if not need_dz:
            continue
        dz, row_scale_grad = softmax.grad(z, targets_c, lse, weight_c)
        if need_grad_scale:
            grad_scale += row_scale_grad.sum()
        if need_grad_hidden:
            _grad_hidden_into(grad_hidden[start:stop], dz, weight)
        if need_grad_weight:
            _accumulate_grad_weight_(grad_weight, dz, hidden_c)
    return loss, grad_hidden, grad_weight, grad_scale
