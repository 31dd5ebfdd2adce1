"""The run configuration: one typed schema, read from YAML with `key=value` overrides.

Every check that can fail on user input runs here, before any model is built,
and raises `ConfigError` with a one-line message naming the key; the CLI turns
it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lcl_megatron import tokens


class ConfigError(ValueError):
    """A user error in the configuration: printed as one line, exit code 2."""


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """The causal language model. `arch: clip` is the reference's decoder;
    `arch: llama` swaps in RMSNorm, SwiGLU, rotary positions and grouped-query attention."""

    arch: str = "clip"
    context_length: int = 128
    vocab_size: int = tokens.VOCAB_SIZE
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    # llama only
    num_query_groups: int = 0  # 0: same as heads (multi-head attention)
    ffn_hidden_size: int = 0  # 0: derived from mlp_ratio
    rotary_base: float = 10000.0


@dataclass
class ModelConfig:
    embed_dim: int = 512  # D: the LM width and the latent size
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    pool_heads: int = 8
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100)


@dataclass
class DataConfig:
    # Shard directories or globs, each optionally followed by ":WEIGHT" for mixing;
    # "embedded:digits" is the built-in corpus, built at first use.
    path: list = field(default_factory=lambda: ["embedded:digits"])
    heldout: str = "embedded:digits"  # zero-shot split; "" disables zero-shot eval
    num_workers: int = 0
    split: str = "shards"  # shards: each DP rank reads its own shards; samples: all read, each keeps its rows
    shuffle_buffer: int = 256
    img_first_prob: float = 0.5  # pairs: image before caption with this probability
    min_similarity: float = 0.24  # MMC4: drop images matched below this
    max_images: int = 6  # MMC4: images kept per document
    packing: bool = False  # several samples per row, attention confined to each (batches gain position_ids, cu_seqlens)
    pack_open_rows: int = 8  # packing: rows filled at a time (first fit); more rows, fuller rows


@dataclass
class LossConfig:
    generation_weight: float = 1.0
    contrastive_weight: float = 0.1
    # Emu-like regression of each image latent from the LM output before it (0: off, as in LCL).
    regression_weight: float = 0.0
    impl: str = "fused"  # "fused" (kernels/: chunked, never all logits at once) or "torch" (plain)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.2
    grad_clip: float = 0.0  # global-norm clipping; 0 disables


@dataclass
class ScheduleConfig:
    warmup_steps: int = 2000
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    micro_batch_size: int = 8
    grad_accumulation: int = 1
    precision: str = "fp32"  # fp32 | bf16 (bf16 compute, fp32 master weights and loss)
    exit_interval: int = 0  # stop with a checkpoint after this many steps in this process (0: run to train.steps)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    sp: bool = False
    zero_stage: int = 0
    activation_checkpointing_vit: bool = False
    activation_checkpointing_lm: bool = False
    pp_first_stage_layers: int = -1  # LM layers on the first pipeline stage (it also holds the ViT); -1: even split
    max_images: int = 0  # images per micro-batch the pipeline's static shapes allow; 0: micro_batch_size x data.max_images
    timeout_s: float = 600.0  # collective timeout: a dead or hung rank ends the job after this long


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0: only at the end
    keep: int = 3  # newest complete checkpoints kept


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    name: str = "lcl"
    dir: str = ""  # default: runs/<name>


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or os.path.join("runs", self.run.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- reading


def _coerce(value, typ, key: str):
    """Check `value` against the annotated type `typ`; ints are accepted as floats."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"config key '{key}' must be a list of strings, got {value!r}")
    raise ConfigError(f"config key '{key}' must be {typ.__name__}, got {value!r}")


