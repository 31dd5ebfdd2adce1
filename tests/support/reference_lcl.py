"""Plain-torch oracle of the public LCL reference model and loss (OpenGVLab/LCL).

Independent of our megatron-core model: tests compare that model against this
one. It reproduces the reference's parameter names and shapes (so reference
checkpoints load with `load_state_dict`) and its forward and loss semantics,
quirks included: padding is "id 0", images are matched to `<start_of_img>`
tokens in row-major order, and a batch without any context feature gives a NaN
contrastive loss, as the reference's does.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lcl_megatron.tokens import (
    END_OF_IMG,
    END_OF_TEXT,
    IMG_PLACEHOLDER,
    SPECIAL_TOKEN_IDS,
    START_OF_IMG,
    VOCAB_SIZE,
    ZEROSHOT_CONTEXT_LENGTH,
)

# OpenCLIP's defaults for keys a model-config file may omit.
VISION_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224}
TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0}
POOL_PROJECT_DEFAULTS = {"pool_proj_type": "attn", "input_dim": 768, "output_dim": 512, "attn_num_heads": 8}
# Keys that do not change the model (tokenizer settings, factory flags).
IGNORED_KEYS = {"tokenizer_kwargs", "hf_tokenizer_name", "custom_text"}
# The reference pads with id 0 (also the BPE id of "!").
REFERENCE_PAD_ID = 0


def _with_defaults(section: str, given: dict, defaults: dict) -> dict:
    unknown = set(given) - set(defaults) - IGNORED_KEYS
    if unknown:
        raise ValueError(f"{section}: unsupported keys {sorted(unknown)}")
    return {**defaults, **{k: v for k, v in given.items() if k in defaults}}


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    """OpenCLIP's pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); fused in-projection attention."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", act())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x, attn_mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, mlp_ratio, act) for _ in range(layers))

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTower(nn.Module):
    """OpenCLIP ViT without its output projection; returns the P patch tokens after ln_post."""

    def __init__(self, cfg: dict, act: type[nn.Module]):
        super().__init__()
        width = cfg["width"]
        image_h, image_w = _pair(cfg["image_size"])
        patch_h, patch_w = _pair(cfg["patch_size"])
        num_positions = (image_h // patch_h) * (image_w // patch_w) + 1
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_positions, width))
        self.conv1 = nn.Conv2d(3, width, kernel_size=(patch_h, patch_w), stride=(patch_h, patch_w), bias=False)
        self.ln_pre = nn.LayerNorm(width, eps=1e-5)
        heads = width // cfg["head_width"]
        self.transformer = Transformer(width, cfg["layers"], heads, cfg["mlp_ratio"], act)
        self.ln_post = nn.LayerNorm(width, eps=1e-5)

    def forward(self, images):
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, P, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)[:, 1:]


class TextTower(nn.Module):
    """OpenCLIP text transformer used as a causal LM over token (or image-token) embeddings."""

    def __init__(self, cfg: dict, embed_dim: int, act: type[nn.Module]):
        super().__init__()
        width = self.width = cfg["width"]
        self.positional_embedding = nn.Parameter(torch.empty(cfg["context_length"], width))
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.token_embedding = nn.Embedding(cfg["vocab_size"], width)
        self.transformer = Transformer(width, cfg["layers"], cfg["heads"], cfg["mlp_ratio"], act)
        self.ln_final = nn.LayerNorm(width, eps=1e-5)
        self._init_like_reference(cfg["layers"])

    def _init_like_reference(self, layers: int):
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = self.width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=self.width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.width**-0.5)

    def forward(self, embeddings):
        length = embeddings.shape[1]
        x = embeddings + self.positional_embedding[:length].to(embeddings.dtype)
        causal = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        return self.transformer(x, attn_mask=causal)

    def project(self, hidden):
        """Context feature (before normalisation): ln_final then x @ text_projection."""
        return self.ln_final(hidden) @ self.text_projection


