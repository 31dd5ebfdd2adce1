"""Fused kernels for the LCL losses and attention.

Triton on CUDA and under TRITON_INTERPRET=1, chunked torch on CPU; each
module also holds the plain-torch reference it is tested against.
"""

from kernels.attention import attention
from kernels.contrastive_loss import contrastive_loss
from kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    vocab_parallel_fused_linear_cross_entropy,
)

__all__ = [
    "attention",
    "contrastive_loss",
    "fused_linear_cross_entropy",
    "vocab_parallel_fused_linear_cross_entropy",
]
