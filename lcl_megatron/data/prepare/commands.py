"""`lcl prepare mmc4|obelics`: convert a public source into document shards that `data.path` reads.

LAION-style img2dataset shards (KEY.jpg + KEY.txt) need no conversion: name
their directory in `data.path`.
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
from collections import Counter
from pathlib import Path

from lcl_megatron.data.prepare.conversion import REPORT_FILE, run_conversion, shard_name, summary_lines, write_json
from lcl_megatron.data.images import MAX_IMAGE_PIXELS
from lcl_megatron.errors import UserError


class UsageError(UserError, ValueError):
    """A bad argument: one line, exit code 2."""


def _inputs(pattern: str, suffixes: tuple[str, ...], what: str) -> tuple[list[str], list[str]]:
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p) and p.endswith(suffixes))
    if not paths:
        raise UsageError(f"no {what} files ({' or '.join(suffixes)}) match '{pattern}'")
    names = [shard_name(p, suffixes) for p in paths]
    seen: dict[str, str] = {}
    for path, name in zip(paths, names):
        if name in seen:
            raise UsageError(f"'{seen[name]}' and '{path}' would both become shard '{name}.tar'; rename one")
        seen[name] = path
    return paths, names


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (created; finished shards are kept on a rerun)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                        help="processes converting input files in parallel")
    parser.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help="images with more pixels are dropped undecoded (decompression bombs)")
    parser.add_argument("--min-images", type=int, default=1, help="drop documents with fewer usable images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _finish(report: dict, out: Path, extra: Counter) -> int:
    if extra:
        counts = Counter(report["counts"])
        counts.update(extra)
        report["counts"] = dict(sorted(counts.items()))
        write_json(out / REPORT_FILE, report)
    for line in summary_lines(report):
        print(line)
    print(f"report: {out / REPORT_FILE}")
    return 1 if report["counts"].get("files_failed") else 0


def _check(args) -> None:
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.max_pixels < 1:
        raise UsageError("--max-pixels must be positive")
    if args.min_images < 1:
        raise UsageError("--min-images must be at least 1")


def mmc4_main(argv: list[str]) -> int:
    from lcl_megatron.data.prepare import mmc4 as convert_mmc4

    parser = argparse.ArgumentParser(prog="lcl prepare mmc4", description=convert_mmc4.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  lcl prepare mmc4 --docs 'mmc4/docs_*.jsonl' --images mmc4/images --out data/mmc4")
    parser.add_argument("--docs", required=True, help="glob of MMC4 .jsonl or .jsonl.zip files")
    parser.add_argument("--images", required=True, help="directory of downloaded images (flat or per-shard folders)")
    parser.add_argument("--form", choices=("mmc4", "items"), default="mmc4",
                        help="mmc4: the loader draws the reference's random choices every epoch; items: drawn once here")
    parser.add_argument("--min-similarity", type=float, default=0.24, help="drop images matched below this")
    parser.add_argument("--max-images", type=int, default=6, help="items form: images kept per document")
    parser.add_argument("--all-images-per-sentence", action="store_true",
                        help="items form: keep every image matched to a sentence, not one at random")
    parser.add_argument("--img-first-prob", type=float, default=0.5,
                        help="items form: probability that an image goes before its sentence")
    parser.add_argument("--seed", type=int, default=0, help="items form: seed of the random choices")
    _common_flags(parser)
    args = parser.parse_args(argv)
    _check(args)
    if not os.path.isdir(args.images):
        raise UsageError(f"--images '{args.images}' is not a directory")
    if args.max_images < 1:
        raise UsageError("--max-images must be at least 1")
    if not 0 <= args.img_first_prob <= 1:
        raise UsageError("--img-first-prob must be in [0, 1]")
    paths, names = _inputs(args.docs, convert_mmc4.INPUT_SUFFIXES, "MMC4 docs")
    opts = convert_mmc4.Mmc4Options(
        images=args.images, form=args.form, min_similarity=args.min_similarity,
        one_image_per_sentence=not args.all_images_per_sentence, max_images=args.max_images,
        img_first_prob=args.img_first_prob, min_images=args.min_images, max_pixels=args.max_pixels, seed=args.seed)
    out = Path(args.out)
    report = run_conversion(paths, names, functools.partial(convert_mmc4.convert_file, opts=opts), out,
                            workers=args.workers, progress=not args.no_progress, summary_title="mmc4")
    return _finish(report, out, Counter())


def obelics_main(argv: list[str]) -> int:
    from lcl_megatron.data.prepare import obelics as convert_obelics

    parser = argparse.ArgumentParser(prog="lcl prepare obelics", description=convert_obelics.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  lcl prepare obelics --parquet 'obelics/*.parquet' --images obelics/images --out data/obelics")
    parser.add_argument("--parquet", required=True, help="glob of OBELICS .parquet files")
    parser.add_argument("--images", required=True,
                        help="directory of images named by URL hash, or img2dataset tars (a directory of them or a glob)")
    parser.add_argument("--url-hash", default="sha256", choices=("sha256", "sha1", "md5"),
                        help="hash naming the files of an image directory")
    _common_flags(parser)
    args = parser.parse_args(argv)
    _check(args)
    if not os.path.isdir(args.images) and not glob.glob(args.images):
        raise UsageError(f"--images '{args.images}' is neither a directory nor a glob of tars")
    paths, names = _inputs(args.parquet, convert_obelics.INPUT_SUFFIXES, "OBELICS parquet")
    try:
        import pyarrow  # noqa: F401  (a clear message beats a failure in every worker)
    except ImportError:
        raise UsageError("needs pyarrow (pip install pyarrow)") from None
    store_counts: Counter = Counter()
    convert_obelics.clear_stores()  # a store's files may have changed since
    convert_obelics.open_store(args.images, args.url_hash, store_counts)  # indexed once, inherited by workers
    opts = convert_obelics.ObelicsOptions(min_images=args.min_images, max_pixels=args.max_pixels)
    out = Path(args.out)
    convert = functools.partial(convert_obelics.convert_file, images=args.images, hash_name=args.url_hash, opts=opts)
    report = run_conversion(paths, names, convert, out, workers=args.workers, progress=not args.no_progress,
                            summary_title="obelics")
    return _finish(report, out, store_counts)
