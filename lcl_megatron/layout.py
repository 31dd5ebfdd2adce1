"""The parallel layout of a run: one object, validated once, that every command consults.

`lcl train`, `lcl plan`, the launchers, the process-group setup and
`lcl convert reshard` all build a `Layout` and read its sizes; none keeps its
own rules. Constructing one checks everything about the layout that can be
wrong, before any model or process group exists, and refuses with a
`ConfigError` (one line, exit 2) that names the fix:

    sizes       tp, pp >= 1; ZeRO 0-3, and 0-1 under pipeline parallelism
    the world   a multiple of tp x pp processes (when it is known)
    the model   tp divides every head count and MLP width; each pipeline stage
                gets an LM layer (the first may hold the ViT alone)
    the batch   sequence parallelism splits the LM context evenly; packed rows
                stay on one pipeline stage and use learned positions

Rank order (Megatron's and DeepSpeed's alike): tensor-parallel ranks
innermost, then data-parallel, then pipeline stages.

This module sits below `config.py` (which validates every config through it),
so it reads the config sections it is given by their fields and imports none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lcl_megatron.errors import ConfigError


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def nodes_text(n: int) -> str:
    """'1 node', '8 nodes'."""
    return f"{n} node{'s' if n != 1 else ''}"


def lm_layers_per_stage(layers: int, pp: int, first_stage_layers: int = -1) -> list[int]:
    """LM layers on each pipeline stage: the first takes `first_stage_layers` (it also holds the
    ViT; -1: an even share), the rest are spread evenly over the other stages, earlier ones
    taking the remainder (the cut model/pipeline.py makes)."""
    if pp == 1:
        return [layers]
    first = layers // pp if first_stage_layers < 0 else first_stage_layers
    rest, others = layers - first, pp - 1
    return [first] + [rest // others + (1 if stage < rest % others else 0) for stage in range(others)]


def max_images_per_microbatch(cfg) -> int:
    """The images a micro-batch may bring: the pipeline's static bound (parallel.max_images, by
    default micro_batch_size x data.max_images)."""
    return cfg.parallel.max_images or cfg.train.micro_batch_size * cfg.data.max_images


@dataclass(frozen=True)
class Layout:
    """A run's parallel layout on `world` processes, checked on construction.

    `parallel` is the config's parallel section; `model`, `train` and `data` (config sections, or
    None) add the rules that tie the layout to the model, the batch and packing. `world` None: not
    launched yet (a config on its own), every rule but the world's is checked. `gpus_per_node`:
    the world is a cluster of whole nodes (`lcl plan`), and messages count GPUs and nodes.
    """

    parallel: Any  # config.ParallelConfig
    model: Any = None  # config.ModelConfig
    train: Any = None  # config.TrainConfig
    data: Any = None  # config.DataConfig
    world: int | None = None
    gpus_per_node: int | None = None

    @classmethod
    def of(cls, cfg, world: int | None = None, gpus_per_node: int | None = None) -> "Layout":
        """The layout of a whole config (`config.Config`)."""
        return cls(cfg.parallel, cfg.model, cfg.train, cfg.data, world, gpus_per_node)

    def __post_init__(self):
        self._check_sizes()
        if self.model is not None:
            self._check_model()
        if self.data is not None:
            self._check_packing()
        if self.world is not None:
            self._check_world()

    # ------------------------------------------------------------ rules

    def _check_sizes(self) -> None:
        p = self.parallel
        if p.tp < 1:
            raise ConfigError(f"config key 'parallel.tp' must be >= 1, got {p.tp}")
        if p.pp < 1:
            raise ConfigError(f"config key 'parallel.pp' must be >= 1, got {p.pp}")
        if p.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"config key 'parallel.zero_stage' must be 0, 1, 2 or 3, got {p.zero_stage}")
        if p.pp > 1 and p.zero_stage > 1:
            raise ConfigError(f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: DeepSpeed's pipeline "
                              f"engine supports ZeRO 0 or 1 only; set parallel.zero_stage=1 or parallel.pp=1")
        if p.sp and p.tp == 1:
            raise ConfigError("parallel.sp needs parallel.tp > 1; set parallel.sp=false or raise parallel.tp")
        if p.max_images < 0:
            raise ConfigError(f"parallel.max_images must be >= 0 (0: micro_batch_size x data.max_images), "
                              f"got {p.max_images}")

    def _check_model(self) -> None:
        p, v, t = self.parallel, self.model.vision, self.model.text
        for what, count, key in [
            ("ViT heads", v.heads, "model.vision.head_width"),
            ("LM heads", t.heads, "model.text.heads"),
            ("LM query groups", t.num_query_groups or t.heads, "model.text.num_query_groups"),
            ("ViT MLP width", v.ffn_width, "model.vision.mlp_ratio"),
            ("LM MLP width", t.ffn_width, "model.text.ffn_hidden_size" if t.arch == "llama" else "model.text.mlp_ratio"),
        ]:
            if count % p.tp:
                raise ConfigError(f"parallel.tp={p.tp} does not divide the {what} ({count}); "
                                  f"use a tp from {{{_divisors(count)}}} or change {key}")
        if p.pp > t.layers:
            raise ConfigError(f"parallel.pp={p.pp} exceeds the {t.layers} LM layers (model.text.layers); "
                              f"use at most {t.layers} stages")
        most = t.layers - (p.pp - 1)  # every later stage needs an LM layer; the first may hold the ViT alone
        if p.pp > 1 and p.pp_first_stage_layers > most:
            raise ConfigError(f"parallel.pp_first_stage_layers={p.pp_first_stage_layers} exceeds the {most} LM "
                              f"layers the first stage can take (each of the other {p.pp - 1} stages needs one of "
                              f"the {t.layers}); use at most {most}, or -1 for an even split")
        if p.sp and t.context_length % p.tp:
            raise ConfigError(f"parallel.sp splits the LM context ({t.context_length}) over parallel.tp={p.tp}, "
                              f"which does not divide it; set model.text.context_length to a multiple of {p.tp} "
                              f"or parallel.sp=false")

    def _check_packing(self) -> None:
        if not self.data.packing:
            return
        if self.parallel.pp > 1:
            raise ConfigError("data.packing needs parallel.pp=1 (the pipeline's stages exchange rows of fixed "
                              "shape, without document boundaries); set data.packing=false or parallel.pp=1")
        if self.model is not None and self.model.text.arch != "clip":
            raise ConfigError("data.packing needs model.text.arch=clip (the learned positions restart at each "
                              "packed document; rotary ones do not yet); set data.packing=false")

    def _check_world(self) -> None:
        p, world, per_node = self.parallel, self.world, self.gpus_per_node
        if world < 1:
            raise ConfigError(f"world size must be at least 1 process, got {world}")
        model_parallel = p.tp * p.pp
        if world % model_parallel == 0:
            return
        if per_node is not None:
            raise ConfigError(f"{world} GPUs ({nodes_text(self.nodes)} x {per_node}) cannot be filled by tp x pp = "
                              f"{p.tp} x {p.pp}; use a multiple of {model_parallel} GPUs or change parallel.tp/pp")
        raise ConfigError(f"world size {world} is not divisible by parallel.tp x parallel.pp = "
                          f"{p.tp} x {p.pp}; launch a multiple of {model_parallel} processes")

    # ------------------------------------------------------------ sizes

    @property
    def tp(self) -> int:
        return self.parallel.tp

    @property
    def pp(self) -> int:
        return self.parallel.pp

    @property
    def dp(self) -> int:
        """Data-parallel replicas: the world over tp x pp."""
        if self.world is None:
            raise ValueError("the data-parallel size needs the world size")
        return self.world // (self.tp * self.pp)

    @property
    def zero_stage(self) -> int:
        return self.parallel.zero_stage

    @property
    def nodes(self) -> int:
        return self.world // self.gpus_per_node if self.gpus_per_node else 1

    @property
    def microbatches(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (pipeline: in flight per step)."""
        return self.train.grad_accumulation

    @property
    def global_batch(self) -> int:
        """Samples (rows) per optimizer step over all data-parallel ranks."""
        return self.train.micro_batch_size * self.train.grad_accumulation * self.dp

    @property
    def stage_layers(self) -> list[int]:
        """LM layers on each pipeline stage."""
        return lm_layers_per_stage(self.model.text.layers, self.pp, self.parallel.pp_first_stage_layers)

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rows of the embedding and LM head: a multiple of tp, each rank holding an equal slice."""
        return math.ceil(self.model.text.vocab_size / self.tp) * self.tp

    # ------------------------------------------------------------ what is on

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def dp_shard_enabled(self) -> bool:
        """ZeRO divides optimizer state (and at 2-3 gradients, weights) over the data-parallel ranks."""
        return self.zero_stage > 0 and self.dp_enabled

    @property
    def sp_enabled(self) -> bool:
        """Sequence parallelism in the LM between its layers."""
        return self.parallel.sp

    @property
    def vit_sp_enabled(self) -> bool:
        """The ViT sequence (patches + class token) is sliced only where tp divides it, as the model does."""
        return self.sp_enabled and (self.model.vision.num_patches + 1) % self.tp == 0
