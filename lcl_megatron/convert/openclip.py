"""The reference's OpenCLIP format <-> our checkpoint.

    lcl convert from-openclip --checkpoint FILE --model-config FILE.json --out DIR
    lcl convert to-openclip --checkpoint DIR --out FILE

Names map one to one except the attention in-projection: OpenCLIP stacks
[q; k; v] for all heads, megatron-core interleaves them per head.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import torch

from lcl_megatron import tokens
from lcl_megatron.checkpoint.consolidated import CheckpointMismatch, check_tensors, read_checkpoint, write_checkpoint
from lcl_megatron.checkpoint.format import CheckpointError, open_checkpoint, safe_torch_load
from lcl_megatron.config import Config, ConfigError, ModelConfig, TextConfig, VisionConfig, validate_model
from lcl_megatron.convert.output import OutputRefused, add_output_flags, atomic_directory, check_output, mark_file

# (OpenCLIP name pattern, our name pattern); {i} is a layer index, {t} is "visual" or "text".
_TOWER_LAYER = [
    ("ln_1.weight", "input_layernorm.weight"), ("ln_1.bias", "input_layernorm.bias"),
    ("attn.in_proj_weight", "self_attention.linear_qkv.weight"),
    ("attn.in_proj_bias", "self_attention.linear_qkv.bias"),
    ("attn.out_proj.weight", "self_attention.linear_proj.weight"),
    ("attn.out_proj.bias", "self_attention.linear_proj.bias"),
    ("ln_2.weight", "pre_mlp_layernorm.weight"), ("ln_2.bias", "pre_mlp_layernorm.bias"),
    ("mlp.c_fc.weight", "mlp.linear_fc1.weight"), ("mlp.c_fc.bias", "mlp.linear_fc1.bias"),
    ("mlp.c_proj.weight", "mlp.linear_fc2.weight"), ("mlp.c_proj.bias", "mlp.linear_fc2.bias"),
]
_FIXED = {
    "logit_scale": "logit_scale",
    "visual.class_embedding": "visual.class_embedding",
    "visual.positional_embedding": "visual.positional_embedding",
    "visual.conv1.weight": "visual.conv1.weight",
    "visual.ln_pre.weight": "visual.ln_pre.weight", "visual.ln_pre.bias": "visual.ln_pre.bias",
    "visual.ln_post.weight": "visual.ln_post.weight", "visual.ln_post.bias": "visual.ln_post.bias",
    "text.token_embedding.weight": "text.embedding.token_embedding.weight",
    "text.positional_embedding": "text.embedding.positional_embedding",
    "text.text_projection": "text.context_head.text_projection",
    "text.ln_final.weight": "text.context_head.ln_final.weight",
    "text.ln_final.bias": "text.context_head.ln_final.bias",
    "lm_head.0.weight": "text.lm_head.norm.weight", "lm_head.0.bias": "text.lm_head.norm.bias",
    "lm_head.1.weight": "text.lm_head.output_layer.weight",
    "pool_project.query_token": "pool_project.query_token",
    **{f"pool_project.pooler.norm1_{x}.{p}": f"pool_project.norm1_{x}.{p}" for x in "qkv" for p in ("weight", "bias")},
    **{f"pool_project.pooler.cross_attn.{x}_bias": f"pool_project.{x}_bias" for x in "qkv"},
    **{f"pool_project.pooler.cross_attn.{x}.weight": f"pool_project.{x}.weight" for x in ("q", "k", "v", "proj")},
}
_LAYER = re.compile(r"^(visual|text)\.transformer\.resblocks\.(\d+)\.(.+)$")
_OUR_LAYER = re.compile(r"^(visual|text)\.layers\.(\d+)\.(.+)$")


def openclip_to_ours_name(name: str) -> str | None:
    if name in _FIXED:
        return _FIXED[name]
    m = _LAYER.match(name)
    if m:
        for theirs, ours in _TOWER_LAYER:
            if m.group(3) == theirs:
                return f"{m.group(1)}.layers.{m.group(2)}.{ours}"
    return None


def ours_to_openclip_name(name: str) -> str | None:
    for theirs, ours in _FIXED.items():
        if ours == name:
            return theirs
    m = _OUR_LAYER.match(name)
    if m:
        for theirs, ours in _TOWER_LAYER:
            if m.group(3) == ours:
                return f"{m.group(1)}.transformer.resblocks.{m.group(2)}.{theirs}"
    return None


def _heads_of(name: str, cfg: ModelConfig) -> int:
    return cfg.vision.heads if name.startswith("visual.") else cfg.text.heads


def qkv_to_megatron(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[3 * H * d, ...] stacked q;k;v -> per-head interleaved [H * (q, k, v) * d, ...]."""
    rest = t.shape[1:]
    return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(t.shape)


