"""Softmax cross-entropy over the rows of one chunk of logits, in two passes.

The statistics pass reads a chunk z [C, V] and returns per row, for the scaled
logits l = scale * z over the valid columns, the running maximum, the sum of
exp(l - max) and the target's logit: an online log-sum-exp over column tiles.
Keeping (max, sumexp) apart lets vocabulary-parallel ranks merge them exactly.
The gradient pass then produces dloss/dz = scale * coef * (softmax - onehot)
(the Triton kernel in place, so no second buffer of logits ever exists) and,
if asked, each row's sum of coef * (softmax - onehot) * z, its share of dloss/dscale.

Targets outside [0, V) select no column (ignored rows, or targets owned by
another vocabulary shard); their target logit is 0. Each pass has a Triton
kernel (one program per row, columns in tiles, fp32 math whatever z's dtype)
and a torch twin (`TorchRowSoftmax`, the CPU path); the tests hold both to a
float64 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels._dispatch import interpreting

# Finite stand-in for -inf as a running maximum, so exp(m_old - m_new) never sees inf - inf
# (the kernels spell the same number out: Triton kernels may not read Python globals).
NEG_BIG = -1e30
_JITTED = {}


def _kernel(fn):
    """`fn` as a Triton kernel, decorated on first use. triton.jit fixes at decoration
    whether a kernel is compiled or interpreted (TRITON_INTERPRET), so decorating late
    lets a test session set the variable after this module was first imported."""
    if fn not in _JITTED:
        _JITTED[fn] = triton.jit(fn)
    return _JITTED[fn]


# The Triton kernels (launched through `_kernel`): one program per row, columns in BLOCK_V tiles.
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
    """(BLOCK_V, num_warps). In the interpreter, tiny tiles for the tests' tiny rows (so they
    cross tile edges) and wide ones otherwise (each interpreted tile step costs Python time)."""
    if interpreting():
        return (16 if n_cols <= 64 else min(4096, triton.next_power_of_2(n_cols))), 1
    block = min(8192, max(128, triton.next_power_of_2(max(n_cols, 1))))
    return block, 16 if block >= 4096 else 8


def _mask_arg(col_valid, dummy):
    return (col_valid.view(torch.uint8), True) if col_valid is not None else (dummy, False)


def _owned_targets(targets, n_cols):
    owned = (targets >= 0) & (targets < n_cols)
    return owned, torch.where(owned, targets, 0)


class TritonRowSoftmax:
    """The two passes as Triton kernels; the gradient overwrites z."""

    def __init__(self, scale=None, col_valid=None, want_scale_grad=False):
        self.scale, self.col_valid, self.want_scale_grad = scale, col_valid, want_scale_grad

    def _common(self, z):
        if not z.is_cuda and not isinstance(_kernel(_row_stats_kernel), InterpretedFunction):
            raise RuntimeError("Triton kernels were compiled for the GPU in this process; "
                               "CPU tensors need TRITON_INTERPRET=1 before the first Triton call")
        valid, has_mask = _mask_arg(self.col_valid, z)
        block, warps = _launch_config(z.shape[1])
        scale = self.scale if self.scale is not None else z
        return scale, valid, dict(HAS_SCALE=self.scale is not None, HAS_MASK=has_mask, BLOCK_V=block, num_warps=warps)

    def stats(self, z, targets):
        rows, n_cols = z.shape
        out = torch.empty(3, rows, dtype=torch.float32, device=z.device)
        scale, valid, meta = self._common(z)
        _kernel(_row_stats_kernel)[(rows,)](z, z.stride(0), targets, scale, valid, out[0], out[1], out[2], n_cols, **meta)
        return out[0], out[1], out[2]

    def grad(self, z, targets, lse, coef):
        rows, n_cols = z.shape
        scale_grad = torch.empty(rows, dtype=torch.float32, device=z.device) if self.want_scale_grad else None
        scale, valid, meta = self._common(z)
        _kernel(_row_grad_kernel)[(rows,)](z, z.stride(0), targets, lse, coef, scale, valid,
                                  scale_grad if self.want_scale_grad else lse, n_cols,
                                  WANT_SCALE_GRAD=self.want_scale_grad, **meta)
        return z, scale_grad


class TorchRowSoftmax:
    """The two passes in torch, with as few sweeps over the chunk as torch allows.

    `stats` leaves exp(l - local max) in a work buffer: z itself, unless the
    scale gradient needs z afterwards (then a buffer kept across chunks);
    `grad` turns it into the gradient with one per-row multiply and a scatter:
    softmax = work * exp(local max - lse), so the global lse of vocabulary
    parallelism costs nothing extra. The gradient lives in the work buffer.
    """

    def __init__(self, scale=None, col_valid=None, want_scale_grad=False):
        self.scale, self.col_valid, self.want_scale_grad = scale, col_valid, want_scale_grad
        self._buffer = None

    def _work(self, shape, device):
        rows, n_cols = shape
        if self._buffer is None or self._buffer.shape[0] < rows or self._buffer.shape[1] != n_cols:
            self._buffer = torch.empty(rows, n_cols, dtype=torch.float32, device=device)
        return self._buffer[:rows]

    def stats(self, z, targets):
        rows, n_cols = z.shape
        owned, index = _owned_targets(targets, n_cols)
        z = z.float()
        self._z_target = torch.where(owned, z.gather(1, index[:, None]).squeeze(1), 0.0) if n_cols else z.new_zeros(rows)
        target_logit = self._z_target * self.scale if self.scale is not None else self._z_target
        # In place where nothing reads z again: one chunk-sized buffer fewer to allocate and write.
        work = self._work(z.shape, z.device) if self.want_scale_grad else z
        self._softmax = work
        if n_cols == 0:
            self._row_max = torch.full((rows,), NEG_BIG, device=z.device)
            self._weighted = z.new_zeros(rows)
            return self._row_max, z.new_zeros(rows), target_logit
        if self.scale is None and self.col_valid is None:
            row_max = z.amax(1)
            torch.sub(z, row_max[:, None], out=work)
        else:
            if self.scale is not None:
                torch.mul(z, self.scale, out=work)
            elif work is not z:
                work.copy_(z)
            if self.col_valid is not None:
                work.masked_fill_(~self.col_valid, float("-inf"))
            row_max = work.amax(1).clamp(min=NEG_BIG)
            work.sub_(row_max[:, None])
        work.exp_()
        self._row_max = row_max
        if self.want_scale_grad:
            self._weighted = torch.einsum("ij,ij->i", work, z)  # sum_j exp(l_j - max) z_j
        return row_max, work.sum(1), target_logit

    def grad(self, z, targets, lse, coef):
        rows, n_cols = z.shape
        work = self._softmax
        owned, index = _owned_targets(targets, n_cols)
        to_prob = torch.exp(self._row_max - lse)
        scaled_coef = coef * self.scale if self.scale is not None else coef
        work.mul_((scaled_coef * to_prob)[:, None])
        if n_cols:
            work.scatter_add_(1, index[:, None], -(scaled_coef * owned)[:, None])
        scale_grad = None
        if self.want_scale_grad:
            scale_grad = coef * (to_prob * self._weighted - self._z_target * owned)
        return work, scale_grad


def row_softmax(impl: str, scale=None, col_valid=None, want_scale_grad=False):
    """Per-row softmax cross-entropy over chunks of raw logits z [C, V], l = scale * z.

    `stats(z, targets)` -> (max, sum exp(l - max), l[target] or 0) over this
    chunk's valid columns, fp32 [C] each; `grad(z, targets, lse, coef)` ->
    (dz, per-row scale gradient or None) for the chunk last passed to `stats`,
    where dz = scale * coef * (exp(l - lse) - onehot) and the scale gradient is
    sum_j coef * (exp(l_j - lse) - onehot_j) * z_j. dz may reuse z's memory.
    """
    cls = TritonRowSoftmax if impl == "triton" else TorchRowSoftmax
    return cls(scale, col_valid, want_scale_grad)
