"""The run configuration: one typed schema, read from YAML with `key=value` overrides.

Every check that can fail on user input runs here (the parallel layout's in
layout.py, which this module calls), before any model is built, and raises
`ConfigError` with a one-line message naming the key; the CLI turns it into
exit code 2.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lcl_megatron import tokens
from lcl_megatron.errors import ConfigError
from lcl_megatron.layout import Layout


@dataclass
class VisionConfig:
    image_size: int = 224
    """input image side in pixels (images are cropped and resized to it)"""
    patch_size: int = 32
    """ViT patch side in pixels; (image_size / patch_size)^2 patches, one LM token each"""
    width: int = 768
    """ViT hidden size"""
    layers: int = 12
    """ViT transformer layers"""
    head_width: int = 64
    """ViT attention head size; heads = width / head_width"""
    mlp_ratio: float = 4.0
    """ViT MLP hidden size as a multiple of width"""

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def ffn_width(self) -> int:
        """The MLP hidden size of each ViT layer."""
        return int(self.width * self.mlp_ratio)


@dataclass
class TextConfig:
    """The causal language model. `arch: clip` is the reference's decoder;
    `arch: llama` swaps in RMSNorm, SwiGLU, rotary positions and grouped-query attention."""

    arch: str = "clip"
    """LM architecture: clip (the reference's decoder) or llama (RMSNorm, SwiGLU, rotary, grouped-query attention)"""
    context_length: int = 128
    """tokens per training row, image tokens included"""
    vocab_size: int = tokens.VOCAB_SIZE
    """LM vocabulary: the CLIP BPE plus the image tokens, at least the built-in minimum"""
    width: int = 512
    """LM hidden size; must equal model.embed_dim"""
    heads: int = 8
    """LM attention heads"""
    layers: int = 12
    """LM transformer layers"""
    mlp_ratio: float = 4.0
    """LM MLP hidden size as a multiple of width"""
    # llama only
    num_query_groups: int = 0
    """llama only: key/value head groups; 0: same as heads (multi-head attention)"""
    ffn_hidden_size: int = 0
    """llama only: SwiGLU hidden size; 0: Llama's rule, 2/3 of 4 x width rounded up to a multiple of 256"""
    rotary_base: float = 10000.0
    """llama only: rotary position embedding base"""

    @property
    def ffn_width(self) -> int:
        """The MLP hidden size of each LM layer: llama's ffn_hidden_size, or by default Llama's 2/3 of
        4 x width rounded up to a multiple of 256 (SwiGLU); clip's width x mlp_ratio."""
        if self.arch == "llama":
            return self.ffn_hidden_size or 256 * math.ceil(int(2 * 4 * self.width / 3) / 256)
        return int(self.width * self.mlp_ratio)


@dataclass
class ModelConfig:
    embed_dim: int = 512
    """D: the LM width and the size of each image latent"""
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    pool_heads: int = 8
    """attention heads of the pool-project that turns ViT patches into the latent"""
    init_logit_scale: float = math.log(1 / 0.07)
    """initial contrastive temperature, as log(1/T) (learned)"""
    max_logit_scale: float = math.log(100)
    """cap on the learned logit scale, as a log: the parameter is clamped to [0, max_logit_scale] after every step"""
    init: str = "reference"
    """reference: the reference's init per tensor family (PyTorch defaults in the ViT, OpenCLIP's text tower, nn.Linear's LM head); openclip_text: OpenCLIP's text-tower init (std width^-0.5, output projections (2 layers)^-0.5, zero biases) in both towers and the head"""


@dataclass
class DataConfig:
    path: list = field(default_factory=lambda: ["embedded:digits"])
    """training shard directories or globs, each optionally followed by :WEIGHT for mixing; embedded:digits is the built-in corpus, built at first use"""
    heldout: str = "embedded:digits"
    """zero-shot evaluation data; "" disables zero-shot eval"""
    num_workers: int = -1
    """data-loader worker processes per reading rank; -1: automatic (0 on CPU-only machines, up to 4 per GPU process)"""
    split: str = "shards"
    """shards: each data-parallel rank reads its own shards; samples: all read everything, each keeps its rows (global batch independent of the layout)"""
    shuffle_buffer: int = 5000
    """samples held in each stream's shuffle buffer (the reference's size for pairs)"""
    interleave_shards: int = 8
    """shards each stream reads at once, a sample from each in turn"""
    augment: bool = True
    """training images: the reference's random resized crop (area fraction in [crop_scale_min, 1], aspect 3/4..4/3, bicubic); false: the evaluation transform (resize + centre crop)"""
    crop_scale_min: float = 0.9
    """smallest area fraction of the random resized crop"""
    img_first_prob: float = 0.5
    """image-text pairs: probability the image comes before its caption"""
    min_similarity: float = 0.24
    """MMC4: drop images matched to their text below this CLIP similarity"""
    max_images: int = 6
    """MMC4: images kept per document"""
    packing: bool = False
    """put several samples in one row, attention confined to each (batches gain position_ids, cu_seqlens)"""
    pack_open_rows: int = 8
    """packing: rows filled at a time (first fit); more rows give fuller rows"""


@dataclass
class LossConfig:
    generation_weight: float = 1.0
    """weight of the next-token generation loss"""
    contrastive_weight: float = 0.1
    """weight of the contrastive loss between each image latent and the LM output before it"""
    regression_weight: float = 0.0
    """weight of the Emu-like regression of each image latent from the LM output before it (0: off, as in LCL)"""
    impl: str = "fused"
    """fused (kernels/: chunked, never all logits at once) or torch (plain)"""
    accumulate_negatives: bool = True
    """with train.grad_accumulation > 1: each image's contrastive negatives span every micro-batch of the optimizer step and the losses are normalised over the step, so the step's losses and gradients are those of one batch of them all (the reference's accum_freq feature cache; costs one extra forward without gradient per micro-batch, under pipeline parallelism a pass of its own through every stage); false: each micro-batch alone"""


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """peak learning rate (AdamW)"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.98
    """AdamW beta2"""
    eps: float = 1e-6
    """AdamW epsilon"""
    weight_decay: float = 0.2
    """AdamW weight decay (not applied to 1-D parameters such as biases and norm gains, nor to the logit scale)"""
    grad_clip: float = 0.0
    """global gradient-norm clipping; 0 disables"""


@dataclass
class ScheduleConfig:
    warmup_steps: int = 2000
    """linear warmup steps, then cosine decay to min_lr at train.steps"""
    min_lr: float = 0.0
    """learning rate at the end of the cosine decay"""


@dataclass
class TrainConfig:
    steps: int = 1000
    """optimizer steps of the whole run (train.samples, when set, decides instead)"""
    samples: int = 0
    """samples to train on; > 0 overrides train.steps with the steps that see this many samples at the run's global batch, as the reference derives its steps from epochs x batches per epoch"""
    seed: int = 0
    """seed of weights, data order and augmentation"""
    micro_batch_size: int = 8
    """rows per data-parallel rank per micro-step"""
    grad_accumulation: int = 1
    """micro-steps per optimizer step; global batch = micro_batch_size x grad_accumulation x data-parallel size"""
    precision: str = "fp32"
    """fp32, or bf16 (bf16 compute; fp32 master weights, gradient accumulation and reduction)"""
    tf32: bool = True
    """on GPUs, fp32 matmuls and convolutions on tensor cores (TF32), as Megatron-LM does; false for bit-level comparisons"""
    profile_steps: str = ""
    """START:END: a torch.profiler trace of these steps (1-based, inclusive) into <run>/profile/"""
    exit_interval: int = 0
    """stop with a checkpoint after this many steps in this process; 0: run to train.steps"""


@dataclass
class ParallelConfig:
    tp: int = 1
    """tensor-parallel size (megatron-core column/row-parallel layers)"""
    pp: int = 1
    """pipeline stages (DeepSpeed pipeline engine; ViT and embedding on the first)"""
    sp: bool = False
    """sequence parallelism between layers (needs tp > 1)"""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (0-1 with pp > 1)"""
    activation_checkpointing_vit: bool = False
    """recompute ViT layers in backward to save memory"""
    activation_checkpointing_lm: bool = False
    """recompute LM layers in backward to save memory"""
    pp_first_stage_layers: int = -1
    """LM layers on the first pipeline stage (it also holds the ViT); -1: even split"""
    max_images: int = 0
    """images per micro-batch the pipeline's static shapes allow; 0: micro_batch_size x data.max_images"""
    timeout_s: float = 600.0
    """collective timeout in seconds: a dead or hung rank ends the job after this long"""


@dataclass
class CheckpointConfig:
    every: int = 0
    """steps between checkpoints; 0: only at the end"""
    keep: int = 3
    """newest complete checkpoints kept"""
    consolidate: str = "end"
    """when a save also writes the single-process model.safetensors: 'end' (the run's last save), 'every' save,
    or N (every N-th save and the last); without it eval and convert read DeepSpeed's files"""
    async_save: bool = True
    """write checkpoints in a background thread from a host copy of the state while training goes on; a file whose
    copy would take more than its share of half the free host memory (shared by the node's ranks) is written before
    training resumes"""
    timeout_s: float = 3600.0
    """how long ranks wait for each other during a save (a gloo group of its own, not parallel.timeout_s)"""


@dataclass
class LoggingConfig:
    every: int = 10
    """steps between rows of metrics.jsonl and TensorBoard points"""
    tensorboard: bool = True
    """also write TensorBoard events to <run>/tensorboard"""
    progress: bool = True
    """show progress on stderr: a bar in a terminal, one line per logged step in a log file"""
    wandb: bool = False
    """also log to Weights & Biases (needs the wandb package; WANDB_MODE=offline works without network)"""
    wandb_project: str = "lcl-megatron"
    """the W&B project of the run"""


@dataclass
class EvalConfig:
    every: int = 0
    """steps between evaluations during training (0: none; data.heldout still gets the final zero-shot)"""
    zeroshot: list = field(default_factory=list)
    """labelled sets for zero-shot: embedded:NAME, image folders, shards + class names"""
    retrieval: list = field(default_factory=list)
    """image-text sets for retrieval: embedded:NAME, shards of image + txt, captions.tsv"""
    batch_size: int = 64
    """images per forward pass of an evaluation"""


@dataclass
class RunConfig:
    name: str = "lcl"
    """run name: the default run directory is runs/<name>, and the Slurm job name"""
    dir: str = ""
    """run directory (config, metrics, checkpoints, logs); "": runs/<run.name>"""


@dataclass
class Config:
    """Every setting of a run. The string under each field is its one-line meaning: `lcl config keys`
    and docs/config.md are generated from them (lcl_megatron/config_docs.py)."""

    run: RunConfig = field(default_factory=RunConfig)
    """run name and directory"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """model architecture"""
    data: DataConfig = field(default_factory=DataConfig)
    """training and evaluation data"""
    loss: LossConfig = field(default_factory=LossConfig)
    """loss weights and implementation"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """optimizer"""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """learning-rate schedule"""
    train: TrainConfig = field(default_factory=TrainConfig)
    """steps, batch and precision"""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """parallel layout"""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """checkpointing"""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """metrics and progress output"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """evaluations during training"""

    @property
    def accumulates_negatives(self) -> bool:
        """Whether a step's contrastive negatives and loss normalisation span all its micro-batches
        (`loss.accumulate_negatives`; with one micro-batch there is nothing to span)."""
        return self.loss.accumulate_negatives and self.train.grad_accumulation > 1

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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
            return number
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


class _ConfigLoader(yaml.SafeLoader):
    """YAML as configs mean it: `10:12` is the text "10:12", not YAML 1.1's base-60 number 612,
    and a mapping refuses a key given twice (PyYAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"config key '{key}' is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if not (tag == "tag:yaml.org,2002:int" and ":" in regexp.pattern)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))


def load_yaml(text: str):
    return yaml.load(text, Loader=_ConfigLoader)


def _merge_override(tree: dict, key: str, value, item: str) -> None:
    """Put `value` at the dotted `key` of `tree`; a mapping merges key by key, and a key
    that is already set is an error (the same key given twice)."""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}' conflicts with another override")
    name = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(name, {}), dict):
        node.setdefault(name, {})
        for sub, sub_value in value.items():
            _merge_override(tree, f"{key}.{sub}", sub_value, item)
    elif name in node:
        raise ConfigError(f"config key '{key}' is given twice in the overrides")
    else:
        node[name] = value


