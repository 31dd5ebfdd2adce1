"""Probes of frozen image features: how much the vision encoder learned.

    lcl eval probe --checkpoint DIR [--data embedded:digit-scenes | DIR] [--probes linear,attentive]
    lcl eval probe --config C [key=value ...]     (a freshly initialised model: the untrained baseline)

Linear probe (the CLIP protocol): an L2-regularised logistic regression on
standardised frozen features, its strength chosen on a validation fifth of the
training split, then refitted on all of it. It runs on the mean of the ViT's
patch tokens and on the pooled image latent. Attentive probe (the LCL paper's
Table 1 protocol): one learned query cross-attends over the frozen patch
tokens, followed by a linear classifier, trained with AdamW.

Also reported: the effective rank and total variance of the test images'
L2-normalised latents; a collapsed encoder gives every image nearly the same
latent (rank near 1, variance near 0).

DIR is an image folder, DIR/train/CLASS/IMAGE and DIR/test/CLASS/IMAGE.
Prints one JSON line, then a human-readable line.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PROBES = ("linear", "attentive")
LINEAR_C_GRID = (0.01, 0.1, 1.0, 10.0)
VALIDATION_FRACTION = 0.2
ATTENTIVE_EPOCHS = 40
ATTENTIVE_BATCH = 128
ATTENTIVE_LR = 1e-3
ATTENTIVE_WEIGHT_DECAY = 0.05


@torch.no_grad()
def frozen_features(model, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch tokens [N, P, W] after the ViT's final norm, image latents [N, D]), fp32."""
    dtype = next(model.parameters()).dtype
    patches, latents = [], []
    for start in range(0, images.shape[0], batch_size):
        tokens = model.visual(images[start:start + batch_size].to(dtype))
        patches.append(tokens.float())
        latents.append(model.pool_project(tokens)[0].float())
    return torch.cat(patches), torch.cat(latents)


def _stratified_validation(labels: np.ndarray, seed: int) -> np.ndarray:
    """A boolean mask picking VALIDATION_FRACTION of each class."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        mask[members[:max(1, int(round(len(members) * VALIDATION_FRACTION)))]] = True
    return mask


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 seed: int = 0) -> float:
    """Top-1 of a logistic regression whose strength is chosen on a validation split of train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y, tx, ty = train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy()
    fit = lambda c, features, labels: LogisticRegression(C=c, max_iter=1000).fit(features, labels)
    val = _stratified_validation(y, seed)
    scaler = StandardScaler().fit(x[~val])
    scores = [fit(c, scaler.transform(x[~val]), y[~val]).score(scaler.transform(x[val]), y[val])
              for c in LINEAR_C_GRID]
    best = LINEAR_C_GRID[int(np.argmax(scores))]
    scaler = StandardScaler().fit(x)
    return float(fit(best, scaler.transform(x), y).score(scaler.transform(tx), ty))


