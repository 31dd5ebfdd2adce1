"""Our vision encoder as a Megatron-LM multimodal vision checkpoint: `lcl convert to-megatron-vision`.

    lcl convert to-megatron-vision --checkpoint DIR --out MDIR [--tensor-parallel-size N]

MDIR has the layout Megatron-LM's `examples/multimodal` CLIP converter writes
and its `combine_state_dicts.py` / `--load` read:

    latest_checkpointed_iteration.txt
    iter_0000001/mp_rank_XX/model_optim_rng.pt   {"model": state dict of megatron-core's CLIPViTModel}
    lcl_ln_post.safetensors                       the final LayerNorm (see below)
    lcl_export.json                               the CLIPViTModel settings, feature selection, training facts

The state dict is that of `CLIPViTModel(model_subtype="clip")` built from
megatron-core's local ViT layer spec (`class_token`, `position_embeddings`,
`conv1`, `ln_pre`, `decoder.layers.{i}.*`). Our blocks already are
megatron-core layers, so their tensors keep their layout (per-head interleaved
qkv); tensor parallelism splits them as Megatron-LM's converter does. A
CLIPViTModel of type 'clip' has no final LayerNorm, while LCL trained its
features after one: `lcl_ln_post.safetensors` holds it for a consumer that
sets `vision_model.ln_post` (the model applies it whenever it is set).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch

from lcl_megatron.config import Config, ConfigError
from lcl_megatron.convert.feature_selection import selection_record
from lcl_megatron.checkpoint.consolidated import read_checkpoint
from lcl_megatron.checkpoint.format import open_checkpoint
from lcl_megatron.convert.output import add_output_flags, atomic_directory, write_guarded

TO_MEGATRON = "lcl convert to-megatron-vision"
ITERATION = 1
TRACKER_FILE = "latest_checkpointed_iteration.txt"
LN_POST_FILE = "lcl_ln_post.safetensors"
RECORD_FILE = "lcl_export.json"

# The dimension tensor parallelism splits, by the end of the name (as Megatron-LM's CLIP converter splits).
_SPLIT_DIM = {"linear_qkv.weight": 0, "linear_qkv.bias": 0, "linear_fc1.weight": 0, "linear_fc1.bias": 0,
              "linear_proj.weight": 1, "linear_fc2.weight": 1}


def megatron_vision_tensors(tensors: dict) -> dict:
    """Our `visual.*` tensors -> CLIPViTModel's state dict (whole, before tensor parallelism)."""
    out = {
        "class_token": tensors["visual.class_embedding"].reshape(1, 1, -1),
        "position_embeddings.weight": tensors["visual.positional_embedding"],
        "conv1.weight": tensors["visual.conv1.weight"],
        "ln_pre.weight": tensors["visual.ln_pre.weight"],
        "ln_pre.bias": tensors["visual.ln_pre.bias"],
    }
    for name, t in tensors.items():
        if name.startswith("visual.layers."):
            out["decoder.layers." + name[len("visual.layers."):]] = t
    return {k: v.contiguous() for k, v in out.items()}


def split_for_tensor_parallel(state: dict, tp: int) -> list[dict]:
    shards = [{} for _ in range(tp)]
    for name, t in state.items():
        dim = next((d for suffix, d in _SPLIT_DIM.items() if name.endswith(suffix)), None)
        parts = [t] * tp if dim is None else torch.chunk(t, tp, dim=dim)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


def clip_vit_settings(cfg: Config) -> dict:
    """What to build megatron-core's CLIPViTModel and its TransformerConfig with."""
    v = cfg.model.vision
    return {
        "CLIPViTModel": {"model_subtype": "clip", "add_class_token": True, "class_token_len": 1,
                         "patch_dim": v.patch_size, "img_h": v.image_size, "img_w": v.image_size},
        "TransformerConfig": {"num_layers": v.layers, "hidden_size": v.width, "num_attention_heads": v.heads,
                              "kv_channels": v.head_width, "ffn_hidden_size": v.ffn_width,
                              "normalization": "LayerNorm", "layernorm_epsilon": 1e-5, "activation_func": "gelu",
                              "add_bias_linear": True, "add_qkv_bias": True, "gated_linear_unit": False},
        "attn_mask_type": "no_mask",
    }


def export(ckpt: Path, out: Path, tp: int) -> Path:
    from safetensors.torch import save_file

    from lcl_megatron.convert.provenance import training_facts

    ckpt, manifest = open_checkpoint(ckpt)
    cfg, tensors = read_checkpoint(ckpt)
    v = cfg.model.vision
    if tp < 1 or v.heads % tp or v.ffn_width % tp:
        raise ConfigError(f"--tensor-parallel-size {tp} must divide the ViT's {v.heads} heads and its MLP width")
    record = {"written_by": TO_MEGATRON, "source": {"checkpoint": str(ckpt)}, "tensor_parallel_size": tp,
              "megatron_core": clip_vit_settings(cfg), "training": training_facts(cfg, manifest, ckpt),
              "feature_selection": selection_record()}
    with atomic_directory(out, TO_MEGATRON) as tmp:
        for rank, shard in enumerate(split_for_tensor_parallel(megatron_vision_tensors(tensors), tp)):
            path = tmp / f"iter_{ITERATION:07d}" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
            path.parent.mkdir(parents=True)
            buf = io.BytesIO()
            torch.save({"model": shard}, buf)
            path.write_bytes(buf.getvalue())
        (tmp / TRACKER_FILE).write_text(f"{ITERATION}\n")
        save_file({"weight": tensors["visual.ln_post.weight"].contiguous(),
                   "bias": tensors["visual.ln_post.bias"].contiguous()}, str(tmp / LN_POST_FILE))
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return Path(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=TO_MEGATRON, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  lcl convert to-megatron-vision --checkpoint runs/demo "
                                       "--out exports/demo-megatron-vision --tensor-parallel-size 2")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    add_output_flags(p, "output directory, a Megatron-LM checkpoint of the vision model (written atomically)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="tensor-parallel ranks to split into")
    args = p.parse_args(argv)
    out = write_guarded(TO_MEGATRON, args, lambda: export(Path(args.checkpoint), Path(args.out),
                                                          args.tensor_parallel_size))
    return 0 if out is not None else 2