def parse_overrides(overrides: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML, and a section
    given as a mapping ('train={steps: 3}') sets only the keys it names."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw != "" else ""
        except ConfigError:
            raise
        except yaml.YAMLError:
            value = raw
        _merge_override(tree, key.strip(), value, item)
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), validate: bool = True) -> Config:
    cfg = Config()
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start})") from None
        try:
            data = load_yaml(text) or {}
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
    shortest = v.num_patches + 4  # <start_of_text>, the image run (<start_of_img>, P patches, <end_of_img>), a token
    _require(t.context_length >= shortest, "model.text.context_length",
             f"must be at least {shortest} (<start_of_text>, an image run of {v.num_patches + 2} tokens and one "
             f"more token), got {t.context_length}")
    _require(m.max_logit_scale > 0, "model.max_logit_scale", "must be positive")
    _require(m.init in ("reference", "openclip_text"), "model.init", f"must be 'reference' or 'openclip_text', got {m.init!r}")


def data_entries(cfg: Config) -> list[tuple[str, str]]:
    """(config key, entry) of every dataset the config names: training, held-out and evaluation sets."""
    entries = [(f"data.path[{i}]" if len(cfg.data.path) > 1 else "data.path", e) for i, e in enumerate(cfg.data.path)]
    if cfg.data.heldout:
        entries.append(("data.heldout", cfg.data.heldout))
    for kind in ("zeroshot", "retrieval"):
        entries += [(f"eval.{kind}[{i}]", e) for i, e in enumerate(getattr(cfg.eval, kind))]
    return entries