def qkv_from_megatron(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def from_openclip_state_dict(sd: dict, cfg: ModelConfig) -> dict:
    """OpenCLIP-format tensors -> our names and layouts (raises CheckpointMismatch on unknown names)."""
    out, unknown = {}, []
    for name, tensor in sd.items():
        ours = openclip_to_ours_name(name)
        if ours is None:
            unknown.append(name)
            continue
        if ours.endswith("linear_qkv.weight") or ours.endswith("linear_qkv.bias"):
            tensor = qkv_to_megatron(tensor, _heads_of(name, cfg))
        if ours == "logit_scale":
            tensor = tensor.reshape(1)
        out[ours] = tensor
    if unknown:
        raise CheckpointMismatch(f"checkpoint has tensors the LCL model does not: {', '.join(sorted(unknown)[:8])}"
                                 + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""))
    return out


def to_openclip_state_dict(tensors: dict, cfg: ModelConfig) -> dict:
    out = {}
    for name, tensor in tensors.items():
        theirs = ours_to_openclip_name(name)
        if theirs is None:
            raise CheckpointMismatch(f"tensor '{name}' has no OpenCLIP counterpart")
        if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
            tensor = qkv_from_megatron(tensor, _heads_of(theirs, cfg))
        if name == "logit_scale":
            tensor = tensor.reshape(())
        out[theirs] = tensor
    return out


def model_config_from_openclip(oc: dict) -> ModelConfig:
    """An OpenCLIP LCL model-config JSON -> ModelConfig, with the reference's defaults for omitted keys."""
    try:
        v, t, pp = oc["vision_cfg"], oc["text_cfg"], oc.get("pool_project_cfg", {})
        if oc.get("quick_gelu") or v.get("act_kwargs") or t.get("act_kwargs"):
            raise ConfigError("model config uses QuickGELU or custom activations; LCL configs use exact GELU")
        special = oc.get("special_token_ids", tokens.SPECIAL_TOKEN_IDS)
        if special != tokens.SPECIAL_TOKEN_IDS:
            raise ConfigError(f"model config's special_token_ids {special} differ from {tokens.SPECIAL_TOKEN_IDS}")
        if pp.get("pool_proj_type", "attn") != "attn":
            raise ConfigError(f"pool_proj_type {pp['pool_proj_type']!r} is not supported (only 'attn')")
        cfg = ModelConfig(
            embed_dim=int(oc["embed_dim"]),
            vision=VisionConfig(image_size=int(v.get("image_size", 224)), patch_size=int(v.get("patch_size", 16)),
                                width=int(v.get("width", 768)), layers=int(v.get("layers", 12)),
                                head_width=int(v.get("head_width", 64)), mlp_ratio=float(v.get("mlp_ratio", 4.0))),
            text=TextConfig(context_length=int(t.get("context_length", 77)), vocab_size=int(t.get("vocab_size", 49408)),
                            width=int(t.get("width", 512)), heads=int(t.get("heads", 8)), layers=int(t.get("layers", 12)),
                            mlp_ratio=float(t.get("mlp_ratio", 4.0))),
            pool_heads=int(pp.get("attn_num_heads", 8)),
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model config is not an OpenCLIP LCL config: {e!r}") from None
    if pp and int(pp.get("input_dim", cfg.vision.width)) != cfg.vision.width:
        raise ConfigError("pool_project_cfg.input_dim must equal vision_cfg.width")
    if pp and int(pp.get("output_dim", cfg.embed_dim)) != cfg.embed_dim:
        raise ConfigError("pool_project_cfg.output_dim must equal embed_dim")
    validate_model(cfg)
    return cfg


def model_config_to_openclip(cfg: ModelConfig) -> dict:
    v, t = cfg.vision, cfg.text
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": v.image_size, "layers": v.layers, "width": v.width, "patch_size": v.patch_size,
                       "head_width": v.head_width, "mlp_ratio": v.mlp_ratio},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio,
                     "tokenizer_kwargs": {"additional_special_tokens": list(tokens.ADDED_SPECIAL_TOKENS)}},
        "pool_project_cfg": {"pool_proj_type": "attn", "input_dim": v.width, "output_dim": cfg.embed_dim,
                             "attn_num_heads": cfg.pool_heads},
        "special_token_ids": dict(tokens.SPECIAL_TOKEN_IDS),
        "custom_text": True,
    }