class AttentiveClassifier(nn.Module):
    """One learned query attends over patch tokens; a linear layer classifies the result."""

    def __init__(self, width: int, num_classes: int, heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.query = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.attention = nn.MultiheadAttention(width, heads if width % heads == 0 else 1, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(tokens)
        pooled, _ = self.attention(self.query.expand(tokens.shape[0], -1, -1), tokens, tokens, need_weights=False)
        return self.head(pooled[:, 0])


def attentive_probe(train_tokens: torch.Tensor, train_y: torch.Tensor, test_tokens: torch.Tensor,
                    test_y: torch.Tensor, seed: int = 0, epochs: int = ATTENTIVE_EPOCHS) -> float:
    """Top-1 of an attentive classifier trained on frozen patch tokens [N, P, W] (deterministic per seed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = AttentiveClassifier(train_tokens.shape[-1], int(train_y.max()) + 1)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=ATTENTIVE_LR, weight_decay=ATTENTIVE_WEIGHT_DECAY)
    steps = epochs * -(-train_tokens.shape[0] // ATTENTIVE_BATCH)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(train_tokens.shape[0], generator=generator)
        for start in range(0, len(order), ATTENTIVE_BATCH):
            batch = order[start:start + ATTENTIVE_BATCH]
            loss = F.cross_entropy(probe(train_tokens[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    probe.eval()
    with torch.no_grad():
        return float((probe(test_tokens).argmax(-1) == test_y).float().mean())


def latent_spread(latents: torch.Tensor) -> dict[str, float]:
    """Effective rank (exp of the entropy of the singular-value distribution) and total
    variance of L2-normalised latents [N, D]: how far the images' latents are apart."""
    z = F.normalize(latents.double(), dim=-1)
    z = z - z.mean(0)
    singular = torch.linalg.svdvals(z)
    p = singular / singular.sum().clamp(min=1e-12)
    entropy = -(p * p.clamp(min=1e-12).log()).sum()
    return {"latent_effective_rank": float(entropy.exp()), "latent_variance": float(z.square().sum(-1).mean())}


def probe_model(model, data: dict, probes=PROBES, seed: int = 0) -> dict:
    """Every probe of `model` on a loaded labelled set ({"train": (images, labels), "test": ...})."""
    (train_images, train_y), (test_images, test_y) = data["train"], data["test"]
    train_patches, train_latents = frozen_features(model, train_images)
    test_patches, test_latents = frozen_features(model, test_images)
    out = {"num_train": int(train_y.shape[0]), "num_test": int(test_y.shape[0])}
    if "linear" in probes:
        out["linear_patch_top1"] = linear_probe(train_patches.mean(1), train_y, test_patches.mean(1), test_y, seed)
        out["linear_latent_top1"] = linear_probe(train_latents, train_y, test_latents, test_y, seed)
    if "attentive" in probes:
        out["attentive_top1"] = attentive_probe(train_patches, train_y, test_patches, test_y, seed)
    out.update(latent_spread(test_latents))
    return out


def untrained_model(cfg):
    """The model a run of `cfg` starts from (same seed, same initialisation)."""
    from lcl_megatron.model.build import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    cfg.train.precision = "fp32"
    return cfg, model.float().eval()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lcl eval probe", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]) + "\n\nexample:\n  lcl eval probe "
                                       "--checkpoint runs/demo --data embedded:digit-scenes",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint or run directory to probe")
    source.add_argument("--config", help="probe the untrained model of this YAML config (seeded by train.seed)")
    p.add_argument("--data", help="labelled set: embedded:NAME or an image folder with train/ and test/ "
                                  "(default: the config's data.heldout)")
    p.add_argument("--probes", default=",".join(PROBES), help="comma-separated subset of: linear, attentive")
    p.add_argument("--seed", type=int, default=0, help="seed of the probes' validation split and training")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (with --config)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from lcl_megatron.checkpoint.consolidated import CheckpointMismatch
    from lcl_megatron.config import ConfigError, load_config
    from lcl_megatron.data.labelled import LabelledSetError, check_labelled_set, load_labelled_set
    from lcl_megatron.eval.model_from_checkpoint import load_for_eval

    args = parse_args(argv)
    try:
        probes = [name.strip() for name in args.probes.split(",") if name.strip()]
        if not probes or set(probes) - set(PROBES):
            raise ConfigError(f"--probes must name some of {', '.join(PROBES)}, got {args.probes!r}")
        if args.overrides and not args.config:
            raise ConfigError("key=value overrides apply only with --config")
        if args.config:
            cfg = load_config(args.config, args.overrides)
            entry = args.data or cfg.data.heldout
            if not entry:
                raise ConfigError("no labelled set: pass --data")
            check_labelled_set(entry)
            cfg, model = untrained_model(cfg)
        else:
            if args.data:
                check_labelled_set(args.data)
            cfg, model = load_for_eval(args.checkpoint)
            entry = args.data or cfg.data.heldout
            if not entry:
                raise ConfigError("no labelled set: pass --data")
            check_labelled_set(entry)
    except (ConfigError, CheckpointMismatch, FileNotFoundError, LabelledSetError) as e:
        print(f"lcl eval probe: {e}", file=sys.stderr)
        return 2
    result = {"data": entry, "model": args.checkpoint or f"untrained:{args.config}",
              **probe_model(model, load_labelled_set(entry, cfg.model.vision.image_size), probes, args.seed)}
    print(json.dumps(result))
    scores = ", ".join(f"{key[:-5]} {value:.4f}" for key, value in result.items() if key.endswith("_top1"))
    print(f"probes on {entry} ({result['num_train']} train / {result['num_test']} test images): {scores}; "
          f"latent effective rank {result['latent_effective_rank']:.1f}, variance {result['latent_variance']:.3f}")
    return 0
