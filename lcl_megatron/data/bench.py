"""`lcl bench data`: token utilisation and documents/s of one loader worker, ours beside the reference's.

1. Token utilisation on image-text pairs (ViT-B/32: 49 image tokens): the
   reference pads every pair to its own 128-token row; ours packs pairs into
   2,048-token rows.
2. Documents/s of one process from stored documents to batches on the MMC4
   sample (`--mmc4`, the real 40 documents) with generated photos for its
   `image_name`s. Ours: `lcl prepare mmc4` shards -> packed 2,048-token
   batches. The reference's per-document work, rewritten here from its
   description: one document from a pyarrow array, similarity filter, sort,
   one random image per sentence, at most 6, each image opened from the flat
   folder, converted to RGB and transformed as OpenCLIP's training transform
   (random resized crop, scale 0.9-1, bicubic; normalise), image strings
   spliced into the sentences, the joined text tokenized by OpenCLIP's
   tokenizer (the reference's) to 2,048 tokens, truncation repaired; rows
   padded to 2,048 and stacked.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from lcl_megatron.config import DataConfig
from lcl_megatron.data.images import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from lcl_megatron.data.loader import build_train_loader
from lcl_megatron.data.sequences import encode_pair
from lcl_megatron.data.shards import write_shard
from lcl_megatron.tokens import EOT_ID, IMG_ID, SOI_ID
from lcl_megatron.utils import write_markdown_section

IMAGE_SIZE, NUM_IMAGE_TOKENS = 224, 49  # ViT-B/32 at 224 px
PAIR_CONTEXT_REFERENCE, CONTEXT = 128, 2048
UTILISATION_TARGET, SPEEDUP_GOAL = 0.95, 2.0


# ------------------------------------------------------------------ inputs


def sample_photos() -> list[PILImage.Image]:
    import sklearn

    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    return [PILImage.open(folder / name).convert("RGB") for name in ("china.jpg", "flower.jpg")]


def web_photo(n: int, photos) -> bytes:
    """A JPEG of web-image size (shorter side 240-480 px) cut from scikit-learn's sample photos."""
    rng = np.random.default_rng(n)
    photo = photos[n % len(photos)]
    w, h = int(rng.integers(200, photo.width)), int(rng.integers(200, photo.height))
    x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
    scale = float(rng.uniform(240, 480)) / min(w, h)
    image = photo.crop((x, y, x + w, y + h)).resize((int(w * scale), int(h * scale)), PILImage.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=88)
    return out.getvalue()


def make_mmc4_inputs(mmc4_jsonl: Path, root: Path) -> tuple[Path, Path]:
    docs = [json.loads(line) for line in mmc4_jsonl.read_text().splitlines() if line.strip()]
    images = root / "images"
    images.mkdir()
    photos = sample_photos()
    for n, name in enumerate(sorted({info["image_name"] for doc in docs for info in doc["image_info"]})):
        (images / name).write_bytes(web_photo(n, photos))
    (root / "docs").mkdir()
    zipped = root / "docs" / "docs_shard_0_v2.jsonl.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("docs_shard_0_v2.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    return zipped, images


# ------------------------------------------------------------------ 1. pair utilisation


def pair_utilisation(captions: list[str], root: Path, batches: int) -> dict:
    from lcl_megatron.tokenizer import get_tokenizer

    tiny = io.BytesIO()
    PILImage.new("RGB", (8, 8), (120, 30, 60)).save(tiny, format="PNG")
    shards = root / "pairs"
    shards.mkdir()
    write_shard(shards / "pairs-0.tar", [(f"p{i:06d}", {"txt": c.encode(), "png": tiny.getvalue()})
                                         for i, c in enumerate(captions)])
    tok = get_tokenizer()
    rng = random.Random(0)
    lengths = [len(encode_pair(ids, rng, num_image_tokens=NUM_IMAGE_TOKENS, context_length=PAIR_CONTEXT_REFERENCE,
                               img_first_prob=0.5)) for ids in tok.encode_batch(captions)]
    reference = sum(lengths) / (len(lengths) * PAIR_CONTEXT_REFERENCE)
    loader = build_train_loader(DataConfig(path=[str(shards)], packing=True, shuffle_buffer=64), image_size=8,
                                num_image_tokens=NUM_IMAGE_TOKENS, context_length=CONTEXT, micro_batch_size=4,
                                dp_rank=0, dp_size=1, seed=0)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    ours = loader.stats["tokens_real"] / loader.stats["tokens_total"]
    return {"pairs": len(captions), "mean_pair_tokens": sum(lengths) / len(lengths),
            "reference_rows_128": reference, "ours_packed_2048": ours, "rows": batches * 4}


