"""Our vision encoder as a Hugging Face CLIP vision tower: `lcl convert to-hf`.

    lcl convert to-hf --checkpoint DIR --out HFDIR

HFDIR is a folder that publishes as it is (`--push-to-hub REPO`): what
`CLIPVisionModel.from_pretrained` and `CLIPImageProcessor.from_pretrained` read
(config.json, model.safetensors, preprocessor_config.json); the attentive
pool-project (lcl_pool_project.safetensors, .json and the loader
lcl_pool_project.py); the LLaVA tower variant (lcl_vision_tower.py); a record
of the export (lcl_export.json: which features LCL trained, what each consumer
must select, the training facts read from the run) and a model card (README.md).

Our ViT is OpenCLIP's: HF's CLIP vision model has the same computation
(pre-LN blocks, exact GELU, LayerNorm eps 1e-5, ln_pre as `pre_layrnorm`).
The only layout change is megatron's fused, per-head interleaved qkv, which
HF keeps as three projections. HF applies `post_layernorm` to the class token
only; the patch features LCL uses are post_layernorm of the patch tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import yaml

from lcl_megatron.config import Config
from lcl_megatron.convert.feature_selection import selection_record, selection_table
from lcl_megatron.convert.hub import push_folder
from lcl_megatron.convert.openclip import qkv_from_megatron
from lcl_megatron.checkpoint.consolidated import read_checkpoint
from lcl_megatron.checkpoint.format import open_checkpoint
from lcl_megatron.convert.output import add_output_flags, atomic_directory, write_guarded
from lcl_megatron.data.images import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

TO_HF = "lcl convert to-hf"
LOADER_MODULE = "lcl_pool_project.py"
TOWER_MODULE = "lcl_vision_tower.py"
RECORD_FILE = "lcl_export.json"
POOL_PREFIX = "pool_project."
DEFAULT_LICENSE = "other"
_PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as OpenCLIP's eval transform resizes

# Our per-layer names -> HF's, inside `vision_model.encoder.layers.{i}.`
_LAYER_NAMES = {
    "input_layernorm": "layer_norm1",
    "self_attention.linear_proj": "self_attn.out_proj",
    "pre_mlp_layernorm": "layer_norm2",
    "mlp.linear_fc1": "mlp.fc1",
    "mlp.linear_fc2": "mlp.fc2",
}


def hf_vision_config(cfg: Config, dtype: torch.dtype) -> dict:
    v = cfg.model.vision
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": v.width,
        "intermediate_size": v.ffn_width,
        "num_hidden_layers": v.layers,
        "num_attention_heads": v.heads,
        "num_channels": 3,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": "gelu",  # exact (erf) GELU, as our layers use; not quick_gelu
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "projection_dim": cfg.model.embed_dim,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def hf_preprocessor_config(image_size: int) -> dict:
    """OpenCLIP's eval transform: shorter side to image_size (bicubic), centre crop, OpenAI mean/std."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": _PIL_BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_DATASET_MEAN),
        "image_std": list(OPENAI_DATASET_STD),
    }


