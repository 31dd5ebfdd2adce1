"""A CLIP vision tower whose last hidden state is the one LCL trained: the LLaVA variant.

LCL trains the last layer's patch tokens after `post_layernorm`. LLaVA-style
models select a hidden state (`hidden_states[vision_feature_layer]`), and no
hidden state of transformers' `CLIPVisionModel` passes `post_layernorm`, so no
setting of theirs selects LCL's features. `LCLVisionTower` is
`CLIPVisionModel` with the same weights whose last hidden state (and
`last_hidden_state`) has `post_layernorm` applied to every token; with
`vision_feature_layer=-1` and `vision_feature_select_strategy="default"` the
projector receives exactly LCL's image features. Importing this module
registers it with transformers' Auto classes (model type
`lcl_clip_vision_model`), which `LlavaForConditionalGeneration` builds its tower
through.

`lcl convert to-hf` copies this file into the export as `lcl_vision_tower.py`;
it needs torch, transformers and safetensors only:

    import lcl_vision_tower
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=lcl_vision_tower.llava_vision_config(HFDIR), text_config=...,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    llava = LlavaForConditionalGeneration(config)
    lcl_vision_tower.load_vision_tower(llava, HFDIR)
"""

from pathlib import Path

from transformers import AutoConfig, AutoModel, CLIPVisionConfig, CLIPVisionModel

MODEL_TYPE = "lcl_clip_vision_model"


class LCLVisionTowerConfig(CLIPVisionConfig):
    model_type = MODEL_TYPE


class LCLVisionTower(CLIPVisionModel):
    config_class = LCLVisionTowerConfig

    def forward(self, pixel_values=None, output_hidden_states=None, **kwargs):
        out = super().forward(pixel_values=pixel_values, output_hidden_states=output_hidden_states, **kwargs)
        trained = self.vision_model.post_layernorm(out.last_hidden_state)
        out.last_hidden_state = trained
        if out.hidden_states is not None:
            out.hidden_states = out.hidden_states[:-1] + (trained,)
        return out


def llava_vision_config(directory) -> LCLVisionTowerConfig:
    """The export's CLIP vision config, as this tower's (for `LlavaConfig(vision_config=...)`)."""
    config = CLIPVisionConfig.from_pretrained(directory).to_dict()
    config.pop("model_type", None)
    return LCLVisionTowerConfig(**config)


def load_vision_tower(llava, directory) -> None:
    """Load the export's weights into a LLaVA model's vision tower (strictly: every tensor, no other)."""
    from safetensors.torch import load_file

    llava.model.vision_tower.load_state_dict(load_file(str(Path(directory) / "model.safetensors")), strict=True)


AutoConfig.register(MODEL_TYPE, LCLVisionTowerConfig, exist_ok=True)
AutoModel.register(LCLVisionTowerConfig, LCLVisionTower, exist_ok=True)
