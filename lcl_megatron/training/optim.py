"""The reference recipe's optimizer and schedule: AdamW, linear warm-up, cosine decay."""

from __future__ import annotations

import math

import torch

from lcl_megatron.config import Config
from lcl_megatron.model.state import no_weight_decay


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    # One fused kernel for the whole update (CUDA and CPU) instead of a loop of small ones.
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=True)


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based), as OpenCLIP's cosine_lr."""
    base, warmup, total, floor = cfg.optim.lr, cfg.schedule.warmup_steps, cfg.train.steps, cfg.schedule.min_lr
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (base - floor)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.optim.lr)
