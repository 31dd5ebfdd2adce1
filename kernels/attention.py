"""One attention entry point for dense batches and packed documents.

q, k, v are [b, s, heads, head_dim]; k and v may have fewer heads than q
(grouped-query attention; q's heads must be a multiple). With `cu_seqlens`
(int32 [ndocs + 1], flash-attn's varlen convention over the b * s tokens laid
row after row: document i is flat tokens cu_seqlens[i]:cu_seqlens[i+1],
cu_seqlens[-1] == b * s), no document crosses a row and no token attends
across a document boundary.

Backends, fastest first: flash-attn's dense / varlen kernels for CUDA fp16/bf16
tensors when flash_attn is importable; PyTorch's own varlen flash kernel
(`torch.nn.attention.varlen`) for packed CUDA fp16/bf16 tensors; otherwise
torch SDPA: dense batches with no mask at all (so its flash backend can run),
packed rows with a per-row block-diagonal (and causal) mask, [b, s, s] and
never [b*s, b*s]. `attention_reference` is the explicit per-document float64
softmax the tests compare against.
"""

from __future__ import annotations

import functools
import inspect

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
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor")
        if not cu_seqlens.is_cuda and int(cu_seqlens[-1]) != q.shape[0] * q.shape[1]:
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the rows hold {q.shape[0] * q.shape[1]} tokens")


def _document_mask(cu_seqlens, batch, seqlen, causal, device):
    """[b, 1, s, s] bool: True where query i of a row may attend key j (same document, j <= i if causal)."""
    flat = torch.arange(batch * seqlen, device=device)
    document = torch.searchsorted(cu_seqlens[1:].to(device=device, dtype=torch.long), flat, right=True)
    document = document.view(batch, seqlen)
    mask = document[:, :, None] == document[:, None, :]
    if causal:
        positions = torch.arange(seqlen, device=device)
        mask &= positions[:, None] >= positions[None, :]
    return mask.unsqueeze(1)


def _sdpa(q, k, v, causal, cu_seqlens, softmax_scale):
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal, scale=softmax_scale, enable_gqa=gqa)
    else:
        mask = _document_mask(cu_seqlens, q.shape[0], q.shape[1], causal, q.device)
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=softmax_scale, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def _flat(t):
    return t.reshape(-1, *t.shape[2:])


def _flash(flash_attn, q, k, v, causal, cu_seqlens, max_seqlen, softmax_scale):
    if cu_seqlens is None:
        return flash_attn.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal)
    out = flash_attn.flash_attn_varlen_func(_flat(q), _flat(k), _flat(v), cu_seqlens, cu_seqlens,
                                            max_seqlen, max_seqlen, softmax_scale=softmax_scale, causal=causal)
    return out.view(q.shape)


@functools.cache
def _torch_varlen():
    """PyTorch's varlen flash attention and the keyword that makes it causal (the API moved between releases)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:
        return varlen_attn, {"window_size": (-1, 0)}
    if "is_causal" in parameters:
        return varlen_attn, {"is_causal": True}
    return None


def _varlen(varlen, q, k, v, causal, cu_seqlens, max_seqlen, softmax_scale):
    function, causal_kwargs = varlen
    gqa = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    out = function(_flat(q), _flat(k), _flat(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                   scale=softmax_scale, **(causal_kwargs if causal else {}), **gqa)
    return out.view(q.shape)


def attention(q, k, v, *, causal: bool, cu_seqlens=None, max_seqlen=None, softmax_scale=None):
    """Softmax attention, [b, s, h, d] in and out; see the module docstring.

    `max_seqlen` bounds the longest document; without it the row length is used
    (documents never cross rows), so no host read is needed.
    """
    _check(q, k, v, cu_seqlens)
    fast = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    max_seqlen = max_seqlen or q.shape[1]
    flash_attn = _flash_attn() if fast else None
    if flash_attn is not None:
        return _flash(flash_attn, q, k, v, causal, cu_seqlens, max_seqlen, softmax_scale)
    varlen = _torch_varlen() if fast and cu_seqlens is not None else None
    if varlen is not None:
        return _varlen(varlen, q, k, v, causal, cu_seqlens, max_seqlen, softmax_scale)
    return _sdpa(q, k, v, causal, cu_seqlens, softmax_scale)


def backend_name(device_type: str) -> str:
    """The attention kernels a run on this device type uses, for the start-up line."""
    if device_type != "cuda":
        return "torch SDPA"
    if _flash_attn() is not None:
        return "flash-attn (dense and varlen)"
    return "torch SDPA (flash backend) + " + ("torch varlen flash" if _torch_varlen() else "SDPA block mask") + " for packed rows"


def attention_reference(q, k, v, *, causal, cu_seqlens=None, softmax_scale=None):
    """Explicit softmax in float64, one document at a time (documents over the flattened rows)."""
    batch, seqlen, heads, dim = q.shape
    scale = softmax_scale if softmax_scale is not None else dim ** -0.5
    group = heads // k.shape[2]
    q, k, v = (_flat(t.double()) for t in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [r * seqlen for r in range(batch + 1)]
    out = torch.empty_like(q)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[start:stop], k[start:stop]) * scale
        if causal:
            n = stop - start
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[start:stop] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[start:stop])
    return out.view(batch, seqlen, heads, dim)