def _check_data_path(entry: str, key: str) -> None:
    if entry.startswith("embedded:"):
        return  # the data package knows the corpora: `lcl train` checks the name before building anything
    try:
        location, _ = parse_data_entry(entry)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from None
    if location.startswith(PIPE_PREFIX):
        return  # a command's output cannot be checked before it runs; a failing one is reported by shard
    missing = [p for p in expand_braces(location) if not (os.path.exists(p) or glob.glob(p))]
    if missing:
        raise ConfigError(f"config key '{key}': data path '{missing[0]}' does not exist"
                          + (f" (nor {len(missing) - 1} more of '{location}')" if len(missing) > 1 else ""))


# A data.path entry: LOCATION[:WEIGHT]. LOCATION is embedded:NAME, a directory of .tar shards, a glob,
# a brace list as OpenCLIP users write them (/data/laion/{00000..41455}.tar), or a webdataset-style
# pipe:COMMAND whose standard output is one tar (pipe:aws s3 cp s3://bucket/{0000..0099}.tar -).
PIPE_PREFIX = "pipe:"


def parse_data_entry(entry: str) -> tuple[str, float]:
    """"LOCATION" or "LOCATION:WEIGHT" -> (location, weight); the weight defaults to 1."""
    head, sep, tail = entry.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return entry, 1.0
        if not weight > 0 or not math.isfinite(weight):
            raise ValueError(f"data path '{entry}' has a weight that is not a positive number")
        return head, weight
    return entry, 1.0


