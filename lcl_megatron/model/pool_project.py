"""The attentive pool-project: one learned query cross-attends over the patch tokens.

It yields the image latent (query attends over patches, then `proj`) and the
image tokens for the LM (each patch through norm1_v, the v linear and `proj`).
Parameter names follow the reference's `pool_project.*` tensors one to one.
"""

import torch
import torch.nn.functional as F
from torch import nn


class AttentivePoolProject(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query_token = nn.Parameter(torch.randn(1, 1, input_dim))
        self.norm1_q = nn.LayerNorm(input_dim, eps=1e-5)
        self.norm1_k = nn.LayerNorm(input_dim, eps=1e-5)
        self.norm1_v = nn.LayerNorm(input_dim, eps=1e-5)
        self.q = nn.Linear(input_dim, output_dim, bias=False)
        self.k = nn.Linear(input_dim, output_dim, bias=False)
        self.v = nn.Linear(input_dim, output_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(output_dim))
        self.k_bias = nn.Parameter(torch.zeros(output_dim))
        self.v_bias = nn.Parameter(torch.zeros(output_dim))
        self.proj = nn.Linear(output_dim, output_dim, bias=False)

    def forward(self, patches: torch.Tensor):
        """patches [N, P, W] -> (latent [N, D], image tokens [N, P, D])."""
        n, p, _ = patches.shape
        h = self.num_heads
        values = F.linear(self.norm1_v(patches), self.v.weight, self.v_bias)  # [N, P, D]
        query = F.linear(self.norm1_q(self.query_token), self.q.weight, self.q_bias).expand(n, 1, -1)
        keys = F.linear(self.norm1_k(patches), self.k.weight, self.k_bias)
        split = lambda t: t.reshape(n, t.shape[1], h, -1).transpose(1, 2)  # [N, h, len, d]
        pooled = F.scaled_dot_product_attention(split(query), split(keys), split(values))
        latent = self.proj(pooled.transpose(1, 2).reshape(n, -1))
        return latent, self.proj(values)
