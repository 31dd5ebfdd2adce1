"""Which implementation a kernel call runs.

Triton on CUDA tensors, and under the Triton interpreter (TRITON_INTERPRET=1,
which the CPU tests set); the chunked torch path otherwise. Callers may force one with `impl="triton"` or `impl="torch"`.
"""

from __future__ import annotations

import os

import torch

IMPLS = ("triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_impl(tensor: torch.Tensor, impl: str | None = None) -> str:
    if impl is None:
        return "triton" if tensor.is_cuda or interpreting() else "torch"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    if impl == "triton" and not (tensor.is_cuda or interpreting()):
        raise ValueError("impl='triton' needs CUDA tensors or TRITON_INTERPRET=1")
    return impl