class CrossAttention(nn.Module):
    """q/k/v linears without bias plus separate bias parameters, and an output projection without bias."""

    def __init__(self, input_dim: int, output_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_bias = nn.Parameter(torch.zeros(output_dim))
        self.k_bias = nn.Parameter(torch.zeros(output_dim))
        self.v_bias = nn.Parameter(torch.zeros(output_dim))
        self.q = nn.Linear(input_dim, output_dim, bias=False)
        self.k = nn.Linear(input_dim, output_dim, bias=False)
        self.v = nn.Linear(input_dim, output_dim, bias=False)
        self.proj = nn.Linear(output_dim, output_dim, bias=False)

    def value(self, x):
        return F.linear(x, self.v.weight, self.v_bias)

    def forward(self, query, key, value):
        def heads(t):  # [B, N, D] -> [B, H, N, D/H]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q = heads(F.linear(query, self.q.weight, self.q_bias))
        k = heads(F.linear(key, self.k.weight, self.k_bias))
        v = heads(self.value(value))
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)
        return self.proj(out)


class Pooler(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, heads: int):
        super().__init__()
        self.norm1_q = nn.LayerNorm(input_dim, eps=1e-5)
        self.norm1_k = nn.LayerNorm(input_dim, eps=1e-5)
        self.norm1_v = nn.LayerNorm(input_dim, eps=1e-5)
        self.cross_attn = CrossAttention(input_dim, output_dim, heads)


class AttentivePoolProject(nn.Module):
    """One learned query attends over the patches (image latent); every patch through norm_v, v, proj (LM tokens)."""

    def __init__(self, cfg: dict):
        super().__init__()
        if cfg["pool_proj_type"] != "attn":
            raise ValueError(f"pool_project_cfg: unsupported pool_proj_type {cfg['pool_proj_type']!r}")
        self.query_token = nn.Parameter(torch.randn(1, 1, cfg["input_dim"]))
        self.pooler = Pooler(cfg["input_dim"], cfg["output_dim"], cfg["attn_num_heads"])

    def forward(self, patches):
        p = self.pooler
        query = p.norm1_q(self.query_token.expand(patches.shape[0], -1, -1))
        latent = p.cross_attn(query, p.norm1_k(patches), p.norm1_v(patches)).squeeze(1)
        tokens = p.cross_attn.proj(p.cross_attn.value(p.norm1_v(patches)))
        return latent, tokens


class LMHead(nn.Sequential):
    def __init__(self, width: int, vocab_size: int):
        super().__init__(nn.LayerNorm(width, eps=1e-5), nn.Linear(width, vocab_size, bias=False))


