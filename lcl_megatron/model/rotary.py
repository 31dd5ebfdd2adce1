"""Rotary position embeddings for megatron-core attention, on any device.

megatron-core's RotaryEmbedding moves its frequencies to `torch.cuda.current_device()`;
this module computes the same [s, 1, 1, head_dim] angles (non-interleaved halves)
wherever its buffer lives, and megatron's attention applies them to q and k.
"""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int) -> torch.Tensor:
        positions = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
