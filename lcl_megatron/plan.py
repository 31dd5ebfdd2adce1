"""`lcl plan`: what a parallel layout costs per GPU, before a cluster run is submitted.

Parameter counts come from the real model: the single-process model is built on
the meta device (no memory) and each tensor is divided over tensor parallelism
by megatron-core's own marks (`tensor_model_parallel`, `partition_dim`); the
vocabulary-parallel rows are padded to a multiple of TP as the model pads them.
Pipeline stages follow the model's cut (model/pipeline.py): ViT, pool-project
and the text embedding on the first stage with `parallel.pp_first_stage_layers`
LM layers, the other LM layers spread over the later stages, the context and LM
heads and `logit_scale` on the last. The ViT is sized for the most images a
micro-batch brings (`parallel.max_images`, capped by what the contexts hold).

Memory model (per GPU, bytes per parameter), the ZeRO paper's mixed-precision
accounting: weights and gradients in the model dtype (2 bf16, 4 fp32); AdamW
state fp32 m and v, plus an fp32 master copy under bf16 (12 bf16, 8 fp32).
ZeRO stage 1 divides the optimizer state over DP, stage 2 also the gradients,
stage 3 also the weights. DeepSpeed's transient buffers are not counted.

Activations (per micro-batch, per transformer layer) follow Korthikanti et al.,
"Reducing Activation Recomputation in Large Transformer Models" (Megatron-LM),
with the attention-score terms replaced by what flash attention keeps (its
output and log-sum-exp) and no dropout masks (the recipe uses no dropout), and
generalised to grouped-query attention and SwiGLU. Under 1F1B pipelining stage
i holds min(pp - i, micro-batches) micro-batches in flight.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from dataclasses import dataclass, field

from lcl_megatron.config import Config, ConfigError, load_config, steps_for, validate_model
from lcl_megatron.model.dims import lm_ffn_hidden_size, max_images_per_microbatch, vit_ffn_hidden_size
from lcl_megatron.model.names import stage_of

GiB = 1024 ** 3


# ---------------------------------------------------------------- layout


@dataclass
class Layout:
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    dp: int
    sp: bool
    vit_sp: bool  # the ViT sequence (P + 1) is sliced only where TP divides it, as the model does
    zero_stage: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_layout(cfg: Config, nodes: int, gpus_per_node: int) -> Layout:
    """The layout of `cfg` on nodes x gpus_per_node GPUs, or ConfigError naming the fix."""
    p, v, t = cfg.parallel, cfg.model.vision, cfg.model.text
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be positive, got {nodes} and {gpus_per_node}")
    if p.tp < 1 or p.pp < 1:
        raise ConfigError(f"parallel.tp and parallel.pp must be >= 1, got {p.tp} and {p.pp}")
    tr = cfg.train
    if tr.micro_batch_size < 1 or tr.grad_accumulation < 1:
        raise ConfigError(f"train.micro_batch_size and train.grad_accumulation must be positive, "
                          f"got {tr.micro_batch_size} and {tr.grad_accumulation}")
    if tr.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision must be 'fp32' or 'bf16', got {tr.precision!r}")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    groups = t.num_query_groups or t.heads
    lm_ffn, vit_ffn = lm_ffn_hidden_size(t), vit_ffn_hidden_size(v)
    for what, count, key in [
        ("ViT heads", v.heads, "model.vision.head_width"),
        ("LM heads", t.heads, "model.text.heads"),
        ("LM query groups", groups, "model.text.num_query_groups"),
        ("ViT MLP width", vit_ffn, "model.vision.mlp_ratio"),
        ("LM MLP width", lm_ffn, "model.text.ffn_hidden_size"),
    ]:
        if count % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide the {what} ({count}); "
                              f"use a tp from {{{_divisors(count)}}} or change {key}")
    if p.pp > t.layers:
        raise ConfigError(f"parallel.pp={p.pp} exceeds the {t.layers} LM layers (model.text.layers); "
                          f"use at most {t.layers} stages")
    if p.pp > 1 and p.pp_first_stage_layers > t.layers:
        raise ConfigError(f"parallel.pp_first_stage_layers={p.pp_first_stage_layers} exceeds the {t.layers} LM "
                          f"layers; use at most {t.layers}, or -1 for an even split")
    if p.max_images < 0:
        raise ConfigError(f"parallel.max_images must be >= 0 (0: micro_batch_size x data.max_images), "
                          f"got {p.max_images}")
    if p.sp and p.tp == 1:
        raise ConfigError("parallel.sp needs parallel.tp > 1; set parallel.sp=false or raise parallel.tp")
    if p.sp and t.context_length % p.tp:
        raise ConfigError(f"parallel.sp splits the LM context ({t.context_length}) over parallel.tp={p.tp}, "
                          f"which does not divide it; set model.text.context_length to a multiple of {p.tp} "
                          f"or parallel.sp=false")
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: DeepSpeed's pipeline "
                          f"engine supports ZeRO 0 or 1 only; set parallel.zero_stage=1 or parallel.pp=1")
    model_parallel = p.tp * p.pp
    world = nodes * gpus_per_node
    if world % model_parallel:
        raise ConfigError(f"{world} GPUs ({_nodes(nodes)} x {gpus_per_node}) cannot be filled by tp x pp = "
                          f"{p.tp} x {p.pp}; use a multiple of {model_parallel} GPUs or change parallel.tp/pp")
    return Layout(nodes=nodes, gpus_per_node=gpus_per_node, tp=p.tp, pp=p.pp, dp=world // model_parallel,
                  sp=p.sp, vit_sp=p.sp and (v.num_patches + 1) % p.tp == 0, zero_stage=p.zero_stage)


def _nodes(n: int) -> str:
    return f"{n} node{'s' if n != 1 else ''}"


def lm_layers_per_stage(layers: int, pp: int, first_stage_layers: int = -1) -> list[int]:
    """LM layers on each pipeline stage, by the pipeline's own cut (model/pipeline.py), whose
    boundaries also count the first stage's ViT block and the last stage's loss block."""
    from lcl_megatron.model.pipeline import stage_boundaries

    parts = stage_boundaries(layers, pp, first_stage_layers)
    return [parts[i + 1] - parts[i] - (i == 0) - (i == pp - 1) for i in range(pp)]


# ---------------------------------------------------------------- parameters


@dataclass
class Tensor:
    name: str
    shape: tuple
    split_dim: int | None  # dimension divided over TP; None: replicated on every TP rank

    def numel(self, tp: int = 1) -> int:
        shape = list(self.shape)
        if self.split_dim is not None:
            shape[self.split_dim] = math.ceil(shape[self.split_dim] / tp)  # vocab rows padded to a multiple of tp
        return math.prod(shape)


def sharded_tensors(cfg: Config, model=None) -> list[Tensor]:
    """Every tensor of the single-process model with its TP split, from a meta-device build or,
    inside a run (whose process groups a new build would follow), from the run's own model."""
    from lcl_megatron.convert.native import model_tensors as state_tensors
    from lcl_megatron.model.build import build_model
    from lcl_megatron.model.sharding import canonical_shape

    if model is None:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's start-up chatter; stdout is the plan
            model = build_model(cfg.model, "meta")
    params = dict(model.named_parameters())
    out = []
    for name, tensor in state_tensors(model.state_dict()).items():
        param = params.get(name)
        local = getattr(param, "ds_shape", tensor.shape)  # ZeRO-3 leaves an empty partition in place
        split = param is not None and getattr(param, "tensor_model_parallel", False)
        shape = canonical_shape(name, local, param, cfg.model.text.vocab_size)
        out.append(Tensor(name, tuple(shape), param.partition_dim if split else None))
    return out