def expand_braces(location: str) -> list[str]:
    """`{a,b}` and `{000..099}` lists expanded, as bash and webdataset do."""
    from braceexpand import braceexpand

    return list(braceexpand(location)) if "{" in location else [location]


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """"START:END" -> (START, END); "" -> None. ValueError with the reason otherwise."""
    if not text:
        return None
    start, sep, end = text.partition(":")
    try:
        first, last = int(start), int(end if sep else start)
    except ValueError:
        raise ValueError(f"must be START:END (steps, e.g. 10:12), got {text!r}") from None
    if not 1 <= first <= last:
        raise ValueError(f"must be START:END with 1 <= START <= END, got {text!r}")
    return first, last


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
    _require(t.samples >= 0, "train.samples", f"must be >= 0, got {t.samples}")
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
    Layout.of(cfg)  # the layout's rules; its world is checked where it is known (Layout.of(cfg, world))
    _require(p.timeout_s > 0, "parallel.timeout_s", "must be positive")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    consolidate = str(cfg.checkpoint.consolidate)
    _require(consolidate in ("end", "every") or (consolidate.isdigit() and int(consolidate) >= 1),
             "checkpoint.consolidate", f"must be 'end', 'every' or a number of saves >= 1, got {consolidate!r}")
    _require(cfg.checkpoint.timeout_s > 0, "checkpoint.timeout_s", "must be positive")
    _require(cfg.logging.every >= 1, "logging.every", "must be >= 1")
    _require(cfg.eval.every >= 0, "eval.every", "must be >= 0")
    _require(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _require(not cfg.eval.every or cfg.eval.zeroshot or cfg.eval.retrieval, "eval.every",
             "needs a set to evaluate: eval.zeroshot or eval.retrieval")
    _require(0 <= cfg.data.img_first_prob <= 1, "data.img_first_prob", "must be in [0, 1]")
    try:
        parse_profile_steps(t.profile_steps)
    except ValueError as e:
        raise ConfigError(f"config key 'train.profile_steps' {e}") from None
    _require(0 < cfg.data.crop_scale_min <= 1, "data.crop_scale_min", f"must be in (0, 1], got {cfg.data.crop_scale_min}")
    _require(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1, got {cfg.data.shuffle_buffer}")
    _require(cfg.data.interleave_shards >= 1, "data.interleave_shards",
             f"must be >= 1, got {cfg.data.interleave_shards}")
    _require(cfg.data.num_workers >= -1, "data.num_workers", f"must be >= 0, or -1 (auto), got {cfg.data.num_workers}")
    _require(cfg.data.split in ("shards", "samples"), "data.split", f"must be 'shards' or 'samples', got {cfg.data.split!r}")
    _require(cfg.data.pack_open_rows >= 1, "data.pack_open_rows", "must be >= 1")
    _require(len(cfg.data.path) > 0, "data.path", "must name at least one dataset")
    if not check_data:
        return
    for key, entry in data_entries(cfg):
        _check_data_path(entry, key)


def steps_for(train: TrainConfig, dp_size: int) -> int:
    """Optimizer steps of a run on `dp_size` data-parallel replicas: train.steps, or with
    train.samples the fewest steps that see that many samples."""
    if train.samples:
        return math.ceil(train.samples / (train.micro_batch_size * train.grad_accumulation * dp_size))
    return train.steps


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))

