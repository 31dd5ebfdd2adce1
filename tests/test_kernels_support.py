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
