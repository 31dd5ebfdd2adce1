"""The resumable training loader: sample streams -> (packed) rows -> batches of one DP rank.

Each data-parallel rank, and each loader worker within it, is a stream of its
own (stream.py); a stream's rows are packed (packing.py, with `data.packing`)
or padded (samples.py) into batches of the contract in samples.py.
`loader.stats` counts `tokens_real` and `tokens_total` (token utilisation = their
ratio) and the input skipped per reason (bad input is counted, never raised).

The loader's position is the number of batches consumed and, per stream, where
it stands after its last consumed batch: the stream position (stream.py), the
rows being packed and the rows waiting for a batch, each as the shard and
offset of its sample. Those rows are made again from their samples on resume
(at most a few batches' worth), so resuming costs the same at any step and
yields exactly the batches an uninterrupted run would have seen next.
"""

from __future__ import annotations

import os
import random
import sys
from collections import Counter
from typing import Iterator

import torch

from lcl_megatron.config import parse_data_entry
from lcl_megatron.data.packing import RowPacker, collate_packed
from lcl_megatron.data.samples import SKIP_REASONS, SampleSettings, SkipSample, collate, sample_to_row
from lcl_megatron.data.seeds import derive_seed
from lcl_megatron.data.shards import ShardError, read_shard
from lcl_megatron.data.stream import MixedStream, read_sources, resolve_shards

MAX_SKIPPED_IN_A_ROW = 10_000


class SourcedRow(tuple):
    """A row (ids, images) as sample_to_row makes it that also knows its sample: `source` is
    (dataset, epoch, shard index in the dataset, offset), from which the row is made again on resume."""

    source: tuple


def stream_position(samples: MixedStream, skipped_in_a_row: int = 0, rows: list = (),
                    packing: list[list[SourcedRow]] | None = None) -> dict:
    """Where one stream stands between two batches (JSON): its sample stream, the rows waiting
    for a batch and, with packing, the rows being packed, each row as its samples' sources."""
    def sources(row):
        return [list(part.source) for part in row] if packing is not None else list(row.source)

    return {"samples": samples.state(), "skipped_in_a_row": skipped_in_a_row, "rows": [sources(row) for row in rows],
            "packing": [sources(row) for row in packing] if packing is not None else []}


