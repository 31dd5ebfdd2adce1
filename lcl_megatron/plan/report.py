"""`lcl plan`'s printout: the layout, the parameters and batch, then per-stage memory and compute tables."""

from __future__ import annotations

from lcl_megatron.config import Config, steps_for
from lcl_megatron.layout import nodes_text
from lcl_megatron.plan.checkpoint import SaveEstimate, describe_estimate
from lcl_megatron.plan.costs import Plan

GiB = 1024 ** 3


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """Plain-text columns: the first `text_columns` left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < text_columns else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [fmt(header)] + [fmt(r) for r in rows]


def _overheads(cfg: Config) -> str:
    """What the hardware FLOPs add to the model's."""
    parts = ["recomputation"] if cfg.parallel.activation_checkpointing_vit or cfg.parallel.activation_checkpointing_lm else []
    if cfg.accumulates_negatives:
        parts.append("the feature cache's forward")
    return "with " + " and ".join(parts) if parts else "nothing added"


def format_plan(plan: Plan, cfg: Config, source: str, save: SaveEstimate) -> str:
    lay, t, v, tr = plan.layout, cfg.model.text, cfg.model.vision, cfg.train
    on = lambda flag: "on" if flag else "off"
    lines = [
        f"lcl plan: {source}",
        f"layout      {lay.world} GPUs = {nodes_text(lay.nodes)} x {lay.gpus_per_node}: "
        f"tp {lay.tp} x pp {lay.pp} x dp {lay.dp}; "
        f"sequence parallel LM {on(lay.sp_enabled)}, ViT {on(lay.vit_sp_enabled)}; ZeRO {lay.zero_stage}; {tr.precision}",
        f"parameters  {plan.total_params:,} (" + ", ".join(f"{k} {n:,}" for k, n in plan.group_params.items()) + ")",
        f"batch       {tr.micro_batch_size} samples/micro-batch x {tr.grad_accumulation} micro-batches x "
        f"{lay.dp} DP = {plan.global_batch} samples/step; {t.context_length} LM tokens per sample, up to "
        f"{plan.images_per_microbatch} images of {v.num_patches + 1} ViT tokens per micro-batch",
        f"schedule    {steps_for(tr, lay.dp):,} steps x {plan.global_batch:,} samples/step = "
        f"{steps_for(tr, lay.dp) * plan.global_batch:,} samples seen"
        + (f" (train.samples={tr.samples:,})" if tr.samples else " (train.steps; set train.samples to fix the samples)"),
        f"activation checkpointing: ViT {on(cfg.parallel.activation_checkpointing_vit)}, "
        f"LM {on(cfg.parallel.activation_checkpointing_lm)}; loss {cfg.loss.impl}",
        "",
        "memory per GPU, GiB (activations kept per micro-batch without and with checkpointing; "
        "total = states + configured activations x micro-batches in flight + one recomputed layer)",
    ]
    lines += _table(
        ["stage", "holds", "params/GPU", "weights", "grads", "optimizer", "act no-ckpt", "act ckpt",
         "in flight", "total"],
        [[str(s.index), s.holds, f"{s.params:,}", _gib(s.weight_bytes), _gib(s.grad_bytes), _gib(s.optimizer_bytes),
          _gib(s.activation_bytes_plain), _gib(s.activation_bytes_checkpointed), str(s.in_flight),
          _gib(s.total_bytes)] for s in plan.stages], text_columns=2)
    lines += ["", "compute and communication per GPU per step"]
    lines += _table(
        ["stage", "model TFLOP", "hardware TFLOP", "DP GiB", "TP GiB", "PP GiB"],
        [[str(s.index), f"{s.model_flops / 1e12:,.1f}", f"{s.hardware_flops / 1e12:,.1f}", _gib(s.dp_bytes),
          _gib(s.tp_bytes), _gib(s.pp_bytes)] for s in plan.stages])
    lines += [
        "",
        f"step        {plan.model_flops / 1e15:,.2f} PFLOP model (6 x params x tokens + attention), "
        f"{plan.hardware_flops / 1e15:,.2f} PFLOP hardware ({_overheads(cfg)})",
    ]
    lines += describe_estimate(save, cfg)
    if plan.balanced_first_stage_layers not in (None, plan.stage_layers[0]):
        lines.append(f"note        LM layers per stage: {' / '.join(map(str, plan.stage_layers))}; "
                     f"parallel.pp_first_stage_layers={plan.balanced_first_stage_layers} would balance the "
                     f"stages' FLOPs (with {plan.images_per_microbatch} images per micro-batch)")
    if lay.tp > lay.gpus_per_node:
        lines.append(f"note        the TP group ({lay.tp}) spans nodes: its all-reduces cross the network")
    if lay.sp_enabled and not lay.vit_sp_enabled:
        lines.append(f"note        the ViT sequence ({v.num_patches + 1}) is not divisible by tp {lay.tp}: "
                     f"the ViT runs without sequence parallelism")
    return "\n".join(lines)
