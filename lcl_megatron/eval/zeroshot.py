"""Zero-shot classification with the reference's recipe.

One prompt per class; its text feature is the context feature at the
<start_of_img> that replaces the prompt's <end_of_text>. Each image's latent is
compared with every class's text feature; the nearest class is the prediction.

    lcl eval zeroshot --checkpoint DIR [--data embedded:digits]
"""

from __future__ import annotations

import argparse
import sys

import torch

from lcl_megatron.config import Config


@torch.no_grad()
def class_text_features(model, prompts: list[str]) -> torch.Tensor:
    from lcl_megatron.model.lcl import zeroshot_text_ids
    from lcl_megatron.tokenizer import get_tokenizer

    ids = zeroshot_text_ids(get_tokenizer()(prompts), model.cfg.text.context_length)
    return model.text_features(ids)


@torch.no_grad()
def zeroshot_top1(model, images: torch.Tensor, labels: torch.Tensor, prompts: list[str], batch_size: int = 256) -> float:
    text = class_text_features(model, prompts)
    dtype = next(model.parameters()).dtype
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        feats = model.image_features(images[start:start + batch_size].to(dtype))
        correct += int(((feats @ text.t()).argmax(-1) == labels[start:start + batch_size]).sum())
    return correct / max(1, images.shape[0])


def zeroshot_accuracy(model, cfg: Config, entry: str | None = None) -> float:
    from lcl_megatron.data.loader import load_zeroshot_set

    images, labels, prompts = load_zeroshot_set(entry or cfg.data.heldout, cfg.model.vision.image_size)
    return zeroshot_top1(model, images, labels, prompts)


def main(argv=None) -> int:
    from lcl_megatron.config import ConfigError
    from lcl_megatron.convert.native import CheckpointMismatch
    from lcl_megatron.eval.common import load_for_eval

    p = argparse.ArgumentParser(prog="lcl eval zeroshot", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  lcl eval zeroshot --checkpoint runs/demo --data embedded:digits")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--data", help="held-out set (default: the checkpoint config's data.heldout)")
    args = p.parse_args(argv)
    try:
        cfg, model = load_for_eval(args.checkpoint)
        entry = args.data or cfg.data.heldout
        if not entry:
            raise ConfigError("no held-out set: pass --data")
    except (ConfigError, CheckpointMismatch, FileNotFoundError) as e:
        print(f"lcl eval zeroshot: {e}", file=sys.stderr)
        return 2
    top1 = zeroshot_accuracy(model, cfg, entry)
    print(f"zero-shot top-1 on {entry}: {top1:.4f}")
    return 0