def _merge(obj, updates: dict, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise ConfigError(f"unknown config key '{key}'")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give a mapping, got {value!r}")
            _merge(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def parse_overrides(overrides: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), validate: bool = True) -> Config:
    cfg = Config()
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping")
        _merge(cfg, data)
    _merge(cfg, parse_overrides(list(overrides)))
    if validate:
        validate_config(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _merge(cfg, data)
    return cfg


# ---------------------------------------------------------------- checking


def _require(cond: bool, key: str, message: str):
    if not cond:
        raise ConfigError(f"config key '{key}' {message}")


def validate_model(m: ModelConfig) -> None:
    v, t = m.vision, m.text
    for key, value in [
        ("model.embed_dim", m.embed_dim), ("model.pool_heads", m.pool_heads),
        ("model.vision.image_size", v.image_size), ("model.vision.patch_size", v.patch_size),
        ("model.vision.width", v.width), ("model.vision.layers", v.layers),
        ("model.vision.head_width", v.head_width), ("model.text.context_length", t.context_length),
        ("model.text.width", t.width), ("model.text.heads", t.heads), ("model.text.layers", t.layers),
    ]:
        _require(value > 0, key, f"must be positive, got {value}")
    _require(v.image_size % v.patch_size == 0, "model.vision.patch_size",
             f"must divide model.vision.image_size ({v.image_size}), got {v.patch_size}")
    _require(v.width % v.head_width == 0, "model.vision.head_width",
             f"must divide model.vision.width ({v.width}), got {v.head_width}")
    _require(t.width == m.embed_dim, "model.text.width", f"must equal model.embed_dim ({m.embed_dim}), got {t.width}")
    _require(t.width % t.heads == 0, "model.text.heads", f"must divide model.text.width ({t.width}), got {t.heads}")
    _require(m.embed_dim % m.pool_heads == 0, "model.pool_heads",
             f"must divide model.embed_dim ({m.embed_dim}), got {m.pool_heads}")
    _require(t.arch in ("clip", "llama"), "model.text.arch", f"must be 'clip' or 'llama', got {t.arch!r}")
    _require(t.vocab_size >= tokens.VOCAB_SIZE, "model.text.vocab_size",
             f"must be at least {tokens.VOCAB_SIZE} (CLIP BPE + image tokens), got {t.vocab_size}")
    groups = t.num_query_groups or t.heads
    _require(t.heads % groups == 0, "model.text.num_query_groups", f"must divide model.text.heads ({t.heads}), got {groups}")
    _require(t.arch == "llama" or groups == t.heads, "model.text.num_query_groups",
             "is only supported with model.text.arch=llama")
    _require(t.context_length > v.num_patches + 3, "model.text.context_length",
             f"must exceed the image run of {v.num_patches + 2} tokens, got {t.context_length}")
    _require(m.max_logit_scale > 0, "model.max_logit_scale", "must be positive")


def _check_data_path(entry: str, key: str) -> None:
    if entry.startswith("embedded:"):
        from lcl_megatron.data.embedded import EMBEDDED_CORPORA

        name = entry.split(":", 1)[1]
        _require(name in EMBEDDED_CORPORA, key, f"names an unknown embedded corpus {name!r} "
                 f"(known: {', '.join(sorted(EMBEDDED_CORPORA))})")
        return
    location = entry.rsplit(":", 1)[0] if _has_weight(entry) else entry
    if not (os.path.exists(location) or glob.glob(location)):
        raise ConfigError(f"config key '{key}': data path '{location}' does not exist")


def _has_weight(entry: str) -> bool:
    head, sep, tail = entry.rpartition(":")
    if not sep or not head:
        return False
    try:
        float(tail)
        return True
    except ValueError:
        return False


def validate_config(cfg: Config, check_data: bool = True) -> None:
    """Every check of user input; `check_data=False` skips the data paths (planning a run elsewhere)."""
    validate_model(cfg.model)
    o, s, t, p = cfg.optim, cfg.schedule, cfg.train, cfg.parallel
    _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _require(0 <= o.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {o.beta1}")
    _require(0 <= o.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {o.beta2}")
    _require(o.eps > 0, "optim.eps", f"must be positive, got {o.eps}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {o.grad_clip}")
    _require(s.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {s.warmup_steps}")
    _require(0 <= s.min_lr <= o.lr, "schedule.min_lr", f"must be in [0, optim.lr], got {s.min_lr}")
    _require(t.steps > 0, "train.steps", f"must be positive, got {t.steps}")
    _require(t.micro_batch_size > 0, "train.micro_batch_size", f"must be positive, got {t.micro_batch_size}")
    _require(t.grad_accumulation > 0, "train.grad_accumulation", f"must be positive, got {t.grad_accumulation}")
    _require(t.exit_interval >= 0, "train.exit_interval", f"must be >= 0, got {t.exit_interval}")
    _require(t.precision in ("fp32", "bf16"), "train.precision", f"must be 'fp32' or 'bf16', got {t.precision!r}")
    _require(cfg.loss.impl in ("torch", "fused"), "loss.impl", f"must be 'torch' or 'fused', got {cfg.loss.impl!r}")
    _require(cfg.loss.generation_weight >= 0, "loss.generation_weight", "must be >= 0")
    _require(cfg.loss.contrastive_weight >= 0, "loss.contrastive_weight", "must be >= 0")
    _require(cfg.loss.regression_weight >= 0, "loss.regression_weight", "must be >= 0")
    _require(cfg.loss.generation_weight + cfg.loss.contrastive_weight + cfg.loss.regression_weight > 0,
             "loss.generation_weight", "and the contrastive and regression weights are all 0: nothing to train")
    _require(p.tp >= 1, "parallel.tp", f"must be >= 1, got {p.tp}")
    _require(p.pp >= 1, "parallel.pp", f"must be >= 1, got {p.pp}")
    _require(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}")
    _require(p.pp == 1 or p.zero_stage <= 1, "parallel.zero_stage",
             f"must be 0 or 1 with pipeline parallelism (DeepSpeed's pipeline engine refuses more), got {p.zero_stage}")
    _require(not p.sp or p.tp > 1, "parallel.sp", "needs parallel.tp > 1")
    _require(not p.sp or cfg.model.text.context_length % p.tp == 0, "parallel.sp",
             f"needs model.text.context_length ({cfg.model.text.context_length}) divisible by parallel.tp ({p.tp})")
    _require(p.pp <= cfg.model.text.layers, "parallel.pp",
             f"must not exceed model.text.layers ({cfg.model.text.layers}), got {p.pp}")
    _require(p.pp_first_stage_layers < 0 or p.pp == 1 or p.pp_first_stage_layers <= cfg.model.text.layers - (p.pp - 1),
             "parallel.pp_first_stage_layers",
             f"must leave each of the other {p.pp - 1} stages an LM layer (at most {cfg.model.text.layers - p.pp + 1})")
    _require(p.max_images >= 0, "parallel.max_images", "must be >= 0")
    _require(p.timeout_s > 0, "parallel.timeout_s", "must be positive")
    for key, heads in (("model.vision", cfg.model.vision.heads), ("model.text", cfg.model.text.heads),
                       ("model.text.num_query_groups", cfg.model.text.num_query_groups or cfg.model.text.heads)):
        _require(heads % p.tp == 0, "parallel.tp", f"must divide the heads of {key} ({heads}), got {p.tp}")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _require(cfg.logging.every >= 1, "logging.every", "must be >= 1")
    _require(0 <= cfg.data.img_first_prob <= 1, "data.img_first_prob", "must be in [0, 1]")
    _require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(cfg.data.split in ("shards", "samples"), "data.split", f"must be 'shards' or 'samples', got {cfg.data.split!r}")
    _require(cfg.data.pack_open_rows >= 1, "data.pack_open_rows", "must be >= 1")
    _require(not cfg.data.packing or p.pp == 1, "data.packing", "is not supported with parallel.pp > 1 yet")
    _require(not cfg.data.packing or cfg.model.text.arch == "clip", "data.packing",
             "needs model.text.arch=clip (packed rotary positions are not supported yet)")
    _require(len(cfg.data.path) > 0, "data.path", "must name at least one dataset")
    if not check_data:
        return
    for i, entry in enumerate(cfg.data.path):
        _check_data_path(entry, f"data.path[{i}]" if len(cfg.data.path) > 1 else "data.path")
    if cfg.data.heldout:
        _check_data_path(cfg.data.heldout, "data.heldout")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(parallel: ParallelConfig, world_size: int) -> int:
    """The data-parallel size of `parallel` on `world_size` processes, or ConfigError naming the fix."""
    model_parallel = parallel.tp * parallel.pp
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp x parallel.pp = "
                          f"{parallel.tp} x {parallel.pp}; launch a multiple of {model_parallel} processes")
    return world_size // model_parallel
