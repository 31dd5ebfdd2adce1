"""The canonical training state of a DeepSpeed checkpoint of any layout, read from its files in one process.

DeepSpeed writes one set of files per rank; this reads them one model-parallel
rank at a time (as its universal-checkpoint conversion, ds_to_universal.py,
does) instead of re-creating the source's world of processes, so a checkpoint
of any number of GPUs is read with the memory of its canonical state:

    mp_rank_MM_model_states.pt               counters and LR scheduler; ZeRO-0: the module's weights and
                                             torch's AdamW state; ZeRO-1/2: `param_shapes` (flat order)
    layer_LL-model_TT-model_states.pt        pipeline: one layer's weights on TP rank TT
    zero_pp_rank_D_mp_rank_MM_optim_states.pt  ZeRO-1/2 (bf16_ prefix: bf16 without ZeRO): DP rank D's
                                             slice of each group's flat fp32 master and Adam moments,
                                             `param_slice_mappings` says which parameter lies where
    zero_pp_rank_D_mp_rank_MM_model_states.pt / ..._optim_states.pt  ZeRO-3: every parameter cut into
                                             equal padded pieces, piece D of each in DP rank D's flat group

MM = pipeline stage * TP + TP rank. Each parameter's TP shards are joined
into the single-process tensor by the rule sharding.py shards them with.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import torch

from lcl_megatron.checkpoint.format import safe_torch_load
from lcl_megatron.config import Config
from lcl_megatron.errors import UserError
from lcl_megatron.model.state import no_weight_decay

STATES = ("fp32", "exp_avg", "exp_avg_sq")


class UnreadableCheckpoint(UserError, ValueError):
    """DeepSpeed files missing or of a kind this reader does not know: one line, exit code 2."""


def _load(path: Path) -> dict:
    if not path.is_file():
        raise UnreadableCheckpoint(f"'{path.parent}' lacks DeepSpeed's file {path.name}")
    return safe_torch_load(path)


def _model_states_file(ckpt: Path, mp: int, zero: int) -> Path:
    # ZeRO-3 writes one per DP rank (identical counters); DP rank 0's serves.
    return ckpt / (f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt" if zero == 3 else
                   f"mp_rank_{mp:02d}_model_states.pt")


def _optim_file(ckpt: Path, dp_rank: int, mp: int) -> Path:
    name = f"zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt"
    return ckpt / name if (ckpt / name).is_file() else ckpt / f"bf16_{name}"


# ---------------------------------------------------------------- one model-parallel rank's local state


def _module_weights(ckpt: Path, states: dict, stage_layers: range | None, tp_rank: int) -> OrderedDict:
    """Parameter name -> weight, in the module's parameter order (pipeline: from its layer files)."""
    if stage_layers is None:
        buffers = set(states.get("buffer_names") or ())
        return OrderedDict((k, v) for k, v in states["module"].items()
                           if isinstance(v, torch.Tensor) and k not in buffers and not k.endswith("_extra_state"))
    weights = OrderedDict()
    for layer in stage_layers:
        path = ckpt / f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"
        if path.is_file():  # a layer without parameters leaves no file
            for k, v in _load(path).items():
                if isinstance(v, torch.Tensor) and not k.endswith("_extra_state"):
                    weights[f"{layer}.{k}"] = v
    return weights


