"""The attentive pool-project: one learned query cross-attends over the patch tokens.

It yields the image latent (query attends over patches, then `proj`) and the
image tokens for the LM (each patch through norm1_v, the v linear and `proj`).
Parameter names follow the reference's `pool_project.*` tensors one to one.

This file needs only torch (and safetensors to load an export): `lcl convert
to-hf` copies it into the export as `lcl_pool_project.py`, so users of the
exported `CLIPVisionModel` need no lcl_megatron install:

    from transformers import CLIPVisionModel
    from lcl_pool_project import AttentivePoolProject, patch_features

    vit = CLIPVisionModel.from_pretrained(HFDIR)
    pool = AttentivePoolProject.from_pretrained(HFDIR)
    latent, image_tokens = pool(patch_features(vit, pixel_values))

`latent` [N, D] is the image embedding LCL aligns with text (normalise it for
retrieval or zero-shot); `image_tokens` [N, P, D] are the patch tokens LCL's
language model reads in place of `<img_placehold>` ids.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE = "lcl_pool_project.json"
WEIGHTS_FILE = "lcl_pool_project.safetensors"


def patch_features(vision_model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch tokens after the final LayerNorm, class token dropped: what LCL's ViT hands on.

    transformers applies `post_layernorm` to the class token only, so it is applied here."""
    hidden = vision_model(pixel_values=pixel_values).last_hidden_state
    return vision_model.vision_model.post_layernorm(hidden[:, 1:])


class AttentivePoolProject(nn.Module):

    def __init__(self, input_dim: int, output_dim: int, num_heads: int, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.query_token = nn.Parameter(torch.randn(1, 1, input_dim))
        self.norm1_q = nn.LayerNorm(input_dim, eps=layer_norm_eps)
        self.norm1_k = nn.LayerNorm(input_dim, eps=layer_norm_eps)
        self.norm1_v = nn.LayerNorm(input_dim, eps=layer_norm_eps)
        self.q = nn.Linear(input_dim, output_dim, bias=False)
        self.k = nn.Linear(input_dim, output_dim, bias=False)
        self.v = nn.Linear(input_dim, output_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(output_dim))
        self.k_bias = nn.Parameter(torch.zeros(output_dim))
        self.v_bias = nn.Parameter(torch.zeros(output_dim))
        self.proj = nn.Linear(output_dim, output_dim, bias=False)

    @classmethod
    def from_pretrained(cls, directory) -> "AttentivePoolProject":
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / CONFIG_FILE).read_text())
        model = cls(config["input_dim"], config["output_dim"], config["num_heads"], config["layer_norm_eps"])
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
        return model.eval()

    def forward(self, patches: torch.Tensor):
        """patches [N, P, input_dim] -> (latent [N, D], image tokens [N, P, D])."""
        n = patches.shape[0]
        heads = lambda t: t.reshape(n, t.shape[1], self.num_heads, -1).transpose(1, 2)
        values = F.linear(self.norm1_v(patches), self.v.weight, self.v_bias)
        keys = F.linear(self.norm1_k(patches), self.k.weight, self.k_bias)
        query = F.linear(self.norm1_q(self.query_token), self.q.weight, self.q_bias).expand(n, 1, -1)
        pooled = F.scaled_dot_product_attention(heads(query), heads(keys), heads(values))
        latent = self.proj(pooled.transpose(1, 2).reshape(n, -1))
        return latent, self.proj(values)