def hf_vision_tensors(tensors: dict, cfg: Config) -> dict:
    """Our `visual.*` tensors -> CLIPVisionModel's state dict."""
    heads = cfg.model.vision.heads
    out = {
        "vision_model.embeddings.class_embedding": tensors["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": tensors["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": tensors["visual.positional_embedding"],
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"vision_model.{theirs}.{p}"] = tensors[f"visual.{ours}.{p}"]
    for i in range(cfg.model.vision.layers):
        src, dst = f"visual.layers.{i}.", f"vision_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            for ours, theirs in _LAYER_NAMES.items():
                out[f"{dst}{theirs}.{p}"] = tensors[f"{src}{ours}.{p}"]
            q, k, v = qkv_from_megatron(tensors[f"{src}self_attention.linear_qkv.{p}"], heads).chunk(3, dim=0)
            for name, t in (("q", q), ("k", k), ("v", v)):
                out[f"{dst}self_attn.{name}_proj.{p}"] = t
    return {k: v.contiguous() for k, v in out.items()}


def pool_project_files(tensors: dict, cfg: Config) -> tuple[dict, dict]:
    weights = {k[len(POOL_PREFIX):]: v.contiguous() for k, v in tensors.items() if k.startswith(POOL_PREFIX)}
    config = {"input_dim": cfg.model.vision.width, "output_dim": cfg.model.embed_dim,
              "num_heads": cfg.model.pool_heads, "layer_norm_eps": 1e-5}
    return weights, config


def _facts_lines(facts: dict) -> str:
    if facts.get("imported_from"):
        return f"- **Training data, steps:** not recorded (imported from the OpenCLIP checkpoint {facts['imported_from']})"
    evals = "; ".join(f"{k} = {v['value']:.4g} (step {v['step']})" for k, v in facts["evaluation"].items())
    return "\n".join([f"- **Training data:** {', '.join(facts['data']) or '(not recorded)'}",
                      f"- **Training steps:** {facts['steps']}",
                      f"- **Samples seen:** {facts['samples_seen']} ({facts['global_batch']} per step)",
                      f"- **Evaluation:** {evals or 'none logged in the run up to this step'}"])


def model_card(cfg: Config, record: dict) -> str:
    v = cfg.model.vision
    full = cfg.to_dict()
    trained = {k: full[k] for k in ("model", "data", "train", "optim", "schedule", "loss")}
    facts = record["training"]
    index = {"name": f"lcl-vit-{v.width}-{v.layers}", "results": [
        {"task": {"type": "zero-shot-image-classification"}, "dataset": {"name": cfg.data.heldout or "held-out",
                                                                          "type": cfg.data.heldout or "held-out"},
         "metrics": [{"type": k, "value": e["value"]} for k, e in facts["evaluation"].items()]}
    ]} if facts["evaluation"] else None
    meta = {"library_name": "transformers", "pipeline_tag": "image-feature-extraction", "license": record["license"],
            "tags": ["clip", "vision", "lcl", "latent-compression-learning"],
            **({"model-index": [index]} if index else {})}
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).rstrip()}
---

# LCL vision encoder: ViT {v.width} wide, {v.layers} layers, patch {v.patch_size}, {v.image_size} px

A vision encoder pre-trained with Latent Compression Learning (LCL,
arXiv 2406.07543) and exported by `lcl convert to-hf` as a Hugging Face
`CLIPVisionModel` with its `CLIPImageProcessor` settings.

{_facts_lines(facts)}
- **Run:** {cfg.run.name}
- **Source checkpoint:** `{record["source"]["checkpoint"]}` (model.safetensors sha256 `{record["source"]["sha256"]}`)
- **License:** {record["license"]}

## Which features to select

LCL trains the **last** layer's patch tokens **after** the final LayerNorm
(`post_layernorm`), **class token dropped**. LLaVA-style models default to the
penultimate layer without that LayerNorm (`vision_feature_layer=-2`,
`mm_vision_select_layer=-2`): features this encoder was never trained to hand on.

{selection_table()}

The same table is in `{RECORD_FILE}` (`feature_selection`).

## Use

```python
from transformers import CLIPImageProcessor, CLIPVisionModel

processor = CLIPImageProcessor.from_pretrained(HFDIR)
vit = CLIPVisionModel.from_pretrained(HFDIR)
pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
hidden = vit(pixel_values=pixel_values).last_hidden_state          # [N, 1 + P, {v.width}]
patches = vit.vision_model.post_layernorm(hidden[:, 1:])          # LCL's patch features
```

In a LLaVA model, the tower variant in `{TOWER_MODULE}` hands the projector
exactly these features:

