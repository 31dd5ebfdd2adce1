"""The reference's side of `lcl bench train --reference`: its training step, its rows, the pair shards.

The reference's model and loss come from the plain-torch oracle that the tests
compare our model against (tests/support/reference_lcl.py). It is loaded by
file path from a source checkout, never imported as a package (the package
does not depend on its tests), and is absent from an installed package.

The reference's step as its training code runs it: one image-text pair per
row, padded with id 0 to the context length; the LM head over every position,
the predicted ones kept afterwards; plain `torch.optim.AdamW` (OpenCLIP's
parameter groups) under the same learning-rate schedule as ours; the logit
scale clamped after the update.
"""

from __future__ import annotations

import importlib.util
import io
import random
from pathlib import Path

import torch
from PIL import Image as PILImage

from lcl_megatron.config import Config
from lcl_megatron.data.shards import write_shard
from lcl_megatron.training.optim import build_scheduler

ORACLE_PATH = Path(__file__).resolve().parents[2] / "tests" / "support" / "reference_lcl.py"
CAPTION_WORDS = 20  # about one BPE token per common word
_WORDS = ("a photo of the red blue green small large old new cat dog house tree car street river "
          "mountain field city beach sky cloud person child table window door road bridge boat flower "
          "garden light night morning sunny rainy wooden stone glass with on in near under over").split()


def load_oracle():
    """The oracle module from this checkout, or None where the package runs without its tests."""
    if not ORACLE_PATH.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_lcl_reference_oracle", ORACLE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_pair_shards(root: Path, shards: int, per_shard: int, image_size: int, seed: int = 0) -> None:
    """Image-text pair shards: ~20-word captions and small JPEGs (decoding stays cheap: the bench
    times training steps, not the loader)."""
    rng = random.Random(seed)
    for s in range(shards):
        def samples():
            for i in range(per_shard):
                pixels = bytes(rng.randrange(256) for _ in range(3 * image_size * image_size))
                image = io.BytesIO()
                PILImage.frombytes("RGB", (image_size, image_size), pixels).save(image, format="JPEG")
                caption = " ".join(rng.choice(_WORDS) for _ in range(CAPTION_WORDS))
                yield f"pair{s:03d}-{i:05d}", {"jpg": image.getvalue(), "txt": caption.encode()}
        write_shard(root / f"{s:05d}.tar", samples())


def model_config(cfg: Config) -> dict:
    """Our model shape in the reference's model-config format."""
    m, v, t = cfg.model, cfg.model.vision, cfg.model.text
    if t.arch != "clip":
        raise ValueError("the reference has only the clip decoder (model.text.arch=clip)")
    return {"embed_dim": m.embed_dim,
            "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "layers": v.layers,
                           "width": v.width, "head_width": v.head_width, "mlp_ratio": v.mlp_ratio},
            "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                         "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio},
            "pool_project_cfg": {"pool_proj_type": "attn", "input_dim": v.width, "output_dim": m.embed_dim,
                                 "attn_num_heads": m.pool_heads}}


def reference_rows(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, input_ids) of an unpacked batch of ours: one pair per row, padded with id 0, is the
    reference's row format already."""
    if "position_ids" in batch:
        raise ValueError("the reference's rows hold one pair each: read them with data.packing=false")
    return batch["images"], batch["input_ids"]


def _no_weight_decay(name: str, p: torch.Tensor) -> bool:
    # OpenCLIP's rule, which the reference's training script uses unchanged
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


class ReferenceStep:
    """The reference's optimizer step on its own model, built from our config's shape and recipe."""

    def __init__(self, oracle, cfg: Config, seed: int = 0):
        torch.manual_seed(seed)
        self.oracle, self.cfg = oracle, cfg
        self.model = oracle.ReferenceLCL(model_config(cfg)).train()
        named = list(self.model.named_parameters())
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if _no_weight_decay(n, p)], "weight_decay": 0.0},
             {"params": [p for n, p in named if not _no_weight_decay(n, p)], "weight_decay": o.weight_decay}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.scheduler = build_scheduler(self.optimizer, cfg)  # the reference's warm-up and cosine, as ours

    def outputs(self, images: torch.Tensor, input_ids: torch.Tensor) -> dict:
        """The oracle's forward with the head over every position, as the reference runs it."""
        model = self.model
        latent, image_tokens = model.encode_image_tokens(images)
        hidden = model.text(model.interleaved_embeddings(image_tokens, input_ids))
        image_features, text_features = model.contrastive_features(latent, hidden, input_ids)
        logits = model.lm_head(hidden[:, :-1])
        # the oracle's generation_logits_labels keeps these positions before its head
        targets = input_ids[:, 1:]
        predicted = (targets != model.img_id) & (targets != model.eoi_id) & (targets != self.oracle.REFERENCE_PAD_ID)
        return {"image_features": image_features, "text_features": text_features, "logits": logits[predicted],
                "labels": targets[predicted], "logit_scale": model.logit_scale.exp()}

    def __call__(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.oracle.reference_losses(self.outputs(images, input_ids), self.cfg.loss.generation_weight,
                                              self.cfg.loss.contrastive_weight)
        losses["loss"].backward()
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.cfg.model.max_logit_scale)
        return losses["loss"].detach()