class BatchStream(torch.utils.data.IterableDataset):
    """Batches of one DP rank; with DataLoader workers each worker is its own stream.

    Yields (batch, stats counted since the previous batch, the stream's position
    after this batch) so that counts and positions made in worker processes reach
    the loader. `positions[role]` (set by TrainLoader before iterating) is where
    stream `role` resumes; `first_role` is the stream that gives the first batch, so
    that the DataLoader's worker 0, which it asks first, plays that stream.
    """

    def __init__(self, datasets: list[tuple[list[str], float]], settings: SampleSettings, *,
                 micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int, seed: int,
                 shuffle_buffer: int, tokenizer=None, packing: bool = False, pack_open_rows: int = 8,
                 interleave_shards: int = 1):
        super().__init__()
        self.interleave_shards = interleave_shards
        self.packing, self.pack_open_rows = packing, pack_open_rows
        self.datasets, self.settings, self.micro_batch_size = datasets, settings, micro_batch_size
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, max(1, num_workers)
        self.seed, self.shuffle_buffer, self.tokenizer = seed, shuffle_buffer, tokenizer
        self.shard_index = [{shard: i for i, shard in enumerate(shards)} for shards, _ in datasets]
        self.positions: list[dict | None] = [None] * self.num_workers
        self.first_role = 0

    def samples(self, role: int, state: dict | None = None) -> MixedStream:
        """The sample stream of stream `role` of this rank, from the start or from `state`."""
        return MixedStream(self.datasets, stream=self.dp_rank * self.num_workers + role,
                           num_streams=self.dp_size * self.num_workers, seed=self.seed,
                           shuffle_buffer=self.shuffle_buffer, interleave_shards=self.interleave_shards, state=state)

    def _row(self, source: tuple, sample: dict, tokenizer, stats: Counter) -> SourcedRow:
        """The row of a sample; its random choices depend on the sample's name only."""
        dataset, epoch, shard, _ = source
        name = (dataset, epoch, os.path.basename(self.datasets[dataset][0][shard]), sample["__key__"])
        rng = random.Random(derive_seed(self.seed, "sample", *name))
        crop_rng = random.Random(derive_seed(self.seed, "crop", *name))
        row = SourcedRow(sample_to_row(sample, rng, tokenizer, self.settings, stats, crop_rng))
        row.source = source
        return row

    def _rows_again(self, sources: list[list], tokenizer) -> list[SourcedRow]:
        """The rows of samples at `sources` (SourcedRow.source), made again."""
        samples = read_sources([(self.datasets[dataset][0][shard], offset) for dataset, _, shard, offset in sources])
        return [self._row(tuple(source), sample, tokenizer, Counter()) for source, sample in zip(sources, samples)]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        role = ((info.id if info is not None else 0) + self.first_role) % self.num_workers
        tokenizer = self.tokenizer
        if tokenizer is None:
            from lcl_megatron.tokenizer import get_tokenizer
            tokenizer = get_tokenizer()
        stats: Counter = Counter()
        L, B = self.settings.context_length, self.micro_batch_size
        # the shortest sequence: <start_of_text> + an image run
        packer = RowPacker(L, self.pack_open_rows, self.settings.num_image_tokens + 3) if self.packing else None
        position = self.positions[role]
        samples = self.samples(role, position["samples"] if position else None)
        rows: list = []
        skipped_in_a_row = 0
        if position:
            skipped_in_a_row = position["skipped_in_a_row"]
            if packer is not None:
                for sources in position["packing"]:
                    packer.rows.append(self._rows_again(sources, tokenizer))
                    packer.free.append(L - sum(len(row[0]) for row in packer.rows[-1]))
                rows = [self._rows_again(sources, tokenizer) for sources in position["rows"]]
            else:
                rows = self._rows_again(position["rows"], tokenizer)
        while True:
            while len(rows) >= B:
                batch = (collate_packed if packer is not None else collate)(rows[:B], L, self.settings.image_size)
                rows = rows[B:]
                stats["tokens_real"] += int(batch["attention_mask"].sum())
                stats["tokens_total"] += B * L
                counts = Counter(stats)
                stats.clear()  # the same object keeps counting inside the stream
                yield batch, counts, stream_position(samples, skipped_in_a_row, rows,
                                                     packer.rows if packer is not None else None)
            dataset, epoch, shard, offset, sample = samples.next(stats)
            try:
                row = self._row((dataset, epoch, self.shard_index[dataset][shard], offset), sample, tokenizer, stats)
                rows.extend(packer.add(row) if packer is not None else [row])
                stats["samples"] += 1
                skipped_in_a_row = 0
            except SkipSample as skip:
                stats[str(skip)] += 1
                skipped_in_a_row += 1
                if skipped_in_a_row == MAX_SKIPPED_IN_A_ROW:  # data that is all bad would loop forever
                    raise RuntimeError(f"{skipped_in_a_row} samples in a row were unusable "
                                       f"({dict(stats)}); check data.path") from None


class TrainLoader:
    """Endless iterable of batches of one DP rank, with `stats` and a resumable position.

    After `load_state_dict` a new iteration seeks every stream to its saved
    position and yields exactly the batches an uninterrupted run would have seen
    next. A position saved before streams had one (only `batches_consumed`) is
    reached by producing the consumed batches again.
    """

    def __init__(self, dataset: BatchStream, num_workers: int, pin_memory: bool = False):
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self.stats: Counter = Counter()
        self.batches_consumed = 0
        self.positions: list[dict | None] = [None] * self.dataset.num_workers
        self.replay = 0  # batches to produce again before the first one yielded

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        streams = self.dataset.num_workers
        # every iteration starts from the saved position; without one, from the start
        self.dataset.positions = list(self.positions) if not self.replay else [None] * streams
        self.dataset.first_role = self.batches_consumed % streams if not self.replay else 0
        if self.num_workers > 0:
            # workers fork after the tokenizer may have run here; its thread pool must not be forked
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            source = iter(torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                                      pin_memory=self.pin_memory))
        else:
            source = iter(self.dataset)
            if self.pin_memory:  # page-locked, so that the copy to the GPU runs asynchronously
                source = (({k: v.pin_memory() for k, v in batch.items()}, stats, position)
                          for batch, stats, position in source)
        skip = self.replay
        for batch, stats, position in source:
            if skip > 0:
                skip -= 1
                continue
            self.stats.update(stats)
            self.positions[self.batches_consumed % streams] = position
            self.batches_consumed += 1
            self.replay = 0
            yield batch

    def _shard_counts(self) -> list[int]:
        return [len(shards) for shards, _ in self.dataset.datasets]

    def state_dict(self) -> dict:
        return {"batches_consumed": self.batches_consumed, "streams": list(self.positions),
                "shards": self._shard_counts()}

    def load_state_dict(self, state: dict) -> None:
        self.batches_consumed = int(state["batches_consumed"])
        streams = state.get("streams")
        if streams is not None and len(streams) != self.dataset.num_workers:
            reason = (f"was saved with {len(streams)} loader stream(s) per rank and this loader has "
                      f"{self.dataset.num_workers} (data.num_workers changed), so the stream differs")
            streams = None
        elif streams is not None and state.get("shards") != self._shard_counts():
            reason = (f"was saved for datasets of {state.get('shards')} shards and data.path now holds "
                      f"{self._shard_counts()}, so the stream differs")
            streams = None
        else:
            reason = "predates seekable resume"
        if streams is None and self.batches_consumed > 0:
            print(f"lcl: warning: this data position {reason}; producing its {self.batches_consumed} "
                  f"consumed batches again to reach it", file=sys.stderr, flush=True)
            self.positions, self.replay = [None] * self.dataset.num_workers, self.batches_consumed
        else:
            self.positions, self.replay = list(streams or [None] * self.dataset.num_workers), 0

