"""Image decoding and preprocessing, as OpenCLIP's transforms do it.

Evaluation: OpenCLIP (and so the LCL reference) resizes the shorter side to
`image_size` with bicubic filtering, centre-crops a square, scales to [0, 1]
and normalises with OpenAI's CLIP statistics. Training: the reference's
`RandomResizedCrop(image_size, scale=(0.9, 1.0), ratio=(3/4, 4/3), bicubic)`
instead of resize + centre crop. torchvision is not usable here, so the same
steps are written with PIL and numpy; the crop draws from a `random.Random`
the caller seeds per sample, so a resumed run sees the same pixels.
"""

from __future__ import annotations

import io
import math
import random
import warnings

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP's dataset statistics, the reference's defaults (open_clip.constants).
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

# Refuse images whose decoded size could exhaust memory (decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000


class BadImage(ValueError):
    """An image that cannot be decoded or is unreasonably large."""


class ImageTooLarge(BadImage):
    """An image over the pixel limit (a possible decompression bomb); never decoded."""


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode encoded image bytes fully, in the file's own mode; raise BadImage on any failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise ImageTooLarge(f"image of {image.width}x{image.height} pixels is over the limit of {max_pixels}")
            image.load()
            return image
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(str(e)) from None
    except Exception as e:  # PIL raises many unrelated types for broken files
        raise BadImage(f"cannot decode image: {type(e).__name__}: {e}") from None


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image; raise BadImage on any failure."""
    image = open_image(data, max_pixels)
    try:
        return image.convert("RGB")
    except Exception as e:
        raise BadImage(f"cannot convert {image.mode} image to RGB: {type(e).__name__}: {e}") from None


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_long = int(size * long / short)  # truncation, as torchvision computes it
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


# The reference's train crop (open_clip.transform.image_transform with its default AugmentationCfg).
CROP_SCALE = (0.9, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale=CROP_SCALE,
                            ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) by torchvision's RandomResizedCrop.get_params rule:
    ten tries at an area fraction uniform in `scale` and a log-uniform aspect ratio in `ratio`,
    then a centre crop clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)  # torchvision draws the row first
            return rng.randint(0, width - w), top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


_MEAN = np.asarray(OPENAI_DATASET_MEAN, dtype=np.float32)
_STD = np.asarray(OPENAI_DATASET_STD, dtype=np.float32)


def preprocess_image(image: Image.Image, image_size: int, crop_rng: random.Random | None = None,
                     crop_scale=CROP_SCALE) -> torch.Tensor:
    """RGB PIL image -> normalised float32 tensor [3, image_size, image_size].

    Without `crop_rng`: the evaluation transform (resize + centre crop); with it,
    the training transform (a random resized crop drawn from `crop_rng`).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    if crop_rng is None:
        image = _center_crop(_resize_shorter_side(image, image_size), image_size)
    else:
        left, top, w, h = random_resized_crop_box(image.width, image.height, crop_rng, crop_scale)
        # crop, then resize, as torchvision's resized_crop does on PIL images
        image = image.crop((left, top, left + w, top + h)).resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def load_image(data: bytes, image_size: int, crop_rng: random.Random | None = None,
               crop_scale=CROP_SCALE) -> torch.Tensor:
    """Encoded bytes -> normalised tensor [3, image_size, image_size]; raises BadImage.
    `crop_rng` selects the training transform (see `preprocess_image`)."""
    return preprocess_image(decode_image(data), image_size, crop_rng, crop_scale)