def _torch_adam_state(states: dict, weights: OrderedDict) -> dict:
    """ZeRO-0: torch's AdamW state_dict numbers the parameters group by group, in the groups' order;
    the groups are those the optimizer builds by `no_weight_decay` (decay, then no decay), each in module order."""
    optimizer = states.get("optimizer")
    if not optimizer or "state" not in optimizer:
        raise UnreadableCheckpoint("the model states file holds no optimizer state")
    groups = [[n for n, w in weights.items() if not no_weight_decay(n, w)],
              [n for n, w in weights.items() if no_weight_decay(n, w)]]
    local = {key: {} for key in STATES}
    steps = set()
    for names, group in zip(groups, optimizer["param_groups"]):
        if len(names) != len(group["params"]):
            raise UnreadableCheckpoint(f"an optimizer group of {len(group['params'])} parameters where the model "
                                       f"has {len(names)}")
        for name, index in zip(names, group["params"]):
            state = optimizer["state"].get(index, {})
            local["fp32"][name] = weights[name].float()
            for key in STATES[1:]:
                local[key][name] = state[key].float() if key in state else torch.zeros(weights[name].shape)
            if "step" in state:
                steps.add(int(state["step"]))
    return {"local": local, "steps": steps}


def _flat_state(osd: dict, group: int, zero3: bool) -> dict:
    base = osd["optimizer_state_dict"]["state"] if zero3 else osd["base_optimizer_state"]["state"]
    flat = osd["fp32_flat_groups"] if zero3 else osd["single_partition_of_fp32_groups"]
    state = base.get(group, {})
    return {"fp32": flat[group], **{key: state.get(key, torch.zeros_like(flat[group])) for key in STATES[1:]},
            "step": state.get("step")}


