"""The embedded corpora: documents about real handwritten digits, built from scikit-learn.

"digits": interleaved documents whose text names each digit (an easy corpus:
a linear probe of an untrained ViT already reads these scans). "digit-scenes"
and "digit-scenes-pairs": the same scans drawn into cluttered scenes, as
MMC4-like interleaved documents and as captioned pairs (see the second half
of this file).

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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from lcl_megatron.utils import fsync_dir
from lcl_megatron.data.documents import Document, Image, Text
from lcl_megatron.data.shards import write_shard

# Bump when the recipe changes: the cache directory is named after it.
DIGITS_VERSION = 4
DIGITS_SEED = 20240607
DIGIT_IMAGE_SIZE = 32  # the 8x8 scans are upscaled 4x
HELDOUT_FRACTION = 0.2
TRAIN_DOCUMENTS = 4096
TRAIN_SHARDS = 16
HELDOUT_SHARD = "heldout-00000.tar"
# Labelled training-split images (never held-out ones) on which probes are fitted.
PROBE_TRAIN_SHARD = "probe-train-00000.tar"
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


def _labelled(pngs: list[bytes], labels: np.ndarray, indices) -> Iterator[tuple[str, dict]]:
    return ((f"scan{i:04d}", {"png": pngs[n], "cls": str(int(labels[i])).encode()}) for n, i in enumerate(indices))


def write_corpus(out: Path, version: int, samples: list, probe_train, heldout, prompts: list[str]) -> None:
    """Training samples in TRAIN_SHARDS shards, the labelled probe-training and held-out
    shards, the class prompts and an index with every shard's checksum."""
    per_shard = -(-len(samples) // TRAIN_SHARDS)
    index = {"version": version, "train": {}, "heldout": {}, "probe_train": {}}
    for s in range(TRAIN_SHARDS):
        name = f"train-{s:05d}.tar"
        count = write_shard(out / name, samples[s * per_shard:(s + 1) * per_shard])
        index["train"][name] = {"samples": count}
    index["heldout"][HELDOUT_SHARD] = {"samples": write_shard(out / HELDOUT_SHARD, heldout)}
    index["probe_train"][PROBE_TRAIN_SHARD] = {"samples": write_shard(out / PROBE_TRAIN_SHARD, probe_train)}
    for part in ("train", "heldout", "probe_train"):
        for name, entry in index[part].items():
            entry["sha256"] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    (out / CLASS_PROMPTS_FILE).write_text(json.dumps(prompts, indent=1))
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True))


def load_scans() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scans [N, 8, 8] in 0..16, labels [N], train indices, held-out indices)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    train, heldout = split_digits(labels, np.random.default_rng(DIGITS_SEED))
    return digits.images, labels, train, heldout


def build_digits(out: Path) -> None:
    """Write the whole corpus into the empty directory `out`."""
    scans, labels, train, heldout = load_scans()
    pngs = [_png(image) for image in scans]
    samples = list(_train_samples(pngs, labels, train, random.Random(DIGITS_SEED)))
    write_corpus(out, DIGITS_VERSION, samples, _labelled([pngs[i] for i in train], labels, train),
                 _labelled([pngs[i] for i in heldout], labels, heldout), class_prompts())


# ---------------------------------------------------------------- digit scenes
#
# On "digits" a linear probe of an *untrained* ViT scores ~94% on the held-out
# scans (see docs/ablation.md): features need not be learned to read them, so
# an objective's effect on the encoder cannot show. In a scene the scan is
# scaled, rotated, placed anywhere and coloured on a noisy background with
# stray strokes; untrained features score ~20% there while a person still reads
# every digit. Every image is rendered afresh (training scans only), so no two
# training images are the same picture; the held-out scenes are rendered once.
#
# The interleaved documents are like MMC4's: text about a group of images, not a
# caption of each. Only the first digit of a count is named, a set of copies is
# named once, and a house number is read out only after its images. The pairs
# corpus gives each scene a caption instead.

SCENES_VERSION = 2
SCENE_SEED = 20240608
SCENE_SIZE = 32
SCENE_GLYPH_SIZES = (22, 30)  # side of the upscaled scan, pixels
SCENE_MAX_ROTATION = 10.0  # degrees
SCENE_MAX_STROKES = 1
SCENE_PROMPT = "several {name} digits written by different people:"
PAIR_PROMPT = "a handwritten {name}"
PAIR_CAPTIONS = (PAIR_PROMPT, "a picture of the digit {name}", "the number {name} ({digit}) written by hand",
                 "a {name} on a dark background")
SCENE_INTROS = ("a photo taken in the street.", "a page from an old notebook.", "scanned from a paper form.",
                "found on a wall in town.")