class ReferenceLCL(nn.Module):
    """The reference LCL model built from an OpenCLIP model-config dict."""

    def __init__(self, model_config: dict):
        super().__init__()
        model_config = dict(model_config)
        unknown = set(model_config) - {"embed_dim", "vision_cfg", "text_cfg", "pool_project_cfg",
                                       "special_token_ids", "quick_gelu", *IGNORED_KEYS}
        if unknown:
            raise ValueError(f"model config: unsupported keys {sorted(unknown)}")
        vision = _with_defaults("vision_cfg", model_config.get("vision_cfg", {}), VISION_DEFAULTS)
        text = _with_defaults("text_cfg", model_config.get("text_cfg", {}), TEXT_DEFAULTS)
        pool = _with_defaults("pool_project_cfg", model_config.get("pool_project_cfg", {}), POOL_PROJECT_DEFAULTS)
        act = QuickGELU if model_config.get("quick_gelu", False) else nn.GELU
        ids = {**SPECIAL_TOKEN_IDS, **model_config.get("special_token_ids", {})}
        self.img_id, self.soi_id = ids[IMG_PLACEHOLDER], ids[START_OF_IMG]
        self.eoi_id, self.eot_id = ids[END_OF_IMG], ids[END_OF_TEXT]

        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.visual = VisionTower(vision, act)
        self.text = TextTower(text, model_config["embed_dim"], act)
        self.pool_project = AttentivePoolProject(pool)
        self.lm_head = LMHead(text["width"], text["vocab_size"])

    def encode_image_tokens(self, images):
        """(image latent [B, D], LM image tokens [B, P, D])."""
        return self.pool_project(self.visual(images))

    def encode_image(self, images, normalize: bool = True):
        latent, _ = self.encode_image_tokens(images)
        return F.normalize(latent, dim=-1) if normalize else latent

    def encode_text(self, input_ids, normalize: bool = True, context_length: int = ZEROSHOT_CONTEXT_LENGTH):
        """Zero-shot text feature: `<end_of_text>` becomes `<start_of_img>`, rows cut to `context_length`
        (ending in `<start_of_img>` if cut), feature read at every `<start_of_img>`. Input is not modified."""
        ids = input_ids.masked_fill(input_ids == self.eot_id, self.soi_id)[:, :context_length].clone()
        ids[(ids == self.soi_id).sum(dim=-1) == 0, -1] = self.soi_id
        hidden = self.text(self.text.token_embedding(ids))
        features = self.text.project(hidden[ids == self.soi_id])
        return F.normalize(features, dim=-1) if normalize else features

    def interleaved_embeddings(self, image_tokens, input_ids):
        """Token embeddings with the `<img_placehold>` positions filled, row-major, by the image tokens."""
        is_img = input_ids == self.img_id
        if is_img.sum() != image_tokens.shape[0] * image_tokens.shape[1]:
            raise ValueError("number of <img_placehold> ids differs from images x patches")
        embeddings = self.text.token_embedding(input_ids.masked_fill(is_img, 0))
        return embeddings.masked_scatter(is_img.unsqueeze(-1), image_tokens.to(embeddings.dtype))

    def contrastive_features(self, image_latent, hidden, input_ids):
        """Normalised (image, context) pairs for every `<start_of_img>` not at position 0."""
        is_soi = input_ids == self.soi_id
        has_context = is_soi.clone()
        has_context[:, 0] = False
        text_features = self.text.project(hidden[has_context])
        text_features = F.normalize(text_features.float(), dim=-1).to(text_features.dtype)
        # Image i belongs to the i-th <start_of_img>, row-major.
        image_features = image_latent[has_context[is_soi]]
        image_features = F.normalize(image_features.float(), dim=-1).to(image_features.dtype)
        return image_features, text_features

    def generation_logits_labels(self, hidden, input_ids):
        """Next-token logits where the target is not `<img_placehold>`, `<end_of_img>` or id 0."""
        targets = input_ids[:, 1:]
        predicted = (targets != self.img_id) & (targets != self.eoi_id) & (targets != REFERENCE_PAD_ID)
        return self.lm_head(hidden[:, :-1][predicted]), targets[predicted]

    def forward(self, images, input_ids) -> dict:
        image_latent, image_tokens = self.encode_image_tokens(images)
        hidden = self.text(self.interleaved_embeddings(image_tokens, input_ids))
        image_features, text_features = self.contrastive_features(image_latent, hidden, input_ids)
        logits, labels = self.generation_logits_labels(hidden, input_ids)
        return {
            "image_features": image_features,
            "text_features": text_features,
            "logits": logits,
            "labels": labels,
            "logit_scale": self.logit_scale.exp(),
        }


def contrastive_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE over matching pairs, in fp32 (single process: all columns are local)."""
    image_features, text_features = image_features.float(), text_features.float()
    per_image = logit_scale * (image_features @ text_features.t())
    per_text = logit_scale * (text_features @ image_features.t())
    target = torch.arange(per_image.shape[0], device=per_image.device)
    return (F.cross_entropy(per_image, target) + F.cross_entropy(per_text, target)) / 2


def reference_losses(out: dict, generation_weight: float = 1.0, contrastive_weight: float = 0.1) -> dict:
    """Unweighted contrastive and generation terms and the weighted total, as the reference computes them.

    Like the reference, a zero contrastive weight skips the term (it is then 0, never NaN).
    """
    contrastive = (
        contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"])
        if contrastive_weight
        else torch.zeros((), device=out["logits"].device)
    )
    generation = F.cross_entropy(out["logits"], out["labels"], ignore_index=REFERENCE_PAD_ID)
    return {
        "contrastive_loss": contrastive,
        "generation_loss": generation,
        "loss": generation_weight * generation + contrastive_weight * contrastive,
    }


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


# A small model in the reference's config format, for fast tests (image runs of 16 placeholders).
SMALL_MODEL_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 48, "head_width": 16},
    "text_cfg": {"context_length": 48, "vocab_size": VOCAB_SIZE, "width": 32, "heads": 4, "layers": 2},
    "pool_project_cfg": {"pool_proj_type": "attn", "input_dim": 48, "output_dim": 32, "attn_num_heads": 4},
    "special_token_ids": SPECIAL_TOKEN_IDS,
}
SMALL_MODEL_PATCHES = 16  # (32 / 8) ** 2