```python
import lcl_vision_tower
from transformers import LlavaConfig, LlavaForConditionalGeneration

config = LlavaConfig(vision_config=lcl_vision_tower.llava_vision_config(HFDIR), text_config=...,
                     vision_feature_layer=-1, vision_feature_select_strategy="default")
llava = LlavaForConditionalGeneration(config)
lcl_vision_tower.load_vision_tower(llava, HFDIR)
```

Preprocessing equals OpenCLIP's evaluation transform: shorter side resized to
{v.image_size} (bicubic), centre crop, OpenAI CLIP mean/std. (Where the crop
margin is odd, transformers' crop may sit one pixel from torchvision's.)

## Attentive pool-project: one vector per image

`lcl_pool_project.safetensors` (+ `.json`) hold LCL's attentive pool-project;
`lcl_pool_project.py` loads it with torch and safetensors only:

```python
from lcl_pool_project import AttentivePoolProject, patch_features

pool = AttentivePoolProject.from_pretrained(HFDIR)
latent, image_tokens = pool(patch_features(vit, pixel_values))
```

`latent` [N, {cfg.model.embed_dim}] is the image embedding LCL aligns with the
language model's context features; `image_tokens` [N, P, {cfg.model.embed_dim}]
are the tokens its language model reads in place of each image. In a LLaVA
model with the tower above, `pool(features)` of the projector's input gives
the same latent.

## Training configuration

```yaml
{yaml.safe_dump(trained, sort_keys=False).rstrip()}
```
"""


def export_record(cfg: Config, manifest: dict, ckpt: Path, license_id: str) -> dict:
    from lcl_megatron.convert.provenance import training_facts

    sha = manifest.get("files", {}).get("model.safetensors", {}).get("sha256")
    return {"written_by": TO_HF, "license": license_id,
            "source": {"checkpoint": str(ckpt), "sha256": sha},
            "training": training_facts(cfg, manifest, ckpt),
            "feature_selection": selection_record()}


def export(ckpt: Path, out: Path, license_id: str = DEFAULT_LICENSE) -> Path:
    from safetensors.torch import save_file

    from lcl_megatron.convert import llava_tower
    from lcl_megatron.model import pool_project as hf_pool_project

    ckpt, manifest = open_checkpoint(ckpt)
    cfg, tensors = read_checkpoint(ckpt)
    vision = hf_vision_tensors(tensors, cfg)
    dtype = vision["vision_model.embeddings.class_embedding"].dtype
    pool_weights, pool_config = pool_project_files(tensors, cfg)
    record = export_record(cfg, manifest, ckpt, license_id)
    with atomic_directory(out, TO_HF) as tmp:
        save_file(vision, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_vision_config(cfg, dtype), indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(hf_preprocessor_config(cfg.model.vision.image_size), indent=2) + "\n")
        save_file(pool_weights, str(tmp / hf_pool_project.WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / hf_pool_project.CONFIG_FILE).write_text(json.dumps(pool_config, indent=2) + "\n")
        shutil.copyfile(hf_pool_project.__file__, tmp / LOADER_MODULE)
        shutil.copyfile(llava_tower.__file__, tmp / TOWER_MODULE)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(cfg, record))
    return Path(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=TO_HF, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  lcl convert to-hf --checkpoint runs/demo --out exports/demo-hf")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    add_output_flags(p, "output directory (written atomically)")
    p.add_argument("--license", default=DEFAULT_LICENSE,
                   help=f"license id for the model card (default {DEFAULT_LICENSE!r}: say which your data allows)")
    p.add_argument("--push-to-hub", metavar="REPO",
                   help="also upload the folder to this Hugging Face Hub repo (needs huggingface_hub and the network)")
    args = p.parse_args(argv)
    out = write_guarded(TO_HF, args, lambda: export(Path(args.checkpoint), Path(args.out), args.license))
    if out is None:
        return 2
    if args.push_to_hub:
        print(push_folder(out, args.push_to_hub))
    return 0
