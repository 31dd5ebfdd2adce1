import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (via kernels)

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from kernels.attention import attention_reference  # noqa: E402
from tests.support.kernels import assert_close_rel  # noqa: E402

DOCS = (5, 1, 9, 4)  # a one-token document included
HEADS, KV_HEADS, DIM = 6, 2, 8


def _qkv(seed, seqlen, batch=1, kv_heads=KV_HEADS):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, HEADS, DIM, generator=gen)
    k = torch.randn(batch, seqlen, kv_heads, DIM, generator=gen)
    v = torch.randn(batch, seqlen, kv_heads, DIM, generator=gen)
    return q, k, v


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [HEADS, KV_HEADS])
def test_packed_attention_equals_attention_per_document(causal, kv_heads):
    q, k, v = _qkv(seed=1, seqlen=sum(DOCS), kv_heads=kv_heads)
    cu = _cu_seqlens(DOCS)
    packed = kernels.attention(q, k, v, causal=causal, cu_seqlens=cu, max_seqlen=max(DOCS), softmax_scale=0.3)
    for start, stop in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = kernels.attention(q[:, start:stop], k[:, start:stop], v[:, start:stop], causal=causal,
                                  softmax_scale=0.3)
        assert_close_rel(packed[:, start:stop], alone, 1e-5, f"document {start}:{stop}")
    assert_close_rel(packed, attention_reference(q, k, v, causal=causal, cu_seqlens=cu, softmax_scale=0.3),
                     1e-5, "packed vs float64")


def test_packed_attention_ignores_other_documents():
    q, k, v = _qkv(seed=2, seqlen=sum(DOCS))
    cu = _cu_seqlens(DOCS)
    before = kernels.attention(q, k, v, causal=False, cu_seqlens=cu)
    k2, v2 = k.clone(), v.clone()
    k2[:, 6:15], v2[:, 6:15] = 100.0, -100.0  # rewrite the third document's keys and values
    after = kernels.attention(q, k2, v2, causal=False, cu_seqlens=cu)
    assert torch.equal(before[:, :6], after[:, :6]) and torch.equal(before[:, 15:], after[:, 15:])
    assert not torch.allclose(before[:, 6:15], after[:, 6:15])


@pytest.mark.parametrize("causal", [True, False])
def test_dense_attention_matches_float64(causal):
    q, k, v = _qkv(seed=3, seqlen=11, batch=2)
    out = kernels.attention(q, k, v, causal=causal)
    assert out.shape == q.shape
    assert_close_rel(out, attention_reference(q, k, v, causal=causal), 1e-5, "dense")


@pytest.mark.parametrize("causal", [True, False])
def test_packed_rows_attend_within_their_documents(causal):
    """Two rows, each packed with its own documents: the per-row mask equals attention per document."""
    q, k, v = _qkv(seed=7, seqlen=sum(DOCS), batch=2)
    cu = _cu_seqlens(DOCS + (3, 16))  # the second row: two documents
    out = kernels.attention(q, k, v, causal=causal, cu_seqlens=cu)
    assert_close_rel(out, attention_reference(q, k, v, causal=causal, cu_seqlens=cu), 1e-5, "two packed rows")


def test_attention_rejects_bad_packing():
    q, k, v = _qkv(seed=4, seqlen=sum(DOCS), batch=2)
    with pytest.raises(ValueError, match="ends at"):
        kernels.attention(q, k, v, causal=True, cu_seqlens=_cu_seqlens(DOCS))
    with pytest.raises(ValueError, match="ends at"):
        kernels.attention(q[:1], k[:1], v[:1], causal=True, cu_seqlens=_cu_seqlens(DOCS[:-1]))
    with pytest.raises(ValueError, match="int32"):
        kernels.attention(q[:1], k[:1], v[:1], causal=True, cu_seqlens=_cu_seqlens(DOCS).long())


def test_packed_attention_gradients_match_float64():
    q, k, v = _qkv(seed=5, seqlen=sum(DOCS))
    cu = _cu_seqlens(DOCS)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    grads = []
    for fn, dtype in ((kernels.attention, torch.float32), (attention_reference, torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        (fn(*leaves, causal=True, cu_seqlens=cu) * upstream.to(dtype)).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, mine, truth in zip("qkv", *grads):
        assert_close_rel(mine, truth, 1e-5, f"grad {name}")
