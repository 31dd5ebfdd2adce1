"""Labelled image sets with a train and a test split, for probes of frozen features.

Two layouts:
  embedded:NAME   an embedded corpus: its probe-training shard (images of the
                  training split) and its held-out shard (never trained on).
  DIR             an image folder: DIR/train/CLASS/*.png|jpg|... and DIR/test/CLASS/...,
                  one sub-folder per class; classes are the sorted folder names of train/.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lcl_megatron.data.embedded import DIGIT_NAMES, HELDOUT_SHARD, PROBE_TRAIN_SHARD, ensure_corpus
from lcl_megatron.data.images import BadImage, load_image
from lcl_megatron.data.shards import read_shard
from lcl_megatron.errors import UserError

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class LabelledSetError(UserError, ValueError):
    """The set does not exist or does not have the expected layout."""


def _from_shard(path: Path, image_size: int) -> tuple[list[torch.Tensor], list[int]]:
    images, labels = [], []
    for sample in read_shard(path):
        images.append(load_image(sample["png"], image_size))
        labels.append(int(sample["cls"].decode()))
    return images, labels


def class_folders(directory: Path) -> list[str]:
    """The class names of an image folder, checked before any image is read."""
    for split in SPLITS:
        if not (directory / split).is_dir():
            raise LabelledSetError(f"'{directory}' has no '{split}' folder (expected {split}/CLASS/IMAGE)")
    classes = sorted(p.name for p in (directory / "train").iterdir() if p.is_dir())
    if len(classes) < 2:
        raise LabelledSetError(f"'{directory / 'train'}' needs at least two class folders")
    unknown = sorted({p.name for p in (directory / "test").iterdir() if p.is_dir()} - set(classes))
    if unknown:
        raise LabelledSetError(f"'{directory / 'test'}' has classes absent from train/: {', '.join(unknown)}")
    return classes


def _from_folder(directory: Path, classes: list[str], image_size: int):
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((directory / name).glob("*")) if (directory / name).is_dir() else []:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                images.append(load_image(path.read_bytes(), image_size))
            except BadImage as e:
                raise LabelledSetError(f"'{path}' is not a readable image: {e}") from None
            labels.append(label)
    if not images:
        raise LabelledSetError(f"'{directory}' holds no images")
    return images, labels


def check_labelled_set(entry: str) -> list[str]:
    """The class names of `entry`; raises LabelledSetError before any heavy work."""
    if entry.startswith("embedded:"):
        try:
            ensure_corpus(entry.split(":", 1)[1])
        except ValueError as e:
            raise LabelledSetError(str(e)) from None
        return list(DIGIT_NAMES)
    directory = Path(entry)
    if not directory.is_dir():
        raise LabelledSetError(f"'{entry}' is neither embedded:NAME nor a directory")
    return class_folders(directory)


def load_labelled_set(entry: str, image_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train": (images [N, 3, S, S], labels [N]), "test": (...)}."""
    classes = check_labelled_set(entry)
    out = {}
    for split in SPLITS:
        if entry.startswith("embedded:"):
            directory = ensure_corpus(entry.split(":", 1)[1])
            images, labels = _from_shard(directory / (PROBE_TRAIN_SHARD if split == "train" else HELDOUT_SHARD),
                                         image_size)
        else:
            images, labels = _from_folder(Path(entry) / split, classes, image_size)
        out[split] = (torch.stack(images), torch.tensor(labels, dtype=torch.long))
    return out
