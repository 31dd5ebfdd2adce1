"""What every `lcl prepare` source shares: image checks, output shards, the parallel driver, the report.

Each input file becomes one output shard `OUT/NAME.tar`; `OUT/reports/NAME.json`
(its counts) is written after it and marks it finished, so a rerun skips it.
`OUT/index.json` lists the samples per shard and `OUT/report.json` totals the
counts: `docs_in = docs_out + docs_dropped_*`, `images_in = images_out + images_dropped_*`.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable


from lcl_megatron.data.images import MAX_IMAGE_PIXELS, BadImage, ImageTooLarge, open_image
from lcl_megatron.data.shards import write_shard
from lcl_megatron.utils import atomic_write

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
REPORTS_DIR = "reports"
INDEX_FILE = "index.json"
REPORT_FILE = "report.json"


def checked_image(data: bytes, stats: Counter, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[bytes, str] | None:
    """Image bytes -> (bytes to store, extension), or None with the reason counted.

    The whole image is decoded, so truncated files are caught here rather than
    in training. RGB JPEG/PNG/WebP files are kept byte for byte; other modes are
    converted to RGB as the loader would (PIL's convert) and stored as PNG.
    """
    try:
        image = open_image(data, max_pixels)
    except ImageTooLarge:
        stats["images_dropped_oversized"] += 1
        return None
    except BadImage:
        stats["images_dropped_corrupt"] += 1
        return None
    if image.mode == "RGB" and image.format in KEPT_FORMATS:
        return data, KEPT_FORMATS[image.format]
    try:
        rgb = image.convert("RGB")
    except Exception:  # PIL raises many types for modes it cannot convert
        stats["images_dropped_corrupt"] += 1
        return None
    stats["images_converted_to_rgb" if image.mode != "RGB" else "images_reencoded"] += 1
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue(), "png"


def store_image(data: bytes | None, files: dict[str, bytes], stats: Counter, max_pixels: int) -> str | None:
    """Add an image (None: missing) to a sample's `files` as imgN.EXT; its member name, or None with
    the reason counted."""
    if data is None:
        stats["images_dropped_missing"] += 1
        return None
    checked = checked_image(data, stats, max_pixels)
    if checked is None:
        return None
    member = f"img{len(files)}.{checked[1]}"
    files[member] = checked[0]
    stats["images_out"] += 1
    return member


def shard_name(path: str, suffixes: tuple[str, ...]) -> str:
    """Input file -> output shard stem: the base name without `suffixes`, in safe characters."""
    base = os.path.basename(path)
    for suffix in suffixes:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9_-]", "_", base)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True)))


def write_output_shard(out_dir: Path, name: str, samples: Iterable[tuple[str, dict[str, bytes]]],
                       stats: Counter) -> None:
    """Write OUT/NAME.tar, then its report OUT/reports/NAME.json (the finished mark)."""
    count = [0]
    atomic_write(out_dir / f"{name}.tar", lambda tmp: count.__setitem__(0, write_shard(tmp, samples)))
    write_json(out_dir / REPORTS_DIR / f"{name}.json", {"samples": count[0], "counts": dict(stats)})


def finished_report(out_dir: Path, name: str) -> dict | None:
    path = out_dir / REPORTS_DIR / f"{name}.json"
    if not (out_dir / f"{name}.tar").is_file() or not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
        return report if isinstance(report.get("counts"), dict) else None
    except (OSError, ValueError):
        return None


def _run_job(job):
    convert, path, name, out_dir = job
    stats: Counter = Counter()
    try:
        convert(path, name, out_dir, stats)
    except Exception as e:  # a bug or an unforeseen input must not stop the other files
        stats["files_failed"] += 1
        print(f"lcl prepare: {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return name, None
    return name, finished_report(out_dir, name)


def run_conversion(inputs: list[str], names: list[str], convert: Callable, out_dir: Path, *,
                   workers: int, progress: bool, summary_title: str) -> dict:
    """Convert every input file not finished yet (in `workers` processes), then write the index and report.

    `convert(path, name, out_dir, stats)` writes one shard with `write_output_shard`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORTS_DIR).mkdir(exist_ok=True)
    todo = [(convert, path, name, out_dir) for path, name in zip(inputs, names) if finished_report(out_dir, name) is None]
    skipped = len(inputs) - len(todo)
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="file", desc=summary_title, disable=not progress or not todo, file=sys.stderr)
    failed = 0
    if workers > 1 and len(todo) > 1:
        with multiprocessing.get_context("fork").Pool(min(workers, len(todo))) as pool:
            for _, report in pool.imap_unordered(_run_job, todo):
                failed += report is None
                bar.update()
    else:
        for job in todo:
            failed += _run_job(job)[1] is None
            bar.update()
    bar.close()

    totals: Counter = Counter()
    index = {}
    for name in names:
        report = finished_report(out_dir, name)
        if report is not None:
            totals.update(report["counts"])
            index[f"{name}.tar"] = {"samples": report["samples"]}
    totals["files_in"] = len(inputs)
    totals["files_failed"] = failed
    totals["files_skipped_finished"] = skipped
    write_json(out_dir / INDEX_FILE, {"shards": index})
    report = {"counts": dict(sorted(totals.items())), "shards": len(index),
              "samples": sum(entry["samples"] for entry in index.values())}
    write_json(out_dir / REPORT_FILE, report)
    return report


def summary_lines(report: dict) -> list[str]:
    counts = report["counts"]
    lines = [f"shards: {report['shards']} written or kept, {report['samples']} documents in them"]
    for group in ("files", "docs", "images"):
        parts = [f"{key[len(group) + 1:]}={value}" for key, value in counts.items() if key.startswith(group + "_")]
        if parts:
            lines.append(f"{group}: " + ", ".join(parts))
    return lines
