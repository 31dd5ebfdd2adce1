"""Which vision features LCL trains, and what each multimodal consumer must set to get them.

LCL's language model and contrastive loss read the ViT's *last* layer, after
the final LayerNorm (`ln_post`, HF's `post_layernorm`), class token dropped.
LLaVA-style consumers default to the penultimate layer without that LayerNorm:
features this encoder was never trained to hand on. Exports record this table
(`lcl_export.json`) and the model card prints it; this is its one source.
"""

from __future__ import annotations

TRAINED = {"layer": "last", "vision_feature_layer": -1, "post_layernorm": True, "class_token": False}

# Per consumer: the settings to use, whether they reproduce LCL's features exactly, and how to get them exactly.
CONSUMERS = {
    "transformers_llava": {
        "name": "transformers `LlavaForConditionalGeneration`",
        "settings": {"vision_feature_layer": -1, "vision_feature_select_strategy": "default"},
        "exact_with_stock_tower": False,
        "gap": "transformers' LLaVA reads `hidden_states`, which never pass `post_layernorm`",
        "exact": "build the vision tower as `lcl_vision_tower.LCLVisionTower` (shipped in this folder): "
                 "`LlavaConfig(vision_config=lcl_vision_tower.llava_vision_config(HFDIR), "
                 "vision_feature_layer=-1, vision_feature_select_strategy='default', ...)`, then "
                 "`lcl_vision_tower.load_vision_tower(llava, HFDIR)`",
    },
    "llava_original": {
        "name": "original LLaVA code (haotian-liu/LLaVA)",
        "settings": {"mm_vision_select_layer": -1, "mm_vision_select_feature": "patch"},
        "exact_with_stock_tower": False,
        "gap": "its `CLIPVisionTower.feature_select` reads `hidden_states`, which never pass `post_layernorm`",
        "exact": "in `llava/model/multimodal_encoder/clip_encoder.py` load the tower with "
                 "`lcl_vision_tower.LCLVisionTower.from_pretrained` instead of `CLIPVisionModel.from_pretrained`",
    },
    "megatron_lm_multimodal": {
        "name": "Megatron-LM `examples/multimodal` (megatron-core `CLIPViTModel`)",
        "settings": {"vision_model_type": "clip", "disable_vision_class_token": True},
        "exact_with_stock_tower": False,
        "gap": "megatron-core builds `CLIPViTModel` of type 'clip' without `ln_post` and reads the last layer",
        "exact": "`lcl convert to-megatron-vision` writes `ln_post` to lcl_ln_post.safetensors; after building the "
                 "vision model set `vision_model.ln_post = torch.nn.LayerNorm(hidden, eps=1e-5)` and load it "
                 "(its forward applies `ln_post` whenever it is set)",
    },
}


def selection_record() -> dict:
    """What `lcl_export.json` says about feature selection."""
    return {"trained": dict(TRAINED), "consumers": CONSUMERS}


def selection_table() -> str:
    """The model card's table: one row per consumer."""
    rows = ["| Consumer | Set | Stock tower gives LCL's features? | For LCL's features exactly |",
            "|---|---|---|---|"]
    for c in CONSUMERS.values():
        settings = ", ".join(f"`{k}={v!r}`" for k, v in c["settings"].items())
        exact = "yes" if c["exact_with_stock_tower"] else f"no: {c['gap']}; the last layer's tokens before the LayerNorm"
        rows.append(f"| {c['name']} | {settings} | {exact} | {c['exact']} |")
    return "\n".join(rows)
