"""OBELICS parquet rows + downloaded images -> document shards (ordered items).

A row holds aligned lists `images` and `texts`: at each position exactly one
is non-null (an image URL or a paragraph). Images are found by URL in one of
two stores:
- a directory where each image file is named by a hash of its URL
  (`HASH.EXT` or `HASH[:2]/HASH.EXT`; sha256 by default), or
- img2dataset webdataset tars (`KEY.jpg` beside `KEY.json` holding "url"),
  indexed once by URL; the index holds tar offsets, never image bytes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lcl_megatron.data.prepare.conversion import store_image, write_output_shard
from lcl_megatron.data.documents import Document, Image, Text
from lcl_megatron.data.images import MAX_IMAGE_PIXELS
from lcl_megatron.data.shards import split_member_name

INPUT_SUFFIXES = (".parquet",)
STORE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
_TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class HashStore:
    """Images named by the hex digest of their URL."""

    def __init__(self, directory: str, hash_name: str = "sha256"):
        self.directory, self.hash_name = directory, hash_name

    def get(self, url: str) -> bytes | None:
        digest = hashlib.new(self.hash_name, url.encode("utf-8")).hexdigest()
        for folder in (self.directory, os.path.join(self.directory, digest[:2])):
            for ext in STORE_EXTENSIONS:
                try:
                    with open(os.path.join(folder, f"{digest}.{ext}"), "rb") as f:
                        return f.read()
                except FileNotFoundError:
                    continue
                except OSError:
                    return None
        return None


class TarStore:
    """img2dataset tars joined by URL: url -> (tar, data offset, size)."""

    def __init__(self, tars: list[str], stats: Counter):
        self.index: dict[str, tuple[str, int, int]] = {}
        for tar_path in tars:
            self._index_tar(tar_path, stats)

    def _index_tar(self, tar_path: str, stats: Counter) -> None:
        pending: dict[str, dict] = {}  # key -> {"url": ..., "image": (offset, size)}
        try:
            with tarfile.open(tar_path, "r:") as tar:
                for member in tar:
                    parts = split_member_name(member.name) if member.isfile() else None
                    if parts is None:
                        continue
                    key, ext = parts
                    entry = pending.setdefault(key, {})
                    if ext == "json":
                        try:
                            entry["url"] = json.loads(tar.extractfile(member).read()).get("url")
                        except (ValueError, AttributeError):
                            pass
                    elif ext.lower() in _TAR_IMAGE_EXTENSIONS:
                        entry["image"] = (member.offset_data, member.size)
        except (tarfile.TarError, OSError, EOFError):
            stats["image_tars_truncated"] += 1
        for entry in pending.values():
            if isinstance(entry.get("url"), str) and "image" in entry:
                self.index[entry["url"]] = (tar_path, *entry["image"])

    def get(self, url: str) -> bytes | None:
        found = self.index.get(url)
        if found is None:
            return None
        path, offset, size = found
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError:
            return None
        return data if len(data) == size else None


_STORES: dict = {}  # built once in the parent process; forked workers inherit it


def clear_stores() -> None:
    _STORES.clear()


def open_store(images: str, hash_name: str, stats: Counter):
    """`--images`: a directory of tars, a tar glob, or a hash-named image directory."""
    key = (images, hash_name)
    if key not in _STORES:
        if os.path.isdir(images):
            tars = sorted(glob.glob(os.path.join(images, "*.tar")))
            _STORES[key] = TarStore(tars, stats) if tars else HashStore(images, hash_name)
        else:
            _STORES[key] = TarStore(sorted(glob.glob(images)), stats)
    return _STORES[key]


@dataclass(frozen=True)
class ObelicsOptions:
    min_images: int = 1
    max_pixels: int = MAX_IMAGE_PIXELS


def convert_row(images, texts, store, opts: ObelicsOptions, stats: Counter) -> dict[str, bytes] | None:
    """One row's aligned lists -> the files of its output sample, or None (reason counted)."""
    if not isinstance(images, list) or not isinstance(texts, list) or len(images) != len(texts):
        stats["docs_dropped_malformed"] += 1
        return None
    if any((url is None) == (text is None) for url, text in zip(images, texts)):
        stats["docs_dropped_malformed"] += 1
        stats["images_in"] += sum(url is not None for url in images)
        stats["images_dropped_malformed_doc"] += sum(url is not None for url in images)
        return None
    items: list = []
    files: dict[str, bytes] = {}
    for url, text in zip(images, texts):
        if text is not None:
            if isinstance(text, str) and text.strip():
                items.append(Text(text))
            continue
        stats["images_in"] += 1
        member = store_image(store.get(url) if isinstance(url, str) else None, files, stats, opts.max_pixels)
        if member is not None:
            items.append(Image(member))
    if len(files) < max(1, opts.min_images):
        stats["docs_dropped_no_usable_image"] += 1
        stats["images_out"] -= len(files)
        stats["images_dropped_doc_without_enough_images"] += len(files)
        return None
    return {"json": Document(items).to_json().encode(), **files}


def convert_file(path: str, name: str, out_dir: Path, stats: Counter, *, images: str, hash_name: str,
                 opts: ObelicsOptions) -> None:
    """One parquet file -> OUT/NAME.tar; a damaged row group is counted and the rest kept."""
    import pyarrow.parquet as pq

    store = open_store(images, hash_name, stats)

    def samples():
        try:
            parquet = pq.ParquetFile(path)
        except Exception:  # pyarrow raises ArrowInvalid/OSError for missing or truncated files
            stats["files_unreadable"] += 1
            return
        columns = parquet.schema_arrow.names
        if "images" not in columns or "texts" not in columns:
            stats["files_unreadable"] += 1
            return
        row = 0
        for group in range(parquet.num_row_groups):
            try:
                table = parquet.read_row_group(group, columns=["images", "texts"])
            except Exception:
                stats["files_truncated"] += 1
                row += parquet.metadata.row_group(group).num_rows
                stats["docs_in"] += parquet.metadata.row_group(group).num_rows
                stats["docs_dropped_unreadable"] += parquet.metadata.row_group(group).num_rows
                continue
            for images_list, texts_list in zip(table.column("images").to_pylist(), table.column("texts").to_pylist()):
                stats["docs_in"] += 1
                files = convert_row(images_list, texts_list, store, opts, stats)
                if files is not None:
                    stats["docs_out"] += 1
                    yield f"r{row:08d}", files
                row += 1

    write_output_shard(out_dir, name, samples(), stats)
