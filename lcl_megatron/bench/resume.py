"""`lcl bench resume`: seconds from building the training loader with a saved data position to its
first batch, at 10, 1,000 and 100,000 samples into the stream (flat is the goal).

Shards of image-text pairs with web-size JPEGs (shorter side 240-480 px) are
written to a scratch directory; the loader decodes them to 224 px, 49 image
tokens (ViT-B/32), unpacked batches of 10, one process. The position at each
point is the one the loader saves after that many samples: for 10 and 1,000 it
is taken from the loader itself after producing them; for 100,000 it comes from
walking the sample stream there (reading the tars, decoding nothing), which is
checked to give the loader's own position at 1,000. Timed: building the loader,
`load_state_dict` and the first batch, the tokenizer already loaded and the
shards in the page cache, the median of `--repeats`. Beside it, the replay that
a position without stream state costs (every consumed batch produced again).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from lcl_megatron.config import DataConfig
from lcl_megatron.data.bench import machine_name, sample_photos, web_photo
from lcl_megatron.data.loader import TrainLoader, build_train_loader, stream_position
from lcl_megatron.data.shards import write_shard
from lcl_megatron.errors import UserError
from lcl_megatron.utils import atomic_write_text, write_markdown_section

POINTS = (10, 1_000, 100_000)
REPLAYED = (10, 1_000)  # replaying 100,000 samples takes about 100 times as long as 1,000
BATCH, IMAGE_SIZE, IMAGE_TOKENS, CONTEXT = 10, 224, 49, 128


def write_pairs(root: Path, shards: int, per_shard: int) -> None:
    photos = sample_photos()
    for s in range(shards):
        write_shard(root / f"{s:05d}.tar",
                    ((f"p{s:03d}-{i:05d}", {"jpg": web_photo(s * per_shard + i, photos),
                                            "txt": f"photo {s * per_shard + i}: a scene of leaves and stone".encode()})
                     for i in range(per_shard)))


def new_loader(cfg: DataConfig, tokenizer) -> TrainLoader:
    return build_train_loader(cfg, image_size=IMAGE_SIZE, num_image_tokens=IMAGE_TOKENS, context_length=CONTEXT,
                              micro_batch_size=BATCH, dp_rank=0, dp_size=1, seed=0, tokenizer=tokenizer, num_workers=0)


def walked_position(cfg: DataConfig, tokenizer, samples: int) -> dict:
    """The loader's position after `samples` samples (unpacked, none skipped), found by reading
    the sample stream that far without decoding any sample."""
    loader = new_loader(cfg, tokenizer)
    stream = loader.dataset.samples(0)
    scratch: Counter = Counter()
    for _ in range(samples):
        stream.next(scratch)
    loader.batches_consumed, loader.positions = samples // BATCH, [stream_position(stream)]
    return json.loads(json.dumps(loader.state_dict()))


def loader_position(cfg: DataConfig, tokenizer, samples: int) -> dict:
    loader = new_loader(cfg, tokenizer)
    batches = iter(loader)
    for _ in range(samples // BATCH):
        next(batches)
    return json.loads(json.dumps(loader.state_dict()))  # as a checkpoint holds it


def seconds_to_first_batch(cfg: DataConfig, tokenizer, state: dict) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) from building the loader to its first batch."""
    cpu, wall = time.process_time(), time.perf_counter()
    loader = new_loader(cfg, tokenizer)
    with contextlib.redirect_stderr(io.StringIO()):  # a replayed position warns each time
        loader.load_state_dict(state)
        next(iter(loader))
    return time.process_time() - cpu, time.perf_counter() - wall


def median_seconds(cfg: DataConfig, tokenizer, state: dict, repeats: int) -> tuple[float, float]:
    runs = [seconds_to_first_batch(cfg, tokenizer, state) for _ in range(repeats)]
    return statistics.median(cpu for cpu, _ in runs), statistics.median(wall for _, wall in runs)


