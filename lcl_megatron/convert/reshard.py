"""From a training layout to one consolidated checkpoint: `lcl convert reshard`.

    lcl convert reshard --checkpoint DIR --layout consolidated --out DIR [--weights-only]

The output is layout-free: `model.safetensors` (the weights, copied bit for
bit), `optimizer.safetensors` (AdamW's fp32 master weights and both moments
under the single-process tensor names: `fp32/NAME`, `exp_avg/NAME`,
`exp_avg_sq/NAME`), `optimizer.json` (Adam's step, hyper-parameters per
group with their tensor names, the LR scheduler and the engine's counters),
the source's data-loader states, config.yaml with a single-process layout and
a COMPLETE manifest. `lcl eval`, `lcl convert to-hf/to-openclip` and
`lcl train --init-from` read it; `apply_consolidated_state` puts its
optimizer state into a freshly built engine of any ZeRO stage and DP size
(tp = pp = 1), so training continues there as it would have on the source.

Optimizer state is read from DeepSpeed's own files, without running code:
ZeRO-0 (torch AdamW state, matched to names by the optimizer's parameter
groups), ZeRO-1/2 (flat fp32 partitions, split by the recorded parameter
shapes) and ZeRO-3 (per-parameter partitions), at any data-parallel size with
tp = pp = 1. Tensor- or pipeline-parallel optimizer state is refused (exit 2)
unless --weights-only.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
import yaml

from lcl_megatron.config import Config, ConfigError, ParallelConfig
from lcl_megatron.convert.native import CheckpointMismatch, check_tensors
from lcl_megatron.training.checkpoint import CONFIG_FILE, MODEL_FILE, safe_torch_load, write_manifest

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"
STATES = ("fp32", "exp_avg", "exp_avg_sq")


class ReshardError(ValueError):
    """A layout or checkpoint this command cannot convert: one line, exit code 2."""


def parse_layout(text: str) -> dict:
    """'consolidated' or 'tp=1,pp=1,dp=1[,zero=N]' -> {'tp':.., 'pp':.., 'dp':.., 'zero':..}."""
    if text == "consolidated":
        return {"tp": 1, "pp": 1, "dp": 1, "zero": 0}
    layout = {"tp": 1, "pp": 1, "dp": 1, "zero": 0}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in layout or not value.strip().isdigit() or int(value) < (key != "zero"):
            raise ReshardError(f"--layout '{text}': expected 'consolidated' or tp=N,pp=N,dp=N[,zero=0-3]")
        layout[key.strip()] = int(value)
    return layout


# ---------------------------------------------------------------- reading DeepSpeed's optimizer state


def _adam_group_meta(group: dict, names: list[str]) -> dict:
    meta = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay") if k in group}
    meta["betas"] = list(meta.get("betas", ()))
    return {**meta, "names": names}


def _adam_step(state: dict) -> int:
    steps = {int(s["step"]) for s in state.values() if "step" in s}
    if len(steps) > 1:
        raise ReshardError(f"optimizer state has different Adam steps per group: {sorted(steps)}")
    return steps.pop() if steps else 0


def _zero0_state(cfg: Config, model_states: dict) -> tuple[dict, dict]:
    """torch AdamW's state dict, whose parameters are numbered in parameter-group order."""
    from lcl_megatron.model.build import build_model
    from lcl_megatron.training.optim import param_groups

    opt = model_states.get("optimizer")
    if not isinstance(opt, dict) or not {"state", "param_groups"} <= opt.keys():
        raise ReshardError("ZeRO-0 checkpoint holds no plain AdamW state (bf16 without ZeRO is not supported)")
    model = build_model(cfg.model, "meta")
    name_of = {id(p): n for n, p in model.named_parameters()}
    ordered = [[name_of[id(p)] for p in g["params"]] for g in param_groups(model, cfg.optim.weight_decay)]
    if [len(g) for g in ordered] != [len(g["params"]) for g in opt["param_groups"]]:
        raise ReshardError("optimizer parameter groups do not match the model's (different optimizer grouping)")
    tensors = {}
    module = model_states["module"]
    for names, group in zip(ordered, opt["param_groups"]):
        for name, index in zip(names, group["params"]):
            state = opt["state"].get(index, {})
            tensors[f"fp32/{name}"] = module[name].float()
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"{key}/{name}"] = state[key] if key in state else torch.zeros_like(module[name].float())
    meta = {"adam_step": _adam_step(opt["state"]),
            "param_groups": [_adam_group_meta(g, n) for g, n in zip(opt["param_groups"], ordered)]}
    return tensors, meta


def _split_flat(flat: torch.Tensor, shapes: dict, paddings=None) -> dict:
    """ZeRO-1/2: a group's parameters lie one after another in the merged flat vector."""
    out, offset = {}, 0
    for i, (name, shape) in enumerate(shapes.items()):
        numel = math.prod(shape)
        if offset + numel > flat.numel():
            raise ReshardError(f"optimizer partitions are shorter than the recorded parameter shapes (at {name})")
        out[name] = flat.narrow(0, offset, numel).view(shape).clone()
        offset += numel + (paddings[i] if paddings else 0)
    return out


