"""The vision tower: an OpenCLIP-style ViT whose blocks are megatron-core layers.

Patch conv (no bias), class token, learned absolute positions, ln_pre, pre-LN
blocks, ln_post; the class token is dropped at the end, as in the reference.
"""

import torch
from torch import nn

from lcl_megatron.config import VisionConfig
from lcl_megatron.model.layers import build_layers, run_layers
from lcl_megatron.model.sequence_parallel import gather_from_sequence, scatter_to_sequence


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, tconfig, backend, checkpoint_layers: bool = False):
        super().__init__()
        width = cfg.width
        self.checkpoint_layers = checkpoint_layers
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.num_patches + 1, width))
        # ln_pre/ln_post act on whole sequences, outside the (possibly sequence-parallel) layers.
        self.ln_pre = nn.LayerNorm(width, eps=1e-5)
        self.sequence_parallel = backend.sequence_parallel
        self.layers = build_layers(tconfig, backend, causal=False)
        self.ln_post = nn.LayerNorm(width, eps=1e-5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] -> patch tokens [N, P, width] (after ln_post, class token dropped)."""
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x).transpose(0, 1)  # megatron layers take [s, b, h]
        if self.sequence_parallel:
            x = scatter_to_sequence(x)
        x = run_layers(self.layers, x, checkpoint=self.checkpoint_layers)
        if self.sequence_parallel:
            x = gather_from_sequence(x)
        x = self.ln_post(x.transpose(0, 1))
        return x[:, 1:]
