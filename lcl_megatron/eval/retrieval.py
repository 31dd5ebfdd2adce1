"""Image-text retrieval: image-to-text and text-to-image recall@1/5/10.

Image features are the normalised image latents; a caption's feature is the
LM's context feature that predicts the latent of an image following it (its
<end_of_text> becomes <start_of_img>, as in zero-shot). COCO-style sets give
several captions per image: an image is retrieved correctly when any of its
captions ranks in the top K, a caption when its image does. Captions that are
the same text are one caption belonging to every image that carries it.

    lcl eval retrieval --checkpoint DIR --data SET [--batch-size N]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from lcl_megatron.eval.datasets import CaptionedSet
from lcl_megatron.eval.zeroshot import text_features

RECALL_AT = (1, 5, 10)
SCORE_CHUNK = 1024  # rows of the similarity matrix scored at a time


def _recalls(queries: torch.Tensor, keys: torch.Tensor, positives: list[list[int]]) -> dict[int, float]:
    """Fraction of queries with a positive key among their top K, for each K in RECALL_AT."""
    hits = dict.fromkeys(RECALL_AT, 0)
    top = min(max(RECALL_AT), keys.shape[0])
    for start in range(0, queries.shape[0], SCORE_CHUNK):
        ranked = (queries[start:start + SCORE_CHUNK] @ keys.t()).topk(top, dim=-1).indices.cpu()  # matched on the host
        mask = torch.zeros(ranked.shape[0], keys.shape[0], dtype=torch.bool)
        for row, keys_of_row in enumerate(positives[start:start + SCORE_CHUNK]):
            mask[row, keys_of_row] = True
        found = mask.gather(1, ranked)
        for k in RECALL_AT:
            hits[k] += int(found[:, :k].any(dim=-1).sum())
    return {k: hits[k] / max(1, queries.shape[0]) for k in RECALL_AT}


@torch.no_grad()
def retrieval_evaluate(model, dataset: CaptionedSet, batch_size: int = 64) -> dict:
    """{"image_to_text_R@K", "text_to_image_R@K" for K in 1, 5, 10, "images", "captions"}."""
    parameter = next(model.parameters())
    image_feats, caption_index, image_captions = [], {}, []
    for images, captions in dataset.batches(model.cfg.vision.image_size, batch_size):  # host tensors
        image_feats.append(model.image_features(images.to(parameter.device, parameter.dtype, non_blocking=True)))
        image_captions += [sorted({caption_index.setdefault(c, len(caption_index)) for c in texts}) for texts in captions]
    if not image_feats:
        raise ValueError(f"image-text set '{dataset.location}' holds no captioned image")
    images = torch.cat(image_feats)
    texts = text_features(model, list(caption_index))
    caption_images: list[list[int]] = [[] for _ in caption_index]
    for image, captions in enumerate(image_captions):
        for caption in captions:
            caption_images[caption].append(image)
    i2t, t2i = _recalls(images, texts, image_captions), _recalls(texts, images, caption_images)
    return {**{f"image_to_text_R@{k}": v for k, v in i2t.items()},
            **{f"text_to_image_R@{k}": v for k, v in t2i.items()},
            "images": images.shape[0], "captions": texts.shape[0]}


def main(argv=None) -> int:
    from lcl_megatron.checkpoint.consolidated import CheckpointMismatch
    from lcl_megatron.config import ConfigError
    from lcl_megatron.eval.model_from_checkpoint import load_for_eval

    p = argparse.ArgumentParser(
        prog="lcl eval retrieval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="\n\n".join(__doc__.split("\n\n")[:2]) + "\n\nSets (see lcl_megatron/eval/datasets.py): embedded:NAME (held-out "
        "images captioned with their class prompt), webdataset shards of image + txt (one caption per line), or a "
        "folder of images with captions.tsv (IMAGE<TAB>CAPTION lines, several per image).",
        epilog="example:\n  lcl eval retrieval --checkpoint runs/demo --data embedded:digits")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--data", required=True, help="image-text set")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    args = p.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
        dataset = CaptionedSet.open(args.data)
        _, model = load_for_eval(args.checkpoint)
        result = retrieval_evaluate(model, dataset, args.batch_size)
    except (ConfigError, CheckpointMismatch, FileNotFoundError, ValueError) as e:
        print(f"lcl eval retrieval: {e}", file=sys.stderr)
        return 2
    print(f"retrieval on {args.data} ({result['images']} images, {result['captions']} captions): "
          + "image->text R@1/5/10 " + " / ".join(f"{result[f'image_to_text_R@{k}']:.4f}" for k in RECALL_AT)
          + ", text->image R@1/5/10 " + " / ".join(f"{result[f'text_to_image_R@{k}']:.4f}" for k in RECALL_AT))
    print(json.dumps({"data": args.data, **result}))  # the last line: machine-readable
    return 0
