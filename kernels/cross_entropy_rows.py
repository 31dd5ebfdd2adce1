"""Softmax cross-entropy over the rows of one chunk of logits, in two passes.

`row_stats` reads a chunk z [C, V] once and returns per row, for the scaled
logits l = scale * z over the valid columns, the running maximum, the sum of
exp(l - max) and the target's logit: an online log-sum-exp over column tiles.
Keeping (max, sumexp) apart lets vocabulary-parallel ranks merge them exactly.
`row_grad_` then overwrites z in place with dloss/dz = scale * coef * (softmax - onehot),
so no second buffer of logits ever exists; it can also return each row's
sum of coef * (softmax - onehot) * z, the row's share of dloss/dscale.

Targets outside [0, V) select no column (ignored rows, or targets owned by
another vocabulary shard); their target logit is 0. Each pass has a Triton
kernel (one program per row, columns in tiles, fp32 math whatever z's dtype)
and a plain-torch twin; the tests hold the kernels to the twins and both to a
float64 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import interpreting

# Finite stand-in for -inf as a running maximum, so exp(m_old - m_new) never sees inf - inf
# (the kernels spell the same number out: Triton kernels may not read Python globals).
NEG_BIG = -1e30


@triton.jit
def _row_stats_kernel(z_ptr, stride_z, target_ptr, scale_ptr, valid_ptr,
                      max_ptr, sumexp_ptr, target_logit_ptr, n_cols,
                      HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = 1.0
    row_max = -1e30
    sumexp = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        keep = cols < n_cols
        if HAS_MASK:
            keep = keep & (tl.load(valid_ptr + cols, mask=cols < n_cols, other=0) != 0)
        z = tl.load(z_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        logits = tl.where(keep, z * scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 0))
        sumexp = sumexp * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max), 0)
        row_max = new_max
    target = tl.load(target_ptr + row)
    owned = (target >= 0) & (target < n_cols)
    target_z = tl.load(z_row + tl.where(owned, target, 0), mask=owned, other=0.0).to(tl.float32)
    tl.store(max_ptr + row, row_max)
    tl.store(sumexp_ptr + row, sumexp)
    tl.store(target_logit_ptr + row, tl.where(owned, target_z * scale, 0.0))


@triton.jit
def _row_grad_kernel(z_ptr, stride_z, target_ptr, lse_ptr, coef_ptr, scale_ptr, valid_ptr,
                     scale_grad_ptr, n_cols,
                     HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, WANT_SCALE_GRAD: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = 1.0
    target = tl.load(target_ptr + row)
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)
    scale_grad = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        z = tl.load(z_row + cols, mask=in_row, other=0.0).to(tl.float32)
        prob = tl.exp(z * scale - lse)
        if HAS_MASK:
            prob = tl.where(tl.load(valid_ptr + cols, mask=in_row, other=0) != 0, prob, 0.0)
        grad = coef * (prob - tl.where(cols == target, 1.0, 0.0))
        if WANT_SCALE_GRAD:
            scale_grad += tl.where(in_row, grad * z, 0.0)
        tl.store(z_row + cols, (grad * scale).to(z_ptr.dtype.element_ty), mask=in_row)
    if WANT_SCALE_GRAD:
        tl.store(scale_grad_ptr + row, tl.sum(scale_grad, 0))


def _launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). Tiny tiles in the interpreter so tests cross tile edges."""
    if interpreting():
        return 16, 1
    block = min(8192, max(128, triton.next_power_of_2(max(n_cols, 1))))
    return block, 16 if block >= 4096 else 8


def _mask_arg(col_valid, dummy):
    return (col_valid.view(torch.uint8), True) if col_valid is not None else (dummy, False)


def _row_stats_triton(z, targets, scale, col_valid):
    rows, n_cols = z.shape
    out = torch.empty(3, rows, dtype=torch.float32, device=z.device)
    valid, has_mask = _mask_arg(col_valid, z)
    block, warps = _launch_config(n_cols)
    _row_stats_kernel[(rows,)](
        z, z.stride(0), targets, scale if scale is not None else z, valid,
        out[0], out[1], out[2], n_cols,
        HAS_SCALE=scale is not None, HAS_MASK=has_mask, BLOCK_V=block, num_warps=warps)
    return out[0], out[1], out[2]


def _row_grad_triton_(z, targets, lse, coef, scale, col_valid, want_scale_grad):
    rows, n_cols = z.shape
    scale_grad = torch.empty(rows, dtype=torch.float32, device=z.device) if want_scale_grad else None
    valid, has_mask = _mask_arg(col_valid, z)
    block, warps = _launch_config(n_cols)
    _row_grad_kernel[(rows,)](
        z, z.stride(0), targets, lse, coef, scale if scale is not None else z, valid,
        scale_grad if want_scale_grad else lse, n_cols,
        HAS_SCALE=scale is not None, HAS_MASK=has_mask, WANT_SCALE_GRAD=want_scale_grad,
        BLOCK_V=block, num_warps=warps)
    return scale_grad


def _owned_targets(targets, n_cols):
    owned = (targets >= 0) & (targets < n_cols)
    return owned, torch.where(owned, targets, 0)


def _row_stats_torch(z, targets, scale, col_valid):
    rows, n_cols = z.shape
    if n_cols == 0:
        zeros = z.new_zeros(rows, dtype=torch.float32)
        return torch.full_like(zeros, NEG_BIG), zeros, zeros
    logits = z.float()
    if scale is not None:
        logits = logits * scale
    if col_valid is not None:
        logits = logits.masked_fill(~col_valid, float("-inf"))
    row_max = logits.amax(1).clamp(min=NEG_BIG)
    sumexp = (logits - row_max[:, None]).exp_().sum(1)
    owned, index = _owned_targets(targets, n_cols)
    target_logit = torch.where(owned, logits.gather(1, index[:, None]).squeeze(1), 0.0)
    return row_max, sumexp, target_logit


def _row_grad_torch_(z, targets, lse, coef, scale, col_valid, want_scale_grad):
    rows, n_cols = z.shape
    in_place = z.dtype == torch.float32 and not want_scale_grad
    grad = z if in_place else z.to(torch.float32, copy=True)
    if scale is not None:
        grad.mul_(scale)
    grad.sub_(lse[:, None]).exp_()
    if col_valid is not None:
        grad.masked_fill_(~col_valid, 0.0)
    owned, index = _owned_targets(targets, n_cols)
    if n_cols:
        grad.scatter_add_(1, index[:, None], -owned.float()[:, None])
    grad.mul_(coef[:, None])
    scale_grad = torch.einsum("ij,ij->i", grad, z.float()) if want_scale_grad else None
    if scale is not None:
        grad.mul_(scale)
    if not in_place:
        z.copy_(grad)
    return scale_grad


def row_stats(z, targets, scale=None, col_valid=None, *, impl: str):
    """Per row of l = scale * z over valid columns: (max, sum exp(l - max), l[target] or 0), fp32 [C] each."""
    fn = _row_stats_triton if impl == "triton" else _row_stats_torch
    return fn(z, targets, scale, col_valid)


def row_grad_(z, targets, lse, coef, scale=None, col_valid=None, want_scale_grad=False, *, impl: str):
    """Overwrite z with scale * coef * (softmax(l) - onehot(target)); return per-row
    sum(coef * (softmax - onehot) * z) when `want_scale_grad`, else None."""
    fn = _row_grad_triton_ if impl == "triton" else _row_grad_torch_
    return fn(z, targets, lse, coef, scale, col_valid, want_scale_grad)
