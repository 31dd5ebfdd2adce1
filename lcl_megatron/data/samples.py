"""Shard samples -> token rows with their images, in three formats, and rows -> a batch.

Batch contract (what the model consumes):
    images          float32 [N, 3, H, W], normalised; one per `<start_of_img>` in
                    input_ids, in row-major order
    input_ids       int64 [B, L], right-padded with PAD_ID
    attention_mask  bool [B, L], True on real tokens
Every `<start_of_img>` is followed by exactly P `<img_placehold>` and one `<end_of_img>`.

A sample is a document (`json` with "items"), an MMC4 document (`json` with
"text_list"/"image_info") or an image-text pair (`txt` plus an image). Bad input
raises SkipSample with the name of the counter it goes to, never anything else.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass

import torch

from lcl_megatron.tokens import PAD_ID
from lcl_megatron.data.documents import Document, Image
from lcl_megatron.data.images import CROP_SCALE, BadImage, load_image
from lcl_megatron.data.sequences import (encode_document, encode_pair, parse_mmc4, place_mmc4_images,
                                         select_mmc4_images)

PAIR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# What `loader.stats` counts of input it could not use; training reports each of them.
SKIP_REASONS = ("skipped_bad_json", "skipped_bad_text", "skipped_no_image", "skipped_unknown_sample",
                "images_missing", "images_corrupt", "shards_unreadable")


@dataclass
class SampleSettings:
    image_size: int
    num_image_tokens: int
    context_length: int
    img_first_prob: float = 0.5
    min_similarity: float = 0.24
    max_images: int = 6
    augment: bool = False  # training crops (images.py) instead of the evaluation transform
    crop_scale: tuple = CROP_SCALE


class SkipSample(Exception):
    """A sample that cannot be used; the message is the counter's name."""


def _decode(sample: dict, name: str, settings: SampleSettings, stats: Counter, crop_rng: random.Random | None):
    data = sample.get(name)
    if data is None:
        stats["images_missing"] += 1
        return None
    try:
        return load_image(data, settings.image_size, crop_rng, settings.crop_scale)
    except BadImage:
        stats["images_corrupt"] += 1
        return None


def sample_to_row(sample: dict, rng: random.Random, tokenizer, settings: SampleSettings,
                  stats: Counter, crop_rng: random.Random | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """One shard sample -> (ids, image tensors); raises SkipSample(reason) for unusable samples.

    The kind is told by what the sample holds: a document (`json` with "items"),
    an MMC4 document (`json` with "text_list"/"image_info" and image files named
    by `image_name`), or an image-text pair (`txt` plus jpg/jpeg/png/webp; a
    `json` beside them is the pair's metadata, as img2dataset writes url,
    caption, width, height and status for every LAION sample). With
    `settings.augment` the images are cropped at random from `crop_rng` (a
    generator of their own, so that the crops do not change the text's random choices).
    """
    crop_rng = crop_rng if settings.augment else None
    P, L = settings.num_image_tokens, settings.context_length
    image_ext = next((ext for ext in PAIR_IMAGE_EXTENSIONS if ext in sample), None)
    obj = None
    if "json" in sample:
        try:
            obj = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            obj = None
    is_document = isinstance(obj, dict) and ("items" in obj or "text_list" in obj)
    if "json" in sample and (is_document or "txt" not in sample or image_ext is None):
        try:
            if obj is None:
                raise ValueError("not JSON")
            if isinstance(obj, dict) and "text_list" in obj:
                sentences, matches = parse_mmc4(obj)
                selected = select_mmc4_images(matches, rng, min_similarity=settings.min_similarity,
                                              max_images=settings.max_images)
                doc = None
            else:
                doc = Document.from_json_obj(obj)
        except ValueError:
            raise SkipSample("skipped_bad_json") from None
        tensors: dict[str, torch.Tensor] = {}
        if doc is None:  # MMC4: images that fail to load are dropped before placement, as the reference does
            loaded = []
            for index, name in selected:
                tensor = _decode(sample, name, settings, stats, crop_rng)
                if tensor is not None:
                    tensors[name] = tensor
                    loaded.append((index, name))
            doc = place_mmc4_images(sentences, loaded, rng, settings.img_first_prob)
        else:
            for image in doc.images:
                if image.name not in tensors:
                    tensor = _decode(sample, image.name, settings, stats, crop_rng)
                    if tensor is not None:
                        tensors[image.name] = tensor
            doc = Document([item for item in doc.items if not isinstance(item, Image) or item.name in tensors])
        encoded = encode_document(doc, tokenizer.encode_batch, num_image_tokens=P, context_length=L)
        if encoded is None:
            raise SkipSample("skipped_no_image")
        ids, images = encoded
        return ids, [tensors[image.name] for image in images]
    if "txt" in sample and image_ext is not None:
        try:
            text = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise SkipSample("skipped_bad_text") from None
        tensor = _decode(sample, image_ext, settings, stats, crop_rng)
        if tensor is None:
            raise SkipSample("skipped_no_image")
        ids = encode_pair(tokenizer.encode(text), rng, num_image_tokens=P, context_length=L,
                          img_first_prob=settings.img_first_prob)
        return ids, [tensor]
    raise SkipSample("skipped_unknown_sample")


def collate(rows: list[tuple[list[int], list[torch.Tensor]]], context_length: int,
            image_size: int) -> dict[str, torch.Tensor]:
    input_ids = torch.full((len(rows), context_length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), context_length), dtype=torch.bool)
    images = []
    for b, (ids, row_images) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, :len(ids)] = True
        images.extend(row_images)
    stacked = torch.stack(images) if images else torch.zeros((0, 3, image_size, image_size))
    return {"images": stacked, "input_ids": input_ids, "attention_mask": attention_mask}