def _split_zero3(flats: list[torch.Tensor], shapes: dict) -> dict:
    """ZeRO-3: each parameter is cut into ceil(numel / dp) pieces, piece r on rank r."""
    out, offset, ranks = {}, 0, len(flats)
    for name, shape in shapes.items():
        numel = math.prod(shape)
        piece = math.ceil(numel / ranks)
        if any(offset + piece > f.numel() for f in flats):
            raise ReshardError(f"optimizer partitions are shorter than the recorded parameter shapes (at {name})")
        out[name] = torch.cat([f.narrow(0, offset, piece) for f in flats])[:numel].view(shape).clone()
        offset += piece
    return out


def _zero_state(ckpt: Path, stage: int, dp: int, model_states: dict) -> tuple[dict, dict]:
    shapes = model_states.get("param_shapes")
    if not shapes:
        raise ReshardError("ZeRO checkpoint records no parameter shapes")
    ranks = []
    for r in range(dp):
        path = ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        if not path.is_file():
            raise CheckpointMismatch(f"checkpoint '{ckpt}': optimizer shard '{path.name}' is missing")
        ranks.append(safe_torch_load(path)["optimizer_state_dict"])
    if stage == 3:
        fp32 = [r["fp32_flat_groups"] for r in ranks]
        base = [r["optimizer_state_dict"] for r in ranks]
    else:
        fp32 = [r["single_partition_of_fp32_groups"] for r in ranks]
        base = [r["base_optimizer_state"] for r in ranks]
    tensors = {}
    for g, group_shapes in enumerate(shapes):
        group_shapes = {n: tuple(s) for n, s in group_shapes.items()}
        per_state = {"fp32": [f[g] for f in fp32],
                     **{k: [b["state"][g][k] for b in base] for k in ("exp_avg", "exp_avg_sq")}}
        for key, parts in per_state.items():
            if stage == 3:
                split = _split_zero3(parts, group_shapes)
            else:
                paddings = ranks[0].get("param_alignment_paddings")
                split = _split_flat(torch.cat(parts), group_shapes, paddings[g] if paddings else None)
            tensors.update({f"{key}/{n}": t for n, t in split.items()})
    groups = base[0]["param_groups"]
    meta = {"adam_step": _adam_step(base[0]["state"]),
            "param_groups": [_adam_group_meta(grp, list(s)) for grp, s in zip(groups, shapes)]}
    return tensors, meta


def consolidated_optimizer(ckpt: Path, cfg: Config, world_size: int) -> tuple[dict, dict]:
    """(tensors, metadata) of the checkpoint's optimizer state under single-process names."""
    if (ckpt / OPTIMIZER_TENSORS).is_file():  # already consolidated
        from safetensors.torch import load_file

        return load_file(str(ckpt / OPTIMIZER_TENSORS)), json.loads((ckpt / OPTIMIZER_STATE).read_text())
    p = cfg.parallel
    if p.tp > 1 or p.pp > 1:
        raise ReshardError(f"consolidating optimizer state of tp={p.tp}, pp={p.pp} checkpoints is not supported yet; "
                           "--weights-only writes the consolidated weights")
    dp = world_size // (p.tp * p.pp)
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if p.zero_stage == 3 else "mp_rank_00_model_states.pt"
    if not (ckpt / name).is_file():
        raise ReshardError(f"checkpoint '{ckpt}' holds no optimizer state (no DeepSpeed '{name}'); "
                           "--weights-only writes the consolidated weights")
    model_states = safe_torch_load(ckpt / name)
    if p.zero_stage == 0:
        tensors, meta = _zero0_state(cfg, model_states)
    else:
        tensors, meta = _zero_state(ckpt, p.zero_stage, dp, model_states)
    meta.update({k: model_states.get(k) for k in ("global_steps", "global_samples", "skipped_steps", "lr_scheduler")})
    meta["source_layout"] = {"tp": p.tp, "pp": p.pp, "dp": dp, "zero": p.zero_stage}
    return tensors, meta


# ---------------------------------------------------------------- loading into an engine of any layout


def _init_zero_states(engine, step: int) -> None:
    """DeepSpeed creates Adam's flat state at the first step; create it now (zeros) and link the
    per-parameter views DeepSpeed's safe_set_full_* API writes through."""
    opt = engine.optimizer
    base = opt.optimizer
    flats = opt.fp32_partitioned_groups_flat if engine.zero_optimization_stage() == 3 \
        else opt.single_partition_of_fp32_groups
    for flat in flats:
        base.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(flat),
                            "exp_avg_sq": torch.zeros_like(flat)}
    if engine.zero_optimization_stage() < 3:
        for lp_group, flat in zip(opt.bit16_groups, flats):
            for lp in lp_group:
                if getattr(lp, "_hp_mapping", None) is not None:
                    lp._hp_mapping.set_optim_state_fragment(flat, base.state[flat])
        opt._hp_optimizer_states_linked = True