# ------------------------------------------------------------------ 2. documents/s: the reference's way


class ReferenceDocuments:
    """The reference MMC4 dataset's per-document work (see the module docstring), our code."""

    def __init__(self, zipped: Path, images: Path, tokenizer):
        import pyarrow as pa

        member = zipped.name[: -len(".zip")]
        with zipfile.ZipFile(zipped) as z:
            lines = z.read(member).splitlines()
        self.annotations = pa.array([json.loads(line) for line in lines])
        self.images, self.tokenizer = images, tokenizer
        mean, std = np.asarray(OPENAI_DATASET_MEAN, np.float32), np.asarray(OPENAI_DATASET_STD, np.float32)
        self.mean, self.std = mean, std
        self.run = " <start_of_img> " + "<img_placehold> " * NUM_IMAGE_TOKENS + "<end_of_img> "

    def __len__(self):
        return len(self.annotations)

    def transform(self, image: PILImage.Image) -> torch.Tensor:
        """OpenCLIP's training transform: RandomResizedCrop(scale 0.9-1, ratio 3/4-4/3, bicubic), normalise."""
        width, height = image.size
        area = width * height
        for _ in range(10):
            target = area * random.uniform(0.9, 1.0)
            ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                break
        else:
            w, h, top, left = width, height, 0, 0
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), PILImage.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        pixels = (np.asarray(image, dtype=np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def __getitem__(self, index: int):
        doc = self.annotations[index].as_py()
        sentences = doc["text_list"]
        kept = sorted(((info["matched_text_index"], info["image_name"]) for info in doc["image_info"]
                       if info["matched_sim"] >= 0.24), key=lambda m: m[0])
        chosen, group = [], []
        for entry in kept + [(None, None)]:
            if group and entry[0] != group[0][0]:
                chosen.append(group[random.randint(0, len(group) - 1)])
                group = []
            group.append(entry)
        chosen = chosen[:6]
        images, indices = [], []
        for index_in_text, name in chosen:
            try:
                image = PILImage.open(self.images / name).convert("RGB")
            except Exception:
                continue
            images.append(self.transform(image))
            indices.append(index_in_text)
        if not images:
            return None
        for i in indices:
            sentences[i] = self.run + sentences[i] if random.random() < 0.5 else sentences[i] + self.run
        ids = self.tokenizer(" ".join(sentences), context_length=CONTEXT)[0]
        soi = int((ids == SOI_ID).sum())
        if soi * NUM_IMAGE_TOKENS != int((ids == IMG_ID).sum()):
            last = int(torch.nonzero(ids == SOI_ID).max())
            ids = torch.cat([ids[:last], torch.tensor([EOT_ID]), torch.zeros(CONTEXT - last - 1, dtype=ids.dtype)])
            soi = int((ids == SOI_ID).sum())
        return torch.stack(images)[:soi], ids


def _openclip_simple_tokenizer():
    """OpenCLIP's own tokenizer (the reference's), loaded from its file: the package's
    __init__ imports torchvision, which is not usable here."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_openclip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer(context_length=CONTEXT,
                                  additional_special_tokens=["<img_placehold>", "<start_of_img>", "<end_of_img>"])


def reference_docs_per_s(zipped: Path, images: Path, documents: int, batch: int) -> float:
    dataset = ReferenceDocuments(zipped, images, _openclip_simple_tokenizer())
    random.seed(0)
    dataset[0]  # warm the tokenizer's cache as a long run would have
    done, start = 0, time.process_time()
    pending = []
    while done < documents:
        item = dataset[done % len(dataset)]
        done += 1
        if item is not None:
            pending.append(item)
        if len(pending) == batch:
            torch.cat([p[0] for p in pending]), torch.stack([p[1] for p in pending])
            pending = []
    return documents / (time.process_time() - start)


def our_docs_per_s(zipped: Path, images: Path, root: Path, documents: int, batch: int) -> tuple[float, float]:
    from lcl_megatron.data.prepare.commands import mmc4_main

    out = root / "shards"
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            rc = mmc4_main(["--docs", str(zipped), "--images", str(images), "--out", str(out), "--workers", "1",
                            "--no-progress"])
        finally:
            sys.stdout = stdout
    if rc != 0:
        raise RuntimeError("lcl prepare mmc4 failed")
    loader = build_train_loader(DataConfig(path=[str(out)], packing=True, shuffle_buffer=16), image_size=IMAGE_SIZE,
                                num_image_tokens=NUM_IMAGE_TOKENS, context_length=CONTEXT, micro_batch_size=batch,
                                dp_rank=0, dp_size=1, seed=0)
    it = iter(loader)
    next(it)  # warm up: tokenizer, first shard
    start_docs, start = loader.stats["samples"], time.process_time()
    while loader.stats["samples"] - start_docs < documents:
        next(it)
    elapsed = time.process_time() - start
    utilisation = loader.stats["tokens_real"] / loader.stats["tokens_total"]
    return (loader.stats["samples"] - start_docs) / elapsed, utilisation


# ------------------------------------------------------------------ report


def markdown(result: dict) -> str:
    p, d = result["pairs"], result["documents"]
    speedup = d["ours_docs_per_s"] / d["reference_docs_per_s"]
    lines = [
        "## Data", "",
        f"`lcl bench data`, {result['date']}, on {result['machine']}, one process (one loader worker), "
        f"torch {torch.__version__}. Images 224 px, 49 image tokens (ViT-B/32). Documents/s count the "
        f"process's CPU time (the machine is shared; wall time there is noise). Both sides decode and "
        f"resample each image exactly as OpenCLIP does, which is most of the time per document.", "",
        "| measure | reference | ours |", "|---|---|---|",
        f"| token utilisation, pairs ({p['pairs']} captions = the MMC4 sample's sentences, "
        f"{p['mean_pair_tokens']:.1f} tokens each) | {p['reference_rows_128']:.1%} (one pair per 128-token row) "
        f"| {p['ours_packed_2048']:.1%} (packed into 2,048-token rows) |",
        f"| MMC4 documents/s per worker, stored documents -> batches ({d['documents']} documents of the real "
        f"40-document sample, generated photos, shorter side 240-480 px) | {d['reference_docs_per_s']:.2f} "
        f"(jsonl + image files, OpenCLIP tokenizer, rows padded to 2,048) | {d['ours_docs_per_s']:.2f} "
        f"(`lcl prepare mmc4` shards, packed 2,048-token rows, {d['ours_token_utilisation']:.1%} of tokens real) |",
        "",
        f"- pair token utilisation at 2,048 with packing: {p['ours_packed_2048']:.1%} "
        f"({'met' if p['ours_packed_2048'] >= UTILISATION_TARGET else 'NOT met'}; target >= 95%)",
        f"- MMC4 documents/s, ours / reference: {speedup:.2f}x "
        f"({'met' if speedup >= SPEEDUP_GOAL else 'NOT met'}; goal >= 2x)",
    ]
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name() -> str:
    """This machine as benchmark rows name it: CPU model and core count."""
    return f"{cpu_name()}, {os.cpu_count()} CPU cores"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lcl bench data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  lcl bench data --documents 20 --pair-batches 4 --json bench_data.json")
    parser.add_argument("--mmc4", default=str(Path(__file__).resolve().parents[1] / "assets" / "mmc4_sample40.jsonl"),
                        help="an MMC4 .jsonl file (default: the 40 real MMC4 documents shipped in lcl_megatron/assets)")
    parser.add_argument("--documents", type=int, default=120, help="documents timed on each side")
    parser.add_argument("--pair-batches", type=int, default=40, help="packed batches (4 rows of 2,048) measured")
    parser.add_argument("--write", metavar="BENCHMARKS_MD", help="put the results into this file's '## Data' section")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    mmc4 = Path(args.mmc4)
    if not mmc4.is_file():
        print(f"lcl bench data: MMC4 file '{mmc4}' not found (give --mmc4)", file=sys.stderr)
        return 2
    if args.documents < 1 or args.pair_batches < 1:
        print("lcl bench data: --documents and --pair-batches must be positive", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # one loader worker is one single-threaded process
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs = [json.loads(line) for line in mmc4.read_text().splitlines() if line.strip()]
        captions = [s for doc in docs for s in doc["text_list"] if s.strip()]
        pairs = pair_utilisation(captions, root, args.pair_batches)
        zipped, images = make_mmc4_inputs(mmc4, root)
        reference = reference_docs_per_s(zipped, images, args.documents, batch=8)
        ours, utilisation = our_docs_per_s(zipped, images, root, args.documents, batch=2)
    load = os.getloadavg()[0]
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{machine_name()} (load average {load:.1f})",
        "pairs": pairs,
        "documents": {"documents": args.documents, "reference_docs_per_s": reference, "ours_docs_per_s": ours,
                      "ours_token_utilisation": utilisation},
    }
    section = markdown(result)
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.write:
        write_markdown_section(Path(args.write), "## Data", section)
    return 0