def tokens_per_microbatch(name: str, cfg: Config, images: int) -> int:
    """How many tokens of a micro-batch with `images` images pass through tensor `name` as a
    matmul (0: a lookup, no FLOPs)."""
    v, t = cfg.model.vision, cfg.model.text
    if name in ("visual.class_embedding", "visual.positional_embedding", "logit_scale") \
            or name.startswith("text.embedding."):
        return 0
    if name.startswith("visual."):
        return images * (v.num_patches + 1)
    if name.startswith("pool_project."):
        return images * v.num_patches
    if name.startswith("text.context_head."):
        return images  # one context feature per image
    return cfg.train.micro_batch_size * t.context_length  # LM layers and LM head


# ---------------------------------------------------------------- activations


def layer_activation_elements(seq: int, batch: int, width: int, heads: int, query_groups: int, ffn: int,
                              gated: bool, tp: int, sp: bool) -> tuple[float, float]:
    """(elements in the activation dtype, elements in fp32) one transformer layer keeps for backward.

    Kept whole on every TP rank (sliced by SP): the two norm inputs, the QKV and fc1 inputs.
    Split over TP: Q, K, V (K and V over the query groups), the flash-attention output and the
    projection's input, the MLP's fc1 output and fc2 input (SwiGLU: gate, up, silu(gate), product).
    fp32: flash attention's log-sum-exp per head and position.
    """
    sbh = seq * batch * width
    kv = 2 * query_groups * (width // heads) * seq * batch
    mlp = (4 if gated else 2) * ffn * seq * batch
    whole = 4 * sbh / (tp if sp else 1)
    split = (sbh + kv + 2 * sbh + mlp) / tp
    return whole + split, heads * seq * batch / tp


@dataclass
class Tower:
    """One stack of transformer layers as a stage sees it: activations, FLOPs and TP traffic."""
    prefix: str  # parameter names of its layers
    causal: bool
    seq: int
    batch: int
    width: int
    heads: int
    query_groups: int
    ffn: int
    gated: bool
    sp: bool
    layers: int
    checkpoint: bool

    def layer_bytes(self, tp: int, act_bytes: int) -> float:
        low, fp32 = layer_activation_elements(self.seq, self.batch, self.width, self.heads, self.query_groups,
                                              self.ffn, self.gated, tp, self.sp)
        return low * act_bytes + fp32 * 4

    def activation_bytes(self, tp: int, act_bytes: int, checkpoint: bool) -> float:
        """Kept from forward to backward; checkpointed layers keep only their inputs (backward
        then recomputes one layer at a time: `layer_bytes` once, whatever the micro-batches)."""
        if not checkpoint:
            return self.layers * self.layer_bytes(tp, act_bytes)
        return self.layers * self.seq * self.batch * self.width / (tp if self.sp else 1) * act_bytes

    def tp_bytes(self, tp: int, act_bytes: int) -> float:
        """Per micro-batch: 2 all-reduces forward, 2 backward, 2 more when recomputing (SP: the same
        volume as all-gathers and reduce-scatters); a ring all-reduce moves 2 (t-1)/t of the tensor."""
        if tp == 1 or not self.layers:
            return 0.0
        per_layer = (6 if self.checkpoint else 4) * 2 * (tp - 1) / tp * self.seq * self.batch * self.width
        return self.layers * per_layer * act_bytes

    def forward_flops(self, stage_tensors: list, cfg: Config, images: int, tp: int) -> float:
        """Forward FLOPs per GPU per micro-batch of these layers: matmuls, then QK^T and AV
        (a causal mask skips half the scores)."""
        matmul = sum(2 * x.numel(tp) * tokens_per_microbatch(x.name, cfg, images)
                     for x in stage_tensors if x.name.startswith(self.prefix))
        attention = self.layers * 4 * self.seq * self.seq * self.width * self.batch / tp
        return matmul + attention * (0.5 if self.causal else 1.0)


# ---------------------------------------------------------------- the plan


@dataclass
class Stage:
    index: int
    holds: str
    params: int  # per GPU, TP padding included
    weight_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes_plain: float  # per micro-batch, no activation checkpointing
    activation_bytes_checkpointed: float  # per micro-batch, both towers checkpointed
    activation_bytes: float  # per micro-batch, as configured
    in_flight: int
    recompute_bytes: float  # one checkpointed layer's activations, rebuilt during backward
    model_flops: float  # per GPU per step
    hardware_flops: float  # with recomputation
    dp_bytes: float
    tp_bytes: float
    pp_bytes: float

    @property
    def total_bytes(self) -> float:
        return (self.weight_bytes + self.grad_bytes + self.optimizer_bytes
                + self.activation_bytes * self.in_flight + self.recompute_bytes)


@dataclass
class Plan:
    layout: Layout
    total_params: int  # the single-process model's count
    group_params: dict  # ViT / pool-project / LM -> count
    images_per_microbatch: int
    global_batch: int
    model_flops: float  # whole step, all GPUs
    hardware_flops: float
    stage_layers: list[int]  # LM layers per pipeline stage
    stages: list[Stage] = field(default_factory=list)
    balanced_first_stage_layers: int | None = None  # pp > 1: the parallel.pp_first_stage_layers balancing FLOPs


def images_per_microbatch(cfg: Config) -> int:
    """The most images a micro-batch brings: the pipeline's static bound (parallel.max_images, by
    default micro_batch_size x data.max_images), at most as many image runs as the contexts hold."""

    fit = cfg.train.micro_batch_size * (cfg.model.text.context_length // (cfg.model.vision.num_patches + 2))
    return max(1, min(max_images_per_microbatch(cfg), fit))


@dataclass
class _Setup:
    """What every stage's arithmetic shares."""
    cfg: Config
    layout: Layout
    tensors: list
    images: int  # per micro-batch
    pbytes: int  # weights, gradients and activations: the model dtype
    optimizer_bytes_per_param: int


def _stage(s: _Setup, index: int, stage_layers: list[int]) -> Stage:
    cfg, lay = s.cfg, s.layout
    tp, pp, dp = lay.tp, lay.pp, lay.dp
    v, t = cfg.model.vision, cfg.model.text
    mbs, micro_batches, act_bytes = cfg.train.micro_batch_size, cfg.train.grad_accumulation, s.pbytes
    first, last = index == 0, index == pp - 1
    stage_tensors = [x for x in s.tensors if stage_of(x.name, stage_layers) == index]
    params = sum(x.numel(tp) for x in stage_tensors)

    lm = Tower(prefix="text.layers.", causal=True, seq=t.context_length, batch=mbs, width=t.width, heads=t.heads,
               query_groups=t.num_query_groups or t.heads, ffn=lm_ffn_hidden_size(t), gated=t.arch == "llama",
               sp=lay.sp, layers=stage_layers[index], checkpoint=cfg.parallel.activation_checkpointing_lm)
    towers = [lm]
    if first:
        towers.insert(0, Tower(prefix="visual.layers.", causal=False, seq=v.num_patches + 1, batch=s.images,
                               width=v.width, heads=v.heads, query_groups=v.heads, ffn=vit_ffn_hidden_size(v),
                               gated=False, sp=lay.vit_sp, layers=v.layers,
                               checkpoint=cfg.parallel.activation_checkpointing_vit))

    def activations(checkpoint_of) -> float:
        total = sum(x.activation_bytes(tp, act_bytes, checkpoint_of(x)) for x in towers)
        if last and cfg.loss.impl == "torch":  # fp32 logits and log-softmax over this rank's vocab slice
            total += mbs * (t.context_length - 1) * math.ceil(t.vocab_size / tp) * 8
        return total

    # FLOPs: 6 x params x tokens for every matmul (forward 2, backward 4), plus attention
    layer_prefixes = tuple(x.prefix for x in towers)
    other = sum(2 * x.numel(tp) * tokens_per_microbatch(x.name, cfg, s.images)
                for x in stage_tensors if not x.name.startswith(layer_prefixes))
    forward = other + sum(x.forward_flops(stage_tensors, cfg, s.images, tp) for x in towers)
    recompute = sum(x.forward_flops(stage_tensors, cfg, s.images, tp) for x in towers if x.checkpoint)

    # DP gradient traffic for this stage's parameters, per ZeRO stage: 0 and 1 all-reduce (or
    # reduce-scatter + all-gather) once per step; 2 reduce-scatters every micro-batch; 3 also
    # all-gathers the weights for every forward and backward
    ring = (dp - 1) / dp
    grads = params * s.pbytes
    dp_bytes = {0: 2, 1: 2, 2: micro_batches + 1, 3: 3 * micro_batches}[lay.zero_stage] * ring * grads

    tp_bytes = sum(x.tp_bytes(tp, act_bytes) for x in towers)
    if tp > 1 and first:  # vocab-parallel embedding output: one all-reduce forward
        tp_bytes += 2 * (tp - 1) / tp * mbs * t.context_length * t.width * act_bytes
    if tp > 1 and last:  # LM head input gradient all-reduce; cross-entropy max, sum and target logits
        tp_bytes += 2 * (tp - 1) / tp * mbs * t.context_length * (t.width * act_bytes + 3 * 4)
    # each stage boundary (model/pipeline.py): hidden states (sliced under SP) and the latents padded to
    # the image bound go forward with the token ids and mask (int64), their gradients come back
    boundaries = (0 if first else 1) + (0 if last else 1)
    floating = (mbs * t.context_length * t.width / (tp if lay.sp else 1) + s.images * t.width) * act_bytes
    pp_bytes = boundaries * (2 * floating + 2 * mbs * t.context_length * 8)

    zero = lay.zero_stage
    return Stage(
        index=index,
        holds=_holds(first, last, sum(stage_layers[:index]), stage_layers[index]),
        params=params,
        weight_bytes=params * s.pbytes / (dp if zero >= 3 else 1),
        grad_bytes=params * s.pbytes / (dp if zero >= 2 else 1),
        optimizer_bytes=params * s.optimizer_bytes_per_param / (dp if zero >= 1 else 1),
        activation_bytes_plain=activations(lambda tower: False),
        activation_bytes_checkpointed=activations(lambda tower: True),
        activation_bytes=activations(lambda tower: tower.checkpoint),
        in_flight=min(pp - index, micro_batches),
        recompute_bytes=max([x.layer_bytes(tp, act_bytes) for x in towers if x.checkpoint and x.layers], default=0.0),
        model_flops=3 * forward * micro_batches,
        hardware_flops=(3 * forward + recompute) * micro_batches,
        dp_bytes=dp_bytes,
        tp_bytes=tp_bytes * micro_batches,
        pp_bytes=pp_bytes * micro_batches,
    )


def balanced_first_stage(s: _Setup) -> int:
    """parallel.pp_first_stage_layers that minimises the slowest stage's FLOPs."""
    layers, pp = s.cfg.model.text.layers, s.layout.pp

    def slowest(first: int) -> float:
        split = lm_layers_per_stage(layers, pp, first)
        return max(_stage(s, i, split).hardware_flops for i in range(pp))

    return min(range(0, layers - pp + 2), key=slowest)


def make_plan(cfg: Config, nodes: int, gpus_per_node: int, images: int | None = None, model=None) -> Plan:
    """The plan of `cfg` on nodes x gpus_per_node GPUs; `images` per micro-batch overrides the expected
    count, and a running job passes its `model` (see `sharded_tensors`)."""
    layout = check_layout(cfg, nodes, gpus_per_node)
    bf16 = cfg.train.precision == "bf16"
    setup = _Setup(cfg=cfg, layout=layout, tensors=sharded_tensors(cfg, model),
                   images=images_per_microbatch(cfg) if images is None else images,
                   pbytes=2 if bf16 else 4, optimizer_bytes_per_param=12 if bf16 else 8)
    stage_layers = lm_layers_per_stage(cfg.model.text.layers, layout.pp, cfg.parallel.pp_first_stage_layers)
    stages = [_stage(setup, i, stage_layers) for i in range(layout.pp)]
    groups = {"ViT": 0, "pool-project": 0, "LM": 0, "logit_scale": 0}
    names = {"visual": "ViT", "pool_project": "pool-project", "text": "LM"}
    for tensor in setup.tensors:
        key = tensor.name.split(".")[0]
        groups[names.get(key, key)] += tensor.numel()
    replicas = layout.tp * layout.dp
    return Plan(layout=layout, total_params=sum(x.numel() for x in setup.tensors), group_params=groups,
                images_per_microbatch=setup.images,
                global_batch=cfg.train.micro_batch_size * cfg.train.grad_accumulation * layout.dp,
                model_flops=sum(x.model_flops for x in stages) * replicas,
                hardware_flops=sum(x.hardware_flops for x in stages) * replicas, stage_layers=stage_layers,
                stages=stages,
                balanced_first_stage_layers=balanced_first_stage(setup) if layout.pp > 1 else None)


def _holds(first: bool, last: bool, first_layer: int, layers: int) -> str:
    parts = ["ViT, pool-project, embedding"] if first else []
    if layers == 1:
        parts.append(f"LM layer {first_layer}")
    elif layers > 1:
        parts.append(f"LM layers {first_layer}-{first_layer + layers - 1}")
    if last:
        parts.append("heads")
    return ", ".join(parts)


# ---------------------------------------------------------------- printing


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """Plain-text columns: the first `text_columns` left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < text_columns else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [fmt(header)] + [fmt(r) for r in rows]


def format_plan(plan: Plan, cfg: Config, source: str) -> str:
    lay, t, v, tr = plan.layout, cfg.model.text, cfg.model.vision, cfg.train
    on = lambda flag: "on" if flag else "off"
    lines = [
        f"lcl plan: {source}",
        f"layout      {lay.world} GPUs = {_nodes(lay.nodes)} x {lay.gpus_per_node}: "
        f"tp {lay.tp} x pp {lay.pp} x dp {lay.dp}; "
        f"sequence parallel LM {on(lay.sp)}, ViT {on(lay.vit_sp)}; ZeRO {lay.zero_stage}; {tr.precision}",
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
        ["stage", "model TFLOP", "with recompute", "DP GiB", "TP GiB", "PP GiB"],
        [[str(s.index), f"{s.model_flops / 1e12:,.1f}", f"{s.hardware_flops / 1e12:,.1f}", _gib(s.dp_bytes),
          _gib(s.tp_bytes), _gib(s.pp_bytes)] for s in plan.stages])
    lines += [
        "",
        f"step        {plan.model_flops / 1e15:,.2f} PFLOP model (6 x params x tokens + attention), "
        f"{plan.hardware_flops / 1e15:,.2f} PFLOP with recomputation",
    ]
    if plan.balanced_first_stage_layers not in (None, plan.stage_layers[0]):
        lines.append(f"note        LM layers per stage: {' / '.join(map(str, plan.stage_layers))}; "
                     f"parallel.pp_first_stage_layers={plan.balanced_first_stage_layers} would balance the "
                     f"stages' FLOPs (with {plan.images_per_microbatch} images per micro-batch)")
    if lay.tp > lay.gpus_per_node:
        lines.append(f"note        the TP group ({lay.tp}) spans nodes: its all-reduces cross the network")
    if lay.sp and not lay.vit_sp:
        lines.append(f"note        the ViT sequence ({v.num_patches + 1}) is not divisible by tp {lay.tp}: "
                     f"the ViT runs without sequence parallelism")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lcl plan", description="Per-GPU memory, FLOPs and communication "
                                     "of a config's parallel layout.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  lcl plan --config configs/lcl_vit_6b_llama7b.yaml --nodes 8 --gpus-per-node 8")
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--nodes", type=int, default=None, help="default: the fewest whole nodes the layout fills")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, validate=False)
        validate_model(cfg.model)
        nodes = args.nodes
        if nodes is None:  # the fewest whole nodes the layout fills
            model_parallel = max(1, cfg.parallel.tp * cfg.parallel.pp)
            nodes = model_parallel // math.gcd(model_parallel, max(1, args.gpus_per_node))
        check_layout(cfg, nodes, args.gpus_per_node)  # user errors fail before the model is built
        plan = make_plan(cfg, nodes, args.gpus_per_node)
    except ConfigError as e:
        print(f"lcl plan: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, cfg, args.config))
    return 0
