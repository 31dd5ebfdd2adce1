"""One attention entry point for dense batches and packed documents.

q, k, v are [b, s, heads, head_dim]; k and v may have fewer heads than q
(grouped-query attention; q's heads must be a multiple). With `cu_seqlens`
(int32 [ndocs + 1], flash-attn's varlen convention: document i is tokens
cu_seqlens[i]:cu_seqlens[i+1] of the single row, cu_seqlens[-1] == s), b must
be 1 and no token attends across a document boundary.

Backends: flash-attn's dense / varlen kernels for CUDA fp16/bf16 tensors when
flash_attn is importable; otherwise torch SDPA, with a block-diagonal
(and causal) boolean mask for packed documents. `attention_reference` is the
explicit per-document float64 softmax the tests compare against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _flash_attn():
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def _check(q, k, v, cu_seqlens):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [b, s, h, d] and k, v [b, s, h_kv, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (same b, s, d; q heads a multiple of k heads)")
    if cu_seqlens is not None:
        if q.shape[0] != 1:
            raise ValueError(f"packed attention (cu_seqlens) needs b == 1, got b = {q.shape[0]}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor")
        if not cu_seqlens.is_cuda and int(cu_seqlens[-1]) != q.shape[1]:
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the sequence has {q.shape[1]} tokens")


def _document_mask(cu_seqlens, seqlen, causal, device):
    """[s, s] bool: True where query i may attend key j (same document, and j <= i if causal)."""
    positions = torch.arange(seqlen, device=device)
    document = torch.searchsorted(cu_seqlens[1:].to(device=device, dtype=torch.long), positions, right=True)
    mask = document[:, None] == document[None, :]
    if causal:
        mask &= positions[:, None] >= positions[None, :]
    return mask


def _sdpa(q, k, v, causal, cu_seqlens, softmax_scale):
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal, scale=softmax_scale, enable_gqa=gqa)
    else:
        mask = _document_mask(cu_seqlens, q.shape[1], causal, q.device)
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=softmax_scale, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def _flash(flash_attn, q, k, v, causal, cu_seqlens, max_seqlen, softmax_scale):
    if cu_seqlens is None:
        return flash_attn.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # a host sync: pass max_seqlen to avoid it
    out = flash_attn.flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                            softmax_scale=softmax_scale, causal=causal)
    return out.unsqueeze(0)


def attention(q, k, v, *, causal: bool, cu_seqlens=None, max_seqlen=None, softmax_scale=None):
    """Softmax attention, [b, s, h, d] in and out; see the module docstring."""
    _check(q, k, v, cu_seqlens)
    flash_attn = _flash_attn() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash_attn is not None:
        return _flash(flash_attn, q, k, v, causal, cu_seqlens, max_seqlen, softmax_scale)
    return _sdpa(q, k, v, causal, cu_seqlens, softmax_scale)


def attention_reference(q, k, v, *, causal, cu_seqlens=None, softmax_scale=None):
    """Explicit softmax in float64, one document at a time."""
    batch, seqlen, heads, dim = q.shape
    scale = softmax_scale if softmax_scale is not None else dim ** -0.5
    group = heads // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(group, 2), v.double().repeat_interleave(group, 2)
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, seqlen]
    out = torch.empty_like(q)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        scores = torch.einsum("bqhd,bkhd->bhqk", q[:, start:stop], k[:, start:stop]) * scale
        if causal:
            n = stop - start
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[:, start:stop] = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v[:, start:stop])
    return out