def safe_load_tensors(path: Path):
    """The file's tensors and plain data; anything else is refused, never run."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing them
            warnings.simplefilter("ignore")
            return safe_torch_load(path)
    except CheckpointError:
        raise CheckpointMismatch(f"'{path}' is not a weights-only torch file (loading it could run code); "
                                 "refused") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointMismatch(f"cannot read checkpoint '{path}': {str(e).splitlines()[0]}") from None


def read_openclip_checkpoint(path: Path) -> dict:
    """A bare state dict or one under 'state_dict', with or without DDP's 'module.' prefix."""
    obj = safe_load_tensors(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatch(f"'{path}' holds no state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


FROM_OPENCLIP = "lcl convert from-openclip"
TO_OPENCLIP = "lcl convert to-openclip"
# Each command's --help: what it does, and an example.
_HELP = {
    FROM_OPENCLIP: (
        "Import a reference (OpenCLIP-format) LCL checkpoint as a checkpoint of ours, which lcl eval, "
        "lcl convert and lcl train --init-from read.",
        "lcl convert from-openclip --checkpoint exports/demo_openclip.pt --model-config exports/demo_openclip.json "
        "--out ckpt/demo_imported"),
    TO_OPENCLIP: (
        "Export a checkpoint (or a run's newest) in the reference's OpenCLIP format: one torch state-dict file.",
        "lcl convert to-openclip --checkpoint runs/demo --out exports/demo_openclip.pt "
        "--model-config-out exports/demo_openclip.json"),
}


def _parser(prog: str) -> argparse.ArgumentParser:
    description, example = _HELP[prog]
    return argparse.ArgumentParser(prog=prog, description=description, epilog=f"example:\n  {example}",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def from_openclip_main(argv=None) -> int:
    from lcl_megatron.model.build import expected_tensor_shapes

    p = _parser(FROM_OPENCLIP)
    p.add_argument("--checkpoint", required=True, help="OpenCLIP-format LCL checkpoint (.pt)")
    p.add_argument("--model-config", required=True, help="its OpenCLIP model-config JSON")
    add_output_flags(p, "output checkpoint directory")
    args = p.parse_args(argv)
    try:
        check_output(Path(args.out), FROM_OPENCLIP, is_dir=True, force=args.force,
                     inputs=[args.checkpoint, args.model_config])
        try:
            oc = json.loads(Path(args.model_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read model config '{args.model_config}': {e}") from None
        model_cfg = model_config_from_openclip(oc)
        sd = read_openclip_checkpoint(Path(args.checkpoint))
        tensors = from_openclip_state_dict(sd, model_cfg)
        check_tensors(expected_tensor_shapes(model_cfg), tensors)
        cfg = Config(model=model_cfg)
        out = Path(args.out)
        with atomic_directory(out, FROM_OPENCLIP) as tmp:
            write_checkpoint(tmp, cfg, tensors, meta={"source": str(args.checkpoint), "format": "openclip"})
    except (ConfigError, CheckpointMismatch, OutputRefused, OSError) as e:
        print(f"{FROM_OPENCLIP}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def to_openclip_main(argv=None) -> int:
    import io

    from lcl_megatron.utils import atomic_write_bytes, atomic_write_text

    p = _parser(TO_OPENCLIP)
    p.add_argument("--checkpoint", required=True, help="our checkpoint (directory)")
    add_output_flags(p, "output .pt file (a bare OpenCLIP state dict)")
    p.add_argument("--model-config-out", help="also write the OpenCLIP model-config JSON here (same rules as --out)")
    args = p.parse_args(argv)
    outs = [Path(args.out)] + ([Path(args.model_config_out)] if args.model_config_out else [])
    try:
        for out in outs:
            check_output(out, TO_OPENCLIP, is_dir=False, force=args.force, inputs=[args.checkpoint])
        ckpt, _ = open_checkpoint(Path(args.checkpoint))  # every file against its checksum
        cfg, tensors = read_checkpoint(ckpt)
        sd = to_openclip_state_dict(tensors, cfg.model)
        buf = io.BytesIO()
        torch.save(sd, buf)
        atomic_write_bytes(args.out, buf.getvalue())
        mark_file(Path(args.out), TO_OPENCLIP)
        if args.model_config_out:
            atomic_write_text(args.model_config_out, json.dumps(model_config_to_openclip(cfg.model), indent=1))
            mark_file(Path(args.model_config_out), TO_OPENCLIP)
    except (ConfigError, CheckpointMismatch, OutputRefused, FileNotFoundError) as e:
        print(f"{TO_OPENCLIP}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only place or a full disk, found while writing
        print(f"{TO_OPENCLIP}: cannot write '{e.filename or args.out}': {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0
