"""The reference recipe's optimizer and schedule: AdamW, linear warm-up, cosine decay."""

from __future__ import annotations

import math

import torch

from lcl_megatron.config import Config


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    # Norm gains, biases, class/query embeddings' 1-D gains and the temperature (OpenCLIP's rule).
    return param.ndim < 2 or "logit_scale" in name


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


def clamp_parameter_(param: torch.nn.Parameter, low: float, high: float, masters: dict) -> None:
    """Clamp a parameter in place, on this rank's pieces: the weight the model uses and, where
    DeepSpeed keeps one, its fp32 master (else the next update would undo the clamp)."""
    with torch.no_grad():
        if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of the weight and of its master
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            param.ds_tensor.clamp_(low, high)  # padding is zero, inside the range
            param.data.clamp_(low, high)  # a small parameter stays gathered (persistent); else empty
            master = safe_get_local_fp32_param(param)
            if master is not None:
                safe_set_local_fp32_param(param, master.clamp(low, high))
            return
        param.data.clamp_(low, high)
        mapping = getattr(param, "_hp_mapping", None)  # ZeRO-1/2 and the bf16 optimizer: flat fp32 partitions
        if mapping is not None and mapping.hp_fragment is not None:
            mapping.hp_fragment.clamp_(low, high)
        if id(param) in masters:  # per-parameter fp32 masters
            masters[id(param)].clamp_(low, high)


def clamp_logit_scale_after_each_step(engine, bounds: tuple[float, float]) -> None:
    """The reference's rule: after every optimizer step the temperature parameter is clamped to
    `bounds` ([0, ln 100]), in fp32. Clamping the parameter, not its use, keeps its
    gradient alive, so a scale that reached the cap can come down again. Every layout steps
    through `_take_model_step`, on the ranks that hold `logit_scale` (the last pipeline stage)."""
    params = [p for name, p in engine.module.named_parameters() if name.rsplit(".", 1)[-1] == "logit_scale"]
    if not params:
        return
    wrapper = engine.optimizer
    masters = {id(low): high for lows, highs in zip(getattr(wrapper, "fp16_groups", ()), getattr(wrapper, "fp32_groups", ()))
               for low, high in zip(lows, highs)}
    take_step = engine._take_model_step

    def clamped_step(*args, **kwargs):
        out = take_step(*args, **kwargs)
        for param in params:
            clamp_parameter_(param, *bounds, masters)
        return out

    engine._take_model_step = clamped_step


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.optim.lr)
