"""MMC4 `.jsonl` / `.jsonl.zip` documents + downloaded images -> document shards.

Two output forms:
- `mmc4` (default): the document stays in MMC4 form (`text_list`, `image_info`)
  with only its usable images, renamed `img{i}.{ext}`; the loader draws the
  reference's random choices (one image per sentence, placement) anew in
  every epoch, as the reference does. Only the similarity threshold, which
  involves no chance, is applied here. Images that fail to load stay in
  `image_info` under `unloadable/NAME` (no such member), so that the loader
  picks and caps before dropping them, in the reference's order.
- `items`: the reference's rules are applied once, here, from `seed`, and the
  document is stored as ordered items (see documents.py).

Images are looked up by `image_name` in `IMAGES/<shard>/`, `IMAGES/<shard number>/`
and then `IMAGES/` itself (MMC4's downloads come flat or in one folder per shard).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lcl_megatron.data.prepare.conversion import store_image, write_output_shard
from lcl_megatron.data.images import MAX_IMAGE_PIXELS
from lcl_megatron.data.jsonl_lines import read_lines
from lcl_megatron.data.seeds import derive_seed
from lcl_megatron.data.sequences import parse_mmc4, place_mmc4_images, select_mmc4_images

INPUT_SUFFIXES = (".jsonl.zip", ".jsonl")
UNLOADABLE_PREFIX = "unloadable/"  # image_info name of an image that failed to load: never a sample member


@dataclass(frozen=True)
class Mmc4Options:
    images: str
    form: str = "mmc4"  # "mmc4" or "items"
    min_similarity: float = 0.24
    one_image_per_sentence: bool = True  # items form
    max_images: int = 6  # items form
    img_first_prob: float = 0.5  # items form
    min_images: int = 1
    max_pixels: int = MAX_IMAGE_PIXELS
    seed: int = 0


def image_folders(images: str, doc_path: str) -> list[str]:
    """Where the images of one docs file may lie, most specific first."""
    stem = os.path.basename(doc_path)
    for suffix in INPUT_SUFFIXES:
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    folders = [os.path.join(images, stem)]
    number = re.search(r"shard_(\d+)", stem)
    if number:
        folders.append(os.path.join(images, number.group(1)))
    return [f for f in folders if os.path.isdir(f)] + [images]


def _read_image(folders: list[str], name: str) -> bytes | None:
    if not name or "/" in name or name in (".", ".."):
        return None
    for folder in folders:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
        except OSError:
            return None
    return None


def convert_document(raw: dict, folders: list[str], opts: Mmc4Options, rng: random.Random,
                     stats: Counter) -> dict[str, bytes] | None:
    """One parsed MMC4 document -> the files of its output sample, or None (reason counted)."""
    try:
        sentences, matches = parse_mmc4(raw)
    except ValueError:
        infos = raw.get("image_info") if isinstance(raw, dict) else None
        stats["images_in"] += len(infos) if isinstance(infos, list) else 0
        stats["images_dropped_malformed_doc"] += len(infos) if isinstance(infos, list) else 0
        stats["docs_dropped_malformed"] += 1
        return None
    stats["images_in"] += len(matches)
    files: dict[str, bytes] = {}
    stored: dict[str, str] = {}  # image_name -> member name in the sample
    usable: list[tuple[int, float, str]] = []
    # Every match above the threshold, in order, an image that failed to load under a name no member
    # has: the reference picks one image per sentence and caps the count first, then drops the
    # images that fail to load, so the picking must see them.
    matched: list[tuple[int, float, str]] = []
    for index, sim, name in matches:
        if sim < opts.min_similarity:
            stats["images_dropped_below_similarity"] += 1
            continue
        if name in stored:
            usable.append((index, sim, stored[name]))
            matched.append(usable[-1])
            stats["images_out"] += 1
            continue
        member = store_image(_read_image(folders, name), files, stats, opts.max_pixels)
        if member is not None:
            stored[name] = member
            usable.append((index, sim, member))
        matched.append((index, sim, member if member is not None else UNLOADABLE_PREFIX + name))
    if opts.form == "items":
        selected = select_mmc4_images(matched, rng, min_similarity=opts.min_similarity, max_images=opts.max_images,
                                      one_per_sentence=opts.one_image_per_sentence)
        chosen = [(index, name) for index, name in selected if name in files]
        unchosen = len(usable) - len(chosen)
        stats["images_dropped_not_selected"] += unchosen
        stats["images_out"] -= unchosen
        doc = place_mmc4_images(sentences, chosen, rng, opts.img_first_prob)
        names = {image.name for image in doc.images}
        files = {member: data for member, data in files.items() if member in names}
        kept = len(chosen)
        document = doc.to_json().encode()
    else:
        kept = len(usable)
        document = json.dumps({
            "url": raw.get("url", ""), "text_list": sentences,
            "image_info": [{"image_name": member, "matched_text_index": index, "matched_sim": sim}
                           for index, sim, member in matched],
        }, ensure_ascii=False, sort_keys=True).encode()
    if kept < max(1, opts.min_images):
        stats["docs_dropped_no_usable_image"] += 1
        stats["images_out"] -= kept
        stats["images_dropped_doc_without_enough_images"] += kept
        return None
    return {"json": document, **files}


def convert_file(path: str, name: str, out_dir: Path, stats: Counter, *, opts: Mmc4Options) -> None:
    """One docs file -> OUT/NAME.tar."""
    folders = image_folders(opts.images, path)

    def samples():
        for line_number, line in enumerate(read_lines(path, stats)):
            if not line.strip():
                continue
            stats["docs_in"] += 1
            try:
                raw = json.loads(line)
            except ValueError:  # includes bad UTF-8
                stats["docs_dropped_malformed_json"] += 1
                continue
            rng = random.Random(derive_seed(opts.seed, name, line_number))
            files = convert_document(raw, folders, opts, rng, stats)
            if files is not None:
                stats["docs_out"] += 1
                yield f"d{line_number:08d}", files

    write_output_shard(out_dir, name, samples(), stats)