def resolve_num_workers(num_workers: int, on_gpu: bool, processes_per_node: int) -> int:
    """`data.num_workers`, with -1 (auto): none on a CPU-only machine (the step itself uses the cores),
    else up to 4 per training process from the CPUs this process may use."""
    if num_workers >= 0:
        return num_workers
    if not on_gpu:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus // max(1, processes_per_node) - 1))


def build_train_loader(data_cfg, *, image_size: int, num_image_tokens: int, context_length: int,
                       micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, tokenizer=None,
                       num_workers: int | None = None, pin_memory: bool = False) -> TrainLoader:
    """The training loader of one DP rank for `data_cfg` (a config.DataConfig); `num_workers`
    (resolved, >= 0) defaults to data.num_workers."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    if data_cfg.pack_open_rows < 1:
        raise ValueError(f"data.pack_open_rows must be at least 1, got {data_cfg.pack_open_rows}")
    if context_length < num_image_tokens + 4:
        raise ValueError(f"context_length {context_length} cannot hold an image run of {num_image_tokens + 2} tokens")
    datasets = []
    for entry in data_cfg.path:
        location, weight = parse_data_entry(entry)
        datasets.append((resolve_shards(location), weight))
    workers = max(0, data_cfg.num_workers) if num_workers is None else num_workers
    settings = settings_for(data_cfg, image_size=image_size, num_image_tokens=num_image_tokens,
                            context_length=context_length)
    dataset = BatchStream(datasets, settings, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                          num_workers=workers, seed=seed,
                          shuffle_buffer=max(1, data_cfg.shuffle_buffer), tokenizer=tokenizer,
                          packing=data_cfg.packing, pack_open_rows=data_cfg.pack_open_rows,
                          interleave_shards=data_cfg.interleave_shards)
    return TrainLoader(dataset, workers, pin_memory)


def settings_for(data_cfg, *, image_size: int, num_image_tokens: int, context_length: int) -> SampleSettings:
    return SampleSettings(image_size=image_size, num_image_tokens=num_image_tokens,
                          context_length=context_length, img_first_prob=data_cfg.img_first_prob,
                          min_similarity=data_cfg.min_similarity, max_images=data_cfg.max_images,
                          augment=data_cfg.augment, crop_scale=(data_cfg.crop_scale_min, 1.0))


def check_readable(entry: str, settings: SampleSettings, tokenizer=None,
                   max_samples: int = MAX_SKIPPED_IN_A_ROW) -> None:
    """ValueError unless the data.path `entry` yields a usable sample among its first
    `max_samples`: an empty directory, files that are not tars or tars of garbage fail here,
    in a moment, rather than after the model is built."""
    location, _ = parse_data_entry(entry)
    if location.startswith("embedded:"):
        return
    if tokenizer is None:
        from lcl_megatron.tokenizer import get_tokenizer
        tokenizer = get_tokenizer()
    stats: Counter = Counter()
    shards = resolve_shards(location)
    tried = 0
    for shard in shards:
        try:
            for sample in read_shard(shard):
                try:
                    sample_to_row(sample, random.Random(0), tokenizer, settings, stats)
                    return
                except SkipSample as skip:
                    stats[str(skip)] += 1
                tried += 1
                if tried >= max_samples:
                    break
        except ShardError:
            stats["shards_unreadable"] += 1
        if tried >= max_samples:
            break
    counts = ", ".join(f"{k} {v}" for k, v in sorted(stats.items()) if k in SKIP_REASONS)
    raise ValueError(f"'{location}' holds no usable sample in {len(shards)} shard(s) "
                     f"({counts or 'no samples'}); expected webdataset tars of image-text pairs or documents")