def render_scene(scan: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 scan (0..16) -> an RGB uint8 scene [SCENE_SIZE, SCENE_SIZE, 3]: a light
    glyph, scaled, rotated and placed anywhere on a dark noisy background with strokes."""
    from PIL import ImageDraw

    size = SCENE_SIZE
    background, ink = rng.uniform(0.0, 0.45, 3), rng.uniform(0.6, 1.0, 3)
    blotches = (rng.normal(0, 0.12, (4, 4, 3)) + 0.5).clip(0, 1)
    blotches = np.asarray(PILImage.fromarray((blotches * 255).astype(np.uint8)).resize(
        (size, size), PILImage.Resampling.BICUBIC)) / 255.0 - 0.5
    canvas = PILImage.fromarray(((background + blotches).clip(0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, SCENE_MAX_STROKES + 1))):
        ends = [tuple(rng.integers(0, size, 2).tolist()) for _ in range(2)]
        draw.line(ends, fill=tuple((rng.uniform(0, 1, 3) * 255).astype(int).tolist()), width=1)
    side = int(rng.integers(SCENE_GLYPH_SIZES[0], SCENE_GLYPH_SIZES[1] + 1))
    glyph = PILImage.fromarray(np.round(scan * (255.0 / 16.0)).astype(np.uint8)).resize(
        (side, side), PILImage.Resampling.BICUBIC)
    glyph = glyph.rotate(float(rng.uniform(-SCENE_MAX_ROTATION, SCENE_MAX_ROTATION)),
                         resample=PILImage.Resampling.BILINEAR)
    alpha = np.zeros((size, size))
    x, y = rng.integers(0, size - side + 1, 2)
    alpha[y:y + side, x:x + side] = np.asarray(glyph) / 255.0
    out = np.asarray(canvas) / 255.0 * (1 - alpha[..., None]) + ink * alpha[..., None]
    out = out + rng.normal(0, 0.03, out.shape)
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def _scene_png(scan: np.ndarray, rng: np.random.Generator) -> bytes:
    out = io.BytesIO()
    PILImage.fromarray(render_scene(scan, rng), mode="RGB").save(out, format="PNG")
    return out.getvalue()


def scene_document(labels: list[int], kind: str, rng: random.Random) -> Document:
    """A document about a group of scenes, image i stored as "img{i}.png".

    kind "count": consecutive digits, only the first named; "copies": one digit
    several times, named once; "house": digits read out after all their images.
    """
    images = [Image(f"img{i}.png") for i in range(len(labels))]
    if kind == "count":
        return Document([Text(f"counting up from {DIGIT_NAMES[labels[0]]}:"), *images])
    if kind == "copies":
        return Document([Text(_fill(SCENE_PROMPT, labels[0])), *images])
    words = " ".join(DIGIT_NAMES[label] for label in labels)
    return Document([Text(rng.choice(SCENE_INTROS)), *images, Text(f"the house number reads {words}.")])


def _scene_labels(kind: str, rng: random.Random) -> list[int]:
    count = rng.choice((2, 3, 4))
    first = rng.randrange(len(DIGIT_NAMES))
    if kind == "count":
        return [(first + i) % len(DIGIT_NAMES) for i in range(count)]
    if kind == "copies":
        return [first] * count
    return [rng.randrange(len(DIGIT_NAMES)) for _ in range(count)]


def _scene_samples(scans, labels, train, pairs: bool, rng: random.Random, image_rng: np.random.Generator):
    """TRAIN_DOCUMENTS samples; each image is a fresh scene of a training scan of the wanted digit."""
    by_label = {d: [int(i) for i in train if labels[i] == d] for d in range(len(DIGIT_NAMES))}
    for n in range(TRAIN_DOCUMENTS):
        if pairs:
            label = rng.randrange(len(DIGIT_NAMES))
            caption = _fill(rng.choice(PAIR_CAPTIONS), label)
            yield f"pair{n:05d}", {"txt": caption.encode(), "png": _scene_png(scans[rng.choice(by_label[label])],
                                                                             image_rng)}
            continue
        kind = rng.choice(("count", "copies", "house"))
        chosen = _scene_labels(kind, rng)
        files = {"json": scene_document(chosen, kind, rng).to_json().encode()}
        files.update({f"img{k}.png": _scene_png(scans[rng.choice(by_label[label])], image_rng)
                      for k, label in enumerate(chosen)})
        yield f"doc{n:05d}", files


def build_scenes(out: Path, pairs: bool) -> None:
    scans, labels, train, heldout = load_scans()
    # One stream renders the labelled sets, so both corpora share the same probe and held-out images.
    labelled_rng = np.random.default_rng(SCENE_SEED)
    probe_train = [_scene_png(scans[i], labelled_rng) for i in train]
    held = [_scene_png(scans[i], labelled_rng) for i in heldout]
    seed = SCENE_SEED + (1 if pairs else 0)
    samples = list(_scene_samples(scans, labels, train, pairs, random.Random(seed), np.random.default_rng(seed)))
    template = PAIR_PROMPT if pairs else SCENE_PROMPT
    write_corpus(out, SCENES_VERSION, samples, _labelled(probe_train, labels, train),
                 _labelled(held, labels, heldout), [_fill(template, d) for d in range(len(DIGIT_NAMES))])


EMBEDDED_CORPORA = {
    "digits": (DIGITS_VERSION, build_digits),
    "digit-scenes": (SCENES_VERSION, lambda out: build_scenes(out, pairs=False)),
    "digit-scenes-pairs": (SCENES_VERSION, lambda out: build_scenes(out, pairs=True)),
}


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
