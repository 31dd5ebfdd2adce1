"""Evaluation sets, read in batches so that no set is ever held in memory whole.

Labelled images (zero-shot classification, probes), `LabelledSet`:
    embedded:NAME       the built-in corpus's held-out split; its class prompts are the class names
                        and the template is "{}" (the prompt as it is)
    DIR/CLASS/IMAGE     an image folder: one sub-folder per class, classes in sorted order
    DIR/*.tar           webdataset shards of an image (jpg/jpeg/png/webp) and `cls` (the class index)
Class names come from `--classnames` (a .json list, a .txt file with one per line, or
"imagenet": OpenCLIP's 1,000 ImageNet names), else `classnames.json`/`classnames.txt` in DIR,
else an image folder's sub-folder names. Templates: "openai_imagenet" (OpenAI's 80, the
reference's), a .json list of strings with one "{}", or `templates.json` in DIR.

Image-text pairs (retrieval), `CaptionedSet`:
    embedded:NAME       the held-out split, each image captioned with its class prompt
    DIR/*.tar           webdataset shards of an image and `txt` (one caption per line: COCO-style
                        sets carry several)
    DIR/captions.tsv    a folder of images and a file of "IMAGE<TAB>CAPTION" lines (several per image)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import torch

from lcl_megatron.config import ConfigError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTIONS_FILE = "captions.tsv"
BUILTIN_CLASSNAMES = {"imagenet": "imagenet_classnames.json"}
BUILTIN_TEMPLATES = {"openai_imagenet": "openai_imagenet_templates.json"}


def _asset(name: str) -> list[str]:
    return json.loads(resources.files("lcl_megatron.eval").joinpath("assets", name).read_text())


def read_string_list(spec: str, builtin: dict, what: str) -> list[str]:
    """A built-in list by name, a .json list of strings, or a .txt file with one string per line."""
    if spec in builtin:
        return _asset(builtin[spec])
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} '{spec}' (or name one of: {', '.join(builtin)}): {e}") from None
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except ValueError:
            raise ConfigError(f"{what} '{spec}' is not valid JSON") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ConfigError(f"{what} '{spec}' must hold a JSON list of strings")
    else:
        items = [line.strip() for line in text.splitlines() if line.strip()]
    if not items:
        raise ConfigError(f"{what} '{spec}' is empty")
    return items


def _embedded_dir(entry: str) -> Path:
    from lcl_megatron.data.embedded import ensure_corpus

    return ensure_corpus(entry.split(":", 1)[1])


def _sample_image(sample: dict) -> bytes | None:
    return next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)


def _shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.tar"))


def _batches(items: Iterator[tuple[bytes, object]], image_size: int, batch_size: int):
    """(encoded image, target) pairs -> ([B, 3, H, W] evaluation-transformed images, [targets])."""
    from lcl_megatron.data.images import load_image

    images, targets = [], []
    for data, target in items:
        images.append(load_image(data, image_size))
        targets.append(target)
        if len(images) == batch_size:
            yield torch.stack(images), targets
            images, targets = [], []
    if images:
        yield torch.stack(images), targets


@dataclass
class LabelledSet:
    location: str
    classnames: list[str]
    templates: list[str]

    @classmethod
    def open(cls, entry: str, classnames: str | None = None, templates: str | None = None) -> "LabelledSet":
        """Resolve `entry` and its class names and templates; ConfigError (one line) when unusable."""
        if entry.startswith("embedded:"):
            from lcl_megatron.data.embedded import CLASS_PROMPTS_FILE

            directory = _embedded_dir(entry)
            names = read_string_list(classnames or str(directory / CLASS_PROMPTS_FILE), BUILTIN_CLASSNAMES,
                                     "class names")
            return cls(entry, names, read_string_list(templates, BUILTIN_TEMPLATES, "templates")
                       if templates else ["{}"])
        directory = Path(entry)
        if not directory.is_dir():
            raise ConfigError(f"labelled set '{entry}' is not a directory (nor embedded:NAME)")
        if classnames is None:
            found = [p for p in (directory / "classnames.json", directory / "classnames.txt") if p.is_file()]
            if found:
                classnames = str(found[0])
        if classnames is not None:
            names = read_string_list(classnames, BUILTIN_CLASSNAMES, "class names")
        elif _shards(directory):
            raise ConfigError(f"labelled set '{entry}' holds shards but no classnames.json/.txt: pass --classnames")
        else:
            names = [p.name for p in sorted(directory.iterdir()) if p.is_dir()]
        if templates is None:
            templates = str(directory / "templates.json") if (directory / "templates.json").is_file() \
                else "openai_imagenet"
        template_list = read_string_list(templates, BUILTIN_TEMPLATES, "templates")
        bad = [t for t in template_list if t.count("{}") != 1]
        if bad:
            raise ConfigError(f"template {bad[0]!r} must hold exactly one '{{}}' for the class name")
        if not _shards(directory) and not any(p.is_dir() for p in directory.iterdir()):
            raise ConfigError(f"labelled set '{entry}' holds neither .tar shards nor one sub-folder per class")
        return cls(entry, names, template_list)

    def _items(self) -> Iterator[tuple[bytes, int]]:
        from lcl_megatron.data.shards import read_shard

        if self.location.startswith("embedded:"):
            from lcl_megatron.data.embedded import HELDOUT_SHARD

            shards = [_embedded_dir(self.location) / HELDOUT_SHARD]
        else:
            shards = _shards(Path(self.location))
        if shards:
            for shard in shards:
                for sample in read_shard(shard):
                    data = _sample_image(sample)
                    if data is not None and "cls" in sample:
                        yield data, int(sample["cls"].decode())
            return
        folders = sorted(p for p in Path(self.location).iterdir() if p.is_dir())
        if len(folders) != len(self.classnames):
            raise ConfigError(f"labelled set '{self.location}' has {len(folders)} class folders but "
                              f"{len(self.classnames)} class names")
        for label, folder in enumerate(folders):
            for path in sorted(folder.iterdir()):
                if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                    yield path.read_bytes(), label

    def batches(self, image_size: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images [B, 3, H, W], labels [B]) in a fixed order, `batch_size` at a time."""
        for images, labels in _batches(self._items(), image_size, batch_size):
            yield images, torch.tensor(labels, dtype=torch.long)


