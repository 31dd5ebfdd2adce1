"""Helpers shared by the kernels tests (no tests of its own).

Every test_kernels_* module sets TRITON_INTERPRET=1 before importing kernels,
so the Triton kernels run in the interpreter on CPU tensors.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_real_empty = torch.empty


def poisoned_empty(*args, **kwargs):
    """torch.empty whose memory holds NaN (floats) or the dtype's maximum (integers)."""
    tensor = _real_empty(*args, **kwargs)
    if tensor.is_floating_point():
        tensor.fill_(float("nan"))
    elif tensor.dtype != torch.bool:
        tensor.fill_(torch.iinfo(tensor.dtype).max)
    return tensor


@pytest.fixture
def poison(monkeypatch):
    """Uninitialised outputs hold NaN, so any element a kernel fails to write shows up."""
    monkeypatch.setattr(torch, "empty", poisoned_empty)


def assert_close_rel(actual, expected, rel, what=""):
    """max |actual - expected| <= rel * max |expected| (a scale-aware relative bound)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten element?)"
    error = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert error <= rel * max(scale, 1e-30), f"{what}: max error {error:.3e} > {rel:.1e} x max |expected| {scale:.3e}"


def max_error(actual, expected):
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


# Odd sizes: V and D are not multiples of the interpreter's 16-column tile, N not of the chunk.
N, D, V, CHUNK = 37, 11, 53, 8
IGNORE = -100


def linear_ce_inputs(seed, dtype, n=N, d=D, v=V):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (torch.randn(v, d, generator=gen) * 0.7).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < 0.25] = IGNORE
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, *args, upstream=1.7, **kwargs):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, *args, **kwargs)
    (loss * upstream).backward()  # a non-unit upstream gradient must scale both gradients
    return loss.detach(), hidden.grad, weight.grad
