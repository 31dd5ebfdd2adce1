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

import contextlib
import math
import sys
from dataclasses import dataclass, field

from lcl_megatron.config import Config
from lcl_megatron.layout import Layout, lm_layers_per_stage, max_images_per_microbatch
from lcl_megatron.model.names import LOSS_BLOCK, stage_of

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
    from lcl_megatron.model.state import model_tensors as state_tensors
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

    def tp_bytes(self, tp: int, act_bytes: int, feature_pass: bool) -> float:
        """Per micro-batch: 2 all-reduces forward, 2 backward, 2 more when recomputing and 2 more in
        the feature cache's pass (SP: the same volume as all-gathers and reduce-scatters); a ring
        all-reduce moves 2 (t-1)/t of the tensor."""
        if tp == 1 or not self.layers:
            return 0.0
        forwards = 1 + self.checkpoint + feature_pass
        per_layer = (2 * forwards + 2) * 2 * (tp - 1) / tp * self.seq * self.batch * self.width
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
    hardware_flops: float  # with recomputation and the feature cache's forward (`cfg.accumulates_negatives`)
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
    mbs, micro_batches, act_bytes = cfg.train.micro_batch_size, lay.microbatches, s.pbytes
    first, last = index == 0, index == pp - 1
    stage_tensors = [x for x in s.tensors if stage_of(x.name, stage_layers) == index]
    params = sum(x.numel(tp) for x in stage_tensors)

    lm = Tower(prefix="text.layers.", causal=True, seq=t.context_length, batch=mbs, width=t.width, heads=t.heads,
               query_groups=t.num_query_groups or t.heads, ffn=t.ffn_width, gated=t.arch == "llama",
               sp=lay.sp_enabled, layers=stage_layers[index], checkpoint=cfg.parallel.activation_checkpointing_lm)
    towers = [lm]
    if first:
        towers.insert(0, Tower(prefix="visual.layers.", causal=False, seq=v.num_patches + 1, batch=s.images,
                               width=v.width, heads=v.heads, query_groups=v.heads, ffn=v.ffn_width,
                               gated=False, sp=lay.vit_sp_enabled, layers=v.layers,
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
    # The reference's feature cache: every micro-batch once more forward, without gradient and LM head.
    feature_pass = cfg.accumulates_negatives
    lm_head = sum(2 * x.numel(tp) * tokens_per_microbatch(x.name, cfg, s.images)
                  for x in stage_tensors if x.name.startswith(LOSS_BLOCK["lm_head"] + "."))

    # DP gradient traffic for this stage's parameters, per ZeRO stage: 0 and 1 all-reduce (or
    # reduce-scatter + all-gather) once per step; 2 reduce-scatters every micro-batch; 3 also
    # all-gathers the weights for every forward and backward
    ring = (dp - 1) / dp
    grads = params * s.pbytes
    dp_bytes = {0: 2, 1: 2, 2: micro_batches + 1, 3: 3 * micro_batches}[lay.zero_stage] * ring * grads

    tp_bytes = sum(x.tp_bytes(tp, act_bytes, feature_pass) for x in towers)
    if tp > 1 and first:  # vocab-parallel embedding output: one all-reduce forward
        tp_bytes += 2 * (tp - 1) / tp * mbs * t.context_length * t.width * act_bytes
    if tp > 1 and last:  # LM head input gradient all-reduce; cross-entropy max, sum and target logits
        tp_bytes += 2 * (tp - 1) / tp * mbs * t.context_length * (t.width * act_bytes + 3 * 4)
    # each stage boundary (model/pipeline.py): hidden states (sliced under SP) and the latents padded to
    # the image bound go forward with the token ids and mask (int64), their gradients come back
    boundaries = (0 if first else 1) + (0 if last else 1)
    floating = (mbs * t.context_length * t.width / (tp if lay.sp_enabled else 1) + s.images * t.width) * act_bytes
    forward_bytes = floating + 2 * mbs * t.context_length * 8
    pp_bytes = boundaries * ((1 + feature_pass) * forward_bytes + floating)

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
        hardware_flops=(3 * forward + recompute + feature_pass * (forward - lm_head)) * micro_batches,
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
    layout = Layout.of(cfg, nodes * gpus_per_node, gpus_per_node)
    bf16 = cfg.train.precision == "bf16"
    setup = _Setup(cfg=cfg, layout=layout, tensors=sharded_tensors(cfg, model),
                   images=images_per_microbatch(cfg) if images is None else images,
                   pbytes=2 if bf16 else 4, optimizer_bytes_per_param=12 if bf16 else 8)
    stage_layers = layout.stage_layers
    stages = [_stage(setup, i, stage_layers) for i in range(layout.pp)]
    groups = {"ViT": 0, "pool-project": 0, "LM": 0, "logit_scale": 0}
    names = {"visual": "ViT", "pool_project": "pool-project", "text": "LM"}
    for tensor in setup.tensors:
        key = tensor.name.split(".")[0]
        groups[names.get(key, key)] += tensor.numel()
    replicas = layout.tp * layout.dp
    return Plan(layout=layout, total_params=sum(x.numel() for x in setup.tensors), group_params=groups,
                images_per_microbatch=setup.images,
                global_batch=layout.global_batch,
                model_flops=sum(x.model_flops for x in stages) * replicas,
                hardware_flops=sum(x.hardware_flops for x in stages) * replicas, stage_layers=stage_layers,
                stages=stages,
                balanced_first_stage_layers=balanced_first_stage(setup) if layout.pp_enabled else None)


def _holds(first: bool, last: bool, first_layer: int, layers: int) -> str:
    parts = ["ViT, pool-project, embedding"] if first else []
    if layers == 1:
        parts.append(f"LM layer {first_layer}")
    elif layers > 1:
        parts.append(f"LM layers {first_layer}-{first_layer + layers - 1}")
    if last:
        parts.append("heads")
    return ", ".join(parts)