@dataclass
class CaptionedSet:
    location: str

    @classmethod
    def open(cls, entry: str) -> "CaptionedSet":
        if entry.startswith("embedded:"):
            _embedded_dir(entry)
            return cls(entry)
        directory = Path(entry)
        if not directory.is_dir():
            raise ConfigError(f"image-text set '{entry}' is not a directory (nor embedded:NAME)")
        if not _shards(directory) and not (directory / CAPTIONS_FILE).is_file():
            raise ConfigError(f"image-text set '{entry}' holds neither .tar shards nor {CAPTIONS_FILE}")
        return cls(entry)

    def _items(self) -> Iterator[tuple[bytes, list[str]]]:
        from lcl_megatron.data.shards import read_shard

        if self.location.startswith("embedded:"):
            from lcl_megatron.data.embedded import CLASS_PROMPTS_FILE, HELDOUT_SHARD

            directory = _embedded_dir(self.location)
            prompts = json.loads((directory / CLASS_PROMPTS_FILE).read_text())
            for sample in read_shard(directory / HELDOUT_SHARD):
                yield _sample_image(sample), [prompts[int(sample["cls"].decode())]]
            return
        directory = Path(self.location)
        shards = _shards(directory)
        if shards:
            for shard in shards:
                for sample in read_shard(shard):
                    data = _sample_image(sample)
                    if data is not None and "txt" in sample:
                        captions = [c.strip() for c in sample["txt"].decode("utf-8").splitlines() if c.strip()]
                        if captions:
                            yield data, captions
            return
        captions: dict[str, list[str]] = {}
        for number, line in enumerate((directory / CAPTIONS_FILE).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            name, sep, caption = line.partition("\t")
            if not sep or not caption.strip():
                raise ConfigError(f"{directory / CAPTIONS_FILE} line {number} is not IMAGE<TAB>CAPTION")
            captions.setdefault(name, []).append(caption.strip())
        for name, texts in captions.items():
            path = directory / name
            if not path.is_file() or os.path.commonpath([path.resolve(), directory.resolve()]) != str(directory.resolve()):
                raise ConfigError(f"{directory / CAPTIONS_FILE} names '{name}', which is not an image in the folder")
            yield path.read_bytes(), texts

    def batches(self, image_size: int, batch_size: int) -> Iterator[tuple[torch.Tensor, list[list[str]]]]:
        """(images [B, 3, H, W], each image's captions) in a fixed order."""
        yield from _batches(self._items(), image_size, batch_size)


def load_zeroshot_set(entry: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A held-out classification set, whole -> (images [N,3,H,W], labels [N], one prompt per class).

    `entry` is "embedded:NAME" or a directory holding shards of `png`+`cls`
    samples and `class_prompts.json` (a JSON list of strings, class i first... last).
    """
    from lcl_megatron.data.embedded import CLASS_PROMPTS_FILE, HELDOUT_SHARD
    from lcl_megatron.data.images import load_image
    from lcl_megatron.data.shards import read_shard

    if entry.startswith("embedded:"):
        directory = _embedded_dir(entry)
        shards = [directory / HELDOUT_SHARD]
    else:
        directory = Path(entry)
        shards = _shards(directory)
    prompts = json.loads((directory / CLASS_PROMPTS_FILE).read_text())
    images, labels = [], []
    for shard in shards:
        for sample in read_shard(shard):
            images.append(load_image(_sample_image(sample), image_size))
            labels.append(int(sample["cls"].decode()))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), prompts
