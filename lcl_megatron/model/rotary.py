"""Rotary position embeddings for megatron-core attention, on any device.

megatron-core's RotaryEmbedding moves its frequencies to `torch.cuda.current_device()`;
this module computes the same [s, 1, 1, head_dim] angles (non-interleaved halves)
on the device asked for. The angles are always computed in fp32 and held in no
buffer: a bf16 `model.to(dtype)` would round the frequencies (at position 2047
the angles would be off by radians), and evaluation in fp32 would then see
another model than training did.
"""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self._angles: dict = {}  # (seq_len, device) -> angles; not a buffer, so no cast reaches it

    def forward(self, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
        key = (seq_len, torch.device(device))
        if key not in self._angles:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
            inv_freq = 1.0 / (self.base ** exponents)
            freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
            self._angles[key] = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
        return self._angles[key]