def bench_resume(root: Path, shards: int, per_shard: int, shuffle_buffer: int, repeats: int) -> dict:
    from lcl_megatron.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    write_pairs(root, shards, per_shard)
    cfg = DataConfig(path=[str(root)], shuffle_buffer=shuffle_buffer, num_workers=0)
    positions = {n: loader_position(cfg, tokenizer, n) for n in REPLAYED}
    if walked_position(cfg, tokenizer, REPLAYED[-1]) != positions[REPLAYED[-1]]:
        raise RuntimeError("the walked position differs from the loader's own: the benchmark would time another one")
    positions[POINTS[-1]] = walked_position(cfg, tokenizer, POINTS[-1])
    seek = {n: median_seconds(cfg, tokenizer, positions[n], repeats) for n in POINTS}
    replay = {n: seconds_to_first_batch(cfg, tokenizer, {"batches_consumed": n // BATCH}) for n in REPLAYED}
    streams = {n: positions[n]["streams"][0]["samples"]["datasets"][0] for n in POINTS}
    return {"date": datetime.date.today().isoformat(),
            "machine": f"{machine_name()} (load average {os.getloadavg()[0]:.1f})",
            "shards": shards, "samples_per_shard": per_shard, "shuffle_buffer": shuffle_buffer, "repeats": repeats,
            "epoch": {n: s["epoch"] for n, s in streams.items()},
            "buffered": {n: len(s["buffer"]) for n, s in streams.items()}, "seek_s": seek, "replay_s": replay}


def markdown(result: dict) -> str:
    seek, replay = result["seek_s"], result["replay_s"]
    ratio = seek[POINTS[-1]][0] / seek[POINTS[0]][0]
    lines = [
        "## Resume", "",
        f"`lcl bench resume`, {result['date']}, on {result['machine']}, one process, torch {torch.__version__}. "
        f"{result['shards']} shards of {result['samples_per_shard']} image-text pairs with web-size JPEGs "
        f"(shorter side 240-480 px), decoded to 224 px; batches of {BATCH}; shuffle buffer "
        f"{result['shuffle_buffer']}. Seconds from building the loader with a saved position to its first "
        f"batch, CPU time of the process (the machine is shared; wall time beside it), median of "
        f"{result['repeats']}. The buffered samples of a position are read again from their shards "
        f"(not decoded) when the loader seeks to it. Replay: what a position without stream state costs.", "",
        "| samples into the stream | epoch | samples in the shuffle buffer | seek: CPU s (wall s) | "
        "replay: CPU s (wall s) |", "|---|---|---|---|---|",
    ]
    for n in POINTS:
        replayed = f"{replay[n][0]:.2f} ({replay[n][1]:.2f})" if n in replay else "not run"
        lines.append(f"| {n:,} | {result['epoch'][n]} | {result['buffered'][n]} | "
                     f"{seek[n][0]:.2f} ({seek[n][1]:.2f}) | {replayed} |")
    lines += ["", f"- seek at 100,000 / seek at 10, CPU time: {ratio:.2f}x "
                  f"({'flat' if ratio < 2 else 'NOT flat'}; goal: flat, under 2x)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lcl bench resume", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  lcl bench resume --shards 2 --per-shard 100 --repeats 1")
    p.add_argument("--shards", type=int, default=8, help="shards written (default 8)")
    # 1,920 samples an epoch: 100,000 samples falls early in epoch 52, with a full shuffle buffer
    p.add_argument("--per-shard", type=int, default=240, help="image-text pairs per shard (default 240)")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="data.shuffle_buffer (default 1,000)")
    p.add_argument("--repeats", type=int, default=3, help="timings per point, the median kept (default 3)")
    p.add_argument("--write", metavar="BENCHMARKS_MD", help="put the results into this file's '## Resume' section")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if min(args.shards, args.per_shard, args.shuffle_buffer, args.repeats) < 1:
        raise UserError("--shards, --per-shard, --shuffle-buffer and --repeats must be positive")
    for path in filter(None, (args.json,)):
        if Path(path).exists():
            raise UserError(f"'{path}' exists; refusing to overwrite it")
    torch.set_num_threads(1)  # one loader worker is one single-threaded process
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_resume(Path(tmp), args.shards, args.per_shard, args.shuffle_buffer, args.repeats)
    section = markdown(result)
    print(section)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
    if args.write:
        write_markdown_section(Path(args.write), "## Resume", section)
    return 0
