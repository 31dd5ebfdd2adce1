"""The tiny model of the model and loss tests and hand-written batches for it."""

import torch

from lcl_megatron import tokens
from lcl_megatron.config import ModelConfig, TextConfig, VisionConfig

P = 9  # 24 px images, 8 px patches


def tiny(arch="clip", **text):
    return ModelConfig(embed_dim=32, pool_heads=4,
                       vision=VisionConfig(image_size=24, patch_size=8, width=32, layers=2, head_width=8),
                       text=TextConfig(arch=arch, context_length=40, width=32, heads=4, layers=2, **text))


def batch(rows):
    ids = torch.full((len(rows), 40), tokens.PAD_ID)
    mask = torch.zeros(len(rows), 40, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = True
    n = int((ids == tokens.SOI_ID).sum())
    return torch.randn(n, 3, 24, 24), ids, mask


IMAGE = [tokens.SOI_ID] + [tokens.IMG_ID] * P + [tokens.EOI_ID]
