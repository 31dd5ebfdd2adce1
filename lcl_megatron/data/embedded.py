"""The embedded corpus "digits": interleaved documents about real handwritten digits.

Built at first use, deterministically, from scikit-learn's `load_digits`
(1,797 real 8x8 scans, upscaled), into the cache directory ($LCL_CACHE_DIR,
default ~/.cache/lcl-megatron) as webdataset shards. A fifth of each class is
held out for zero-shot evaluation and never appears in a training document.

In half of the documents the sentence before each image names the digit that
comes next ("here is a handwritten seven: <image>"); in the others the
sentence after it does ("<image> that was a seven."). The zero-shot prompt of
a class is the most frequent "before" sentence, so the context feature at its
`<start_of_img>` is what training taught the model to match with that digit.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from lcl_megatron.utils import fsync_dir
from lcl_megatron.data.documents import Document, Image, Text
from lcl_megatron.data.shards import write_shard

# Bump when the recipe changes: the cache directory is named after it.
DIGITS_VERSION = 3
DIGITS_SEED = 20240607
DIGIT_IMAGE_SIZE = 32  # the 8x8 scans are upscaled 4x
HELDOUT_FRACTION = 0.2
TRAIN_DOCUMENTS = 4096
TRAIN_SHARDS = 16
HELDOUT_SHARD = "heldout-00000.tar"
CLASS_PROMPTS_FILE = "class_prompts.json"
INDEX_FILE = "index.json"

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_TEMPLATE = "here is a handwritten {name}:"
# Sentences that name the digit of the image that follows them.
BEFORE_TEMPLATES = (
    PROMPT_TEMPLATE,
    "the next picture shows the digit {name}:",
    "someone wrote the number {name} by hand:",
    "a scanned {name} comes next:",
    "look at this {name}, written with a pen:",
    "this one is a {name} ({digit}):",
)
PROMPT_TEMPLATE_WEIGHT = 0.4  # the rest share the remaining probability equally
# Sentences that name the digit of the image before them.
AFTER_TEMPLATES = (
    "that was a handwritten {name}.",
    "the digit above is a {name}.",
    "this picture shows the number {name} ({digit}).",
    "you can see a {name} written by hand.",
    "it is a {name}.",
)
INTROS = (
    "a page of handwritten digits.",
    "some numbers scanned from paper forms.",
    "digits written by different people.",
    "a small collection of handwritten numbers.",
)
# Documents whose text names each digit before its image; the rest name their one image after it.
NAMED_BEFORE_FRACTION = 0.7
IMAGES_PER_DOCUMENT = (1, 2, 3, 4)
IMAGES_PER_DOCUMENT_WEIGHTS = (0.3, 0.3, 0.25, 0.15)


def cache_dir() -> Path:
    return Path(os.environ.get("LCL_CACHE_DIR") or Path.home() / ".cache" / "lcl-megatron")


def class_prompts() -> list[str]:
    return [PROMPT_TEMPLATE.format(name=name, digit=d) for d, name in enumerate(DIGIT_NAMES)]


def _png(pixels: np.ndarray) -> bytes:
    """An 8x8 scan (0..16) -> upscaled grayscale PNG bytes (no timestamps: deterministic)."""
    image = PILImage.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
    image = image.resize((DIGIT_IMAGE_SIZE, DIGIT_IMAGE_SIZE), PILImage.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def split_digits(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of scan indices -> (train, heldout), both sorted."""
    train, heldout = [], []
    for label in range(len(DIGIT_NAMES)):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_held = int(round(len(members) * HELDOUT_FRACTION))
        heldout.extend(members[:n_held].tolist())
        train.extend(members[n_held:].tolist())
    return np.array(sorted(train)), np.array(sorted(heldout))


def _fill(template: str, label: int) -> str:
    return template.format(name=DIGIT_NAMES[label], digit=label)