def _partitioned_adam_state(ckpt: Path, mp: int, dp: int, shapes: OrderedDict, zero3: bool) -> dict:
    """ZeRO-1/2/3 and the bf16 optimizer: every DP rank's flat pieces, one file at a time, cut into
    parameters and joined in DP order."""
    pieces = {key: {name: [] for name in shapes} for key in STATES}
    steps = set()
    for dp_rank in range(dp):
        osd = _load(_optim_file(ckpt, dp_rank, mp))["optimizer_state_dict"]
        if zero3:
            # Each parameter takes ceil(numel / dp) elements of every rank's groups, in param_shapes order.
            flats = [_flat_state(osd, g, True) for g in range(len(osd["fp32_flat_groups"]))]
            joined = {key: torch.cat([f[key].flatten() for f in flats]) for key in STATES}
            offset = 0
            for name, shape in shapes.items():
                size = -(-shape.numel() // dp)
                for key in STATES:  # copies: the file's tensors are freed before the next is read
                    pieces[key][name].append(joined[key][offset:offset + size].clone())
                offset += size
            steps |= {int(f["step"]) for f in flats if f["step"] is not None}
            continue
        for group, mapping in enumerate(osd["param_slice_mappings"]):
            flat = _flat_state(osd, group, False)
            if flat["step"] is not None:
                steps.add(int(flat["step"]))
            for name, fragment in mapping.items():
                for key in STATES:
                    pieces[key][name].append(flat[key].narrow(0, fragment.start, fragment.numel).clone())
        del osd
    local = {key: {} for key in STATES}
    for key in STATES:
        for name, shape in shapes.items():
            flat = torch.cat(pieces[key].pop(name)) if pieces[key][name] else torch.empty(0)
            if flat.numel() < shape.numel():
                raise UnreadableCheckpoint(f"the optimizer files of model-parallel rank {mp} hold "
                                           f"{flat.numel()} of {name}'s {shape.numel()} elements")
            local[key][name] = flat[:shape.numel()].float().reshape(shape)
    return {"local": local, "steps": steps}


# ---------------------------------------------------------------- joining TP shards, naming


def _join_tp(name: str, shards: list[torch.Tensor], shape: tuple, gated_text: bool) -> torch.Tensor:
    """TP shards of one parameter -> the canonical tensor of `shape`; a replicated one is taken from TP rank 0."""
    from lcl_megatron.model.sharding import join_shards

    local = tuple(shards[0].shape)
    if len(shards) == 1 or local == tuple(shape):
        return shards[0][tuple(slice(0, n) for n in shape)]
    dims = [d for d, (a, b) in enumerate(zip(local, shape)) if a != b]
    if len(dims) != 1 or len(local) != len(shape):
        raise UnreadableCheckpoint(f"{name}: TP shards of shape {list(local)} do not make {list(shape)}")
    split = SimpleNamespace(tensor_model_parallel=True, partition_dim=dims[0],
                            glu_fc1=gated_text and name.startswith("text."))
    return join_shards(name, shards, split, tuple(shape))


def _stage_layers(cfg: Config) -> list[range]:
    from lcl_megatron.model.pipeline import stage_boundaries

    parts = stage_boundaries(cfg.model.text.layers, cfg.parallel.pp, cfg.parallel.pp_first_stage_layers)
    return [range(start, end) for start, end in zip(parts, parts[1:])]


def _canonical_namer(cfg: Config):
    """Local parameter name -> single-process name (pipeline stages name theirs by layer index)."""
    if cfg.parallel.pp == 1:
        return lambda name: name
    from lcl_megatron.model.names import block_prefixes
    from lcl_megatron.model.pipeline import canonical_name

    prefixes = block_prefixes(cfg.model.text.layers)
    layers = {i: SimpleNamespace(CANONICAL=p) for i, p in enumerate(prefixes)}
    return lambda name: canonical_name(name, layers)


# ---------------------------------------------------------------- the whole state


def read_training_state(ckpt: Path, cfg: Config, world_size: int) -> tuple[dict, dict]:
    """-> ({'fp32/NAME', 'exp_avg/NAME', 'exp_avg_sq/NAME': canonical fp32 tensor}, optimizer.json's fields)."""
    from lcl_megatron.model.build import expected_tensor_shapes

    ckpt = Path(ckpt)
    tp, pp, zero = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage
    dp = world_size // (tp * pp)
    expected = expected_tensor_shapes(cfg.model)
    gated_text = cfg.model.text.arch == "llama"
    canonical = _canonical_namer(cfg)
    stages = _stage_layers(cfg) if pp > 1 else [None]
    tensors, steps, meta = {}, set(), None
    for stage, layers in enumerate(stages):
        shards = {key: {} for key in STATES}  # canonical name -> [TP rank 0's, 1's, ...]
        for tp_rank in range(tp):
            mp = stage * tp + tp_rank
            states = _load(_model_states_file(ckpt, mp, zero))
            if meta is None:
                meta = {"global_steps": int(states.get("global_steps") or 0),
                        "global_samples": int(states.get("global_samples") or 0),
                        "skipped_steps": int(states.get("skipped_steps") or 0),
                        "lr_scheduler": states.get("lr_scheduler")}
            flat_files = zero > 0 or _optim_file(ckpt, 0, mp).is_file()
            if flat_files:
                shapes = OrderedDict((n, torch.Size(s)) for group in (states.get("param_shapes") or ())
                                     for n, s in group.items())
                if not shapes:  # the bf16 optimizer without ZeRO leaves param_shapes out
                    weights = _module_weights(ckpt, states, layers, tp_rank)
                    shapes = OrderedDict((n, w.shape) for n, w in weights.items())
                read = _partitioned_adam_state(ckpt, mp, dp, shapes, zero3=zero == 3)
            else:
                read = _torch_adam_state(states, _module_weights(ckpt, states, layers, tp_rank))
            del states
            steps |= read["steps"]
            for key, local in read["local"].items():
                for name, value in local.items():
                    shards[key].setdefault(canonical(name), []).append(value)
        for key, by_name in shards.items():
            for name, pieces in by_name.items():
                if name not in expected:
                    raise UnreadableCheckpoint(f"DeepSpeed's files hold '{name}', which the config's model lacks")
                tensors[f"{key}/{name}"] = _join_tp(name, pieces, expected[name], gated_text).contiguous()
    if len(steps) > 1:
        raise UnreadableCheckpoint(f"the optimizer's parameter groups are at different Adam steps: {sorted(steps)}")
    return tensors, {"adam_step": steps.pop() if steps else 0, **meta}