def apply_consolidated_state(engine, ckpt: Path) -> dict:
    """Put a consolidated checkpoint's optimizer state into a freshly built engine (ZeRO 0-3, any DP
    size, tp = pp = 1), whose module already holds the checkpoint's weights (`--init-from`).

    Returns the optimizer metadata (step counters)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors.torch import load_file

    if is_pipeline_or_tp(engine):
        raise ReshardError("loading consolidated optimizer state into tp > 1 or pp > 1 engines is not supported yet")
    tensors = load_file(str(Path(ckpt) / OPTIMIZER_TENSORS))
    meta = json.loads((Path(ckpt) / OPTIMIZER_STATE).read_text())
    step = int(meta["adam_step"])
    params = dict(engine.module.named_parameters())
    missing = sorted(set(params) - {k.split("/", 1)[1] for k in tensors if k.startswith("exp_avg/")})
    if missing:
        raise CheckpointMismatch(f"optimizer state of '{ckpt}' lacks {', '.join(missing[:8])}")
    if engine.zero_optimization():
        _init_zero_states(engine, step)
        for name, param in params.items():
            safe_set_full_fp32_param(param, tensors[f"fp32/{name}"])
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, tensors[f"{key}/{name}"], key)
    else:
        optimizer = engine.optimizer
        for name, param in params.items():
            with torch.no_grad():
                param.copy_(tensors[f"fp32/{name}"])
            optimizer.state[param] = {"step": torch.tensor(float(step)), **{
                key: tensors[f"{key}/{name}"].clone() for key in ("exp_avg", "exp_avg_sq")}}
    if engine.lr_scheduler is not None and meta.get("lr_scheduler"):
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        # Loading a scheduler's state leaves its optimizer's rates as they were: set them too.
        for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = int(meta.get("global_steps") or 0)
    engine.global_samples = int(meta.get("global_samples") or 0)
    engine.skipped_steps = int(meta.get("skipped_steps") or 0)
    return meta


def is_pipeline_or_tp(engine) -> bool:
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_world_size() > 1
            or parallel_state.get_pipeline_model_parallel_world_size() > 1)


# ---------------------------------------------------------------- writing


def reshard_to_consolidated(src: Path, out: Path, weights_only: bool = False) -> Path:
    from safetensors.torch import save_file

    from lcl_megatron.convert.inspect import open_checkpoint
    from lcl_megatron.convert.writer import atomic_directory, read_checkpoint
    from lcl_megatron.model.build import expected_tensor_shapes

    ckpt, manifest = open_checkpoint(src)
    cfg, _ = read_checkpoint(ckpt)  # config against the consolidated tensors
    world = int(manifest.get("world_size", 1))
    optimizer = None if weights_only else consolidated_optimizer(ckpt, cfg, world)
    if optimizer is not None:
        expected = expected_tensor_shapes(cfg.model)
        for key in STATES:
            given = {k[len(key) + 1:]: v for k, v in optimizer[0].items() if k.startswith(key + "/")}
            check_tensors(expected, given, what=f"optimizer state '{key}' of '{ckpt}'")
    source_layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
                     "dp": world // (cfg.parallel.tp * cfg.parallel.pp), "zero": cfg.parallel.zero_stage}
    single = ParallelConfig(activation_checkpointing_vit=cfg.parallel.activation_checkpointing_vit,
                            activation_checkpointing_lm=cfg.parallel.activation_checkpointing_lm)
    cfg.parallel = single
    with atomic_directory(out) as tmp:
        shutil.copyfile(ckpt / MODEL_FILE, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        for loader in sorted(ckpt.glob("loader_dp*.json")):
            shutil.copyfile(loader, tmp / loader.name)
        if optimizer is not None:
            tensors, meta = optimizer
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / OPTIMIZER_TENSORS))
            (tmp / OPTIMIZER_STATE).write_text(json.dumps(meta, indent=1, default=float))
        write_manifest(tmp, {"step": manifest.get("step", 0), "world_size": 1, "resharded_from": str(ckpt),
                             "source_layout": source_layout})
    return Path(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lcl convert reshard", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--layout", required=True, help="'consolidated' (or tp=1,pp=1,dp=1)")
    p.add_argument("--out", required=True, help="output checkpoint directory (replaced atomically)")
    p.add_argument("--weights-only", action="store_true", help="leave out the optimizer state")
    args = p.parse_args(argv)
    try:
        layout = parse_layout(args.layout)
        if layout != {"tp": 1, "pp": 1, "dp": 1, "zero": 0}:
            raise ReshardError(f"--layout '{args.layout}': writing DeepSpeed layouts is not supported yet; "
                               "reshard to 'consolidated'")
        out = reshard_to_consolidated(Path(args.checkpoint), Path(args.out), weights_only=args.weights_only)
    except (ConfigError, CheckpointMismatch, ReshardError, FileNotFoundError) as e:
        print(f"lcl convert reshard: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
