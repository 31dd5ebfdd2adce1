"""Which implementation a kernel call runs.

Triton on CUDA tensors, and under the Triton interpreter (TRITON_INTERPRET=1,
which the CPU tests set before importing triton); the chunked torch path
otherwise. Callers may force one with `impl="triton"` or `impl="torch"`.
"""

from __future__ import annotations

import os

import torch

IMPLS = ("triton", "torch")


# Read once, at import: triton.jit decides at decoration time whether a kernel is
# interpreted, and this module is imported before any kernel is decorated.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    """True when this process's Triton kernels run in the interpreter (on CPU tensors)."""
    return _INTERPRETING


def pick_impl(tensor: torch.Tensor, impl: str | None = None) -> str:
    if impl is None:
        return "triton" if tensor.is_cuda or interpreting() else "torch"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    if impl == "triton" and not (tensor.is_cuda or interpreting()):
        raise ValueError("impl='triton' needs CUDA tensors or TRITON_INTERPRET=1")
    return impl