def _before_sentence(label: int, rng: random.Random) -> str:
    if rng.random() < PROMPT_TEMPLATE_WEIGHT:
        return _fill(PROMPT_TEMPLATE, label)
    return _fill(rng.choice(BEFORE_TEMPLATES[1:]), label)


def digit_document(labels: list[int], named_before: bool, rng: random.Random) -> Document:
    """A document about the given digits, image i stored as file "img{i}.png".

    Named before: each image follows a sentence naming its digit. Named after:
    one image opens the document and a sentence names it; an image at the start
    of a row has no context and takes no part in the contrastive loss, so these
    documents teach captioning without pairing an image with an unrelated context.
    """
    if not named_before:
        return Document([Image("img0.png"), Text(_fill(rng.choice(AFTER_TEMPLATES), labels[0]))])
    items: list = [Text(rng.choice(INTROS))] if rng.random() < 0.5 else []
    for i, label in enumerate(labels):
        items += [Text(_before_sentence(label, rng)), Image(f"img{i}.png")]
    return Document(items)


def _train_samples(pngs: list[bytes], labels: np.ndarray, train: np.ndarray, rng: random.Random):
    """TRAIN_DOCUMENTS samples; scans are drawn from reshuffled passes over the train split."""
    pool: list[int] = []
    for n in range(TRAIN_DOCUMENTS):
        named_before = rng.random() < NAMED_BEFORE_FRACTION
        count = rng.choices(IMAGES_PER_DOCUMENT, IMAGES_PER_DOCUMENT_WEIGHTS)[0] if named_before else 1
        chosen = []
        for _ in range(count):
            if not pool:
                pool = [int(i) for i in train]
                rng.shuffle(pool)
            chosen.append(pool.pop())
        doc = digit_document([int(labels[i]) for i in chosen], named_before, rng)
        files = {"json": doc.to_json().encode()}
        files.update({f"img{k}.png": pngs[i] for k, i in enumerate(chosen)})
        yield f"doc{n:05d}", files


def build_digits(out: Path) -> None:
    """Write the whole corpus into the empty directory `out`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    pngs = [_png(image) for image in digits.images]
    train, heldout = split_digits(labels, np.random.default_rng(DIGITS_SEED))
    rng = random.Random(DIGITS_SEED)

    samples = list(_train_samples(pngs, labels, train, rng))
    per_shard = -(-len(samples) // TRAIN_SHARDS)
    index = {"version": DIGITS_VERSION, "train": {}, "heldout": {}}
    for s in range(TRAIN_SHARDS):
        name = f"train-{s:05d}.tar"
        count = write_shard(out / name, samples[s * per_shard:(s + 1) * per_shard])
        index["train"][name] = {"samples": count}
    held = ((f"scan{i:04d}", {"png": pngs[i], "cls": str(int(labels[i])).encode()}) for i in heldout)
    index["heldout"][HELDOUT_SHARD] = {"samples": write_shard(out / HELDOUT_SHARD, held)}
    for part in ("train", "heldout"):
        for name, entry in index[part].items():
            entry["sha256"] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    (out / CLASS_PROMPTS_FILE).write_text(json.dumps(class_prompts(), indent=1))
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True))


EMBEDDED_CORPORA = {"digits": (DIGITS_VERSION, build_digits)}


def ensure_corpus(name: str) -> Path:
    """The directory of embedded corpus `name`, built first if absent.

    The build fills a private temporary directory that is renamed into place
    only when complete, so a killed build leaves nothing half-written where
    readers look, and of two concurrent builds the first rename wins.
    """
    if name not in EMBEDDED_CORPORA:
        raise ValueError(f"unknown embedded corpus {name!r} (known: {', '.join(sorted(EMBEDDED_CORPORA))})")
    version, build = EMBEDDED_CORPORA[name]
    final = cache_dir() / "embedded" / f"{name}-v{version}"
    if (final / INDEX_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INDEX_FILE).is_file():
                raise
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def corpus_index(directory: Path) -> dict:
    return json.loads((directory / INDEX_FILE).read_text())
