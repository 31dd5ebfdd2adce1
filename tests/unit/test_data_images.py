"""Image decoding and OpenCLIP's evaluation transform, without torchvision."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lcl_megatron.data.images import (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, BadImage, decode_image, load_image,
                                      preprocess_image)


def encode(image, fmt="PNG"):
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def test_constant_image_normalises_to_clip_statistics():
    x = load_image(encode(Image.new("RGB", (50, 30), (255, 0, 128))), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = [(v / 255.0 - m) / s for v, m, s in zip((255, 0, 128), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    assert float(x.std(dim=(1, 2)).max()) < 1e-5


@pytest.mark.parametrize("width, left", [(5, 2), (4, 1), (3, 0)])
def test_center_crop_offsets_follow_torchvision_rounding(width, left):
    # shorter side already equals the target: no resampling, only the crop (round half to even)
    columns = np.arange(width, dtype=np.uint8) * 40
    image = Image.fromarray(np.repeat(np.tile(columns, (2, 1))[:, :, None], 3, axis=2), "RGB")
    x = preprocess_image(image, 2)
    red = x[0] * OPENAI_DATASET_STD[0] + OPENAI_DATASET_MEAN[0]
    assert torch.allclose(red[0] * 255, torch.tensor([columns[left], columns[left + 1]], dtype=torch.float32),
                          atol=1e-3)


def test_resize_shorter_side_keeps_aspect_then_crops():
    # a tall image: the top and bottom quarters (black) are cropped away, the white middle stays
    pixels = np.zeros((80, 40, 3), dtype=np.uint8)
    pixels[20:60] = 255
    x = preprocess_image(Image.fromarray(pixels, "RGB"), 20)
    white = (1 - OPENAI_DATASET_MEAN[0]) / OPENAI_DATASET_STD[0]
    assert x.shape == (3, 20, 20)
    assert torch.allclose(x[0, 2:-2], torch.full((16, 20), white), atol=1e-3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(mode):
    image = Image.new("RGB", (12, 12), (10, 200, 30)).convert(mode)
    assert decode_image(encode(image, "TIFF" if mode == "CMYK" else "PNG")).mode == "RGB"


def test_corrupt_truncated_and_oversized_images_raise_bad_image():
    good = encode(Image.new("RGB", (32, 32), (1, 2, 3)), "JPEG")
    for data in (b"not an image", good[: len(good) // 2], b""):
        with pytest.raises(BadImage):
            decode_image(data)
    with pytest.raises(BadImage):
        decode_image(encode(Image.new("1", (9000, 9000))))


def _reference_crop_box(width, height, rng, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params, written out with the same draws from `rng`."""
    import math

    area = width * height
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.randint(0, height - h)
            j = rng.randint(0, width - w)
            return j, i, w, h
    in_ratio = width / height
    w, h = ((width, int(round(width / ratio[0]))) if in_ratio < ratio[0] else
            (int(round(height * ratio[1])), height) if in_ratio > ratio[1] else (width, height))
    return (width - w) // 2, (height - h) // 2, w, h


@pytest.mark.parametrize("size", [(64, 48), (40, 90), (33, 33)])
def test_random_resized_crop_follows_the_reference_rule(size):
    import random

    from lcl_megatron.data.images import random_resized_crop_box

    width, height = size
    for seed in range(50):
        box = random_resized_crop_box(width, height, random.Random(seed))
        assert box == _reference_crop_box(width, height, random.Random(seed))
        left, top, w, h = box
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
        if 3 / 4 <= width / height <= 4 / 3:  # otherwise the fallback crop clamps the aspect ratio
            assert 0.85 <= w * h / (width * height) <= 1.0
        assert left + w <= width and top + h <= height


def test_training_crop_is_bicubic_resize_of_the_box_and_deterministic():
    import random

    from lcl_megatron.data.images import random_resized_crop_box

    pixels = np.random.default_rng(1).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    x = preprocess_image(image, 16, random.Random(3))
    left, top, w, h = random_resized_crop_box(70, 50, random.Random(3))
    expected = preprocess_image(image.crop((left, top, left + w, top + h)).resize((16, 16), Image.Resampling.BICUBIC), 16)
    assert torch.equal(x, expected)
    assert torch.equal(x, preprocess_image(image, 16, random.Random(3)))  # same seed, same pixels (exact resume)
    assert not torch.equal(x, preprocess_image(image, 16, random.Random(4)))
    assert not torch.equal(x, preprocess_image(image, 16))  # evaluation transform: resize + centre crop
