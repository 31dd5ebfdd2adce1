"""Shards -> training batches, and the held-out zero-shot set.

Batch contract (what the model consumes):
    images          float32 [N, 3, H, W], normalised; one per `<start_of_img>` in
                    input_ids, in row-major order
    input_ids       int64 [B, L], right-padded with PAD_ID
    attention_mask  bool [B, L], True on real tokens
Every `<start_of_img>` is followed by exactly P `<img_placehold>` and one `<end_of_img>`.

Each `data.path` entry is a dataset; with several, every sample is drawn from
dataset i with probability weight_i / sum(weights) ("DIR:WEIGHT", default 1).
Each data-parallel rank, and each loader worker within it, reads its own
stream of every dataset: per epoch the shard list is shuffled from (seed, epoch) identically
everywhere and dealt out round-robin (or, with fewer shards than streams,
every stream reads all shards and keeps every n-th sample); each stream reads
`data.interleave_shards` of its shards at once, a sample from each in turn, and
a shuffle buffer (`data.shuffle_buffer`, 5,000 as the reference's) mixes them,
so that a batch's contrastive negatives come from many shards. Epochs repeat forever. Every random choice comes from
generators seeded by (seed, epoch, stream) or (seed, epoch, shard, key), so a
run is reproducible and resuming replays it.

With `data.packing`, several samples share a row (packing.py), and batches
also carry `position_ids` and `cu_seqlens`. `loader.stats` counts
`tokens_real` and `tokens_total` (token utilisation = their ratio).

Bad input is skipped and counted in `loader.stats`, never raised.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from lcl_megatron.config import PIPE_PREFIX, expand_braces, parse_data_entry
from lcl_megatron.tokens import PAD_ID
from lcl_megatron.data.documents import Document, Image
from lcl_megatron.data.embedded import CLASS_PROMPTS_FILE, HELDOUT_SHARD, corpus_index, ensure_corpus
from lcl_megatron.data.images import CROP_SCALE, BadImage, load_image
from lcl_megatron.data.packing import RowPacker, collate_packed
from lcl_megatron.data.sequences import (encode_document, encode_pair, parse_mmc4, place_mmc4_images,
                                         select_mmc4_images)
from lcl_megatron.data.shards import ShardError, read_shard

PAIR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_SKIPPED_IN_A_ROW = 10_000
# What `loader.stats` counts of input it could not use; training reports each of them.
SKIP_REASONS = ("skipped_bad_json", "skipped_bad_text", "skipped_no_image", "skipped_unknown_sample",
                "images_missing", "images_corrupt", "shards_unreadable")


def derive_seed(*parts) -> int:
    """A 64-bit seed from any printable parts, identical in every process and run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def resolve_shards(entry: str) -> list[str]:
    """A data.path location (see config.parse_data_entry) -> its shards: sorted paths, or the
    commands of a pipe: location in the order written."""
    if entry.startswith("embedded:"):
        directory = ensure_corpus(entry.split(":", 1)[1])
        return [str(directory / name) for name in sorted(corpus_index(directory)["train"])]
    if entry.startswith(PIPE_PREFIX):
        return expand_braces(entry)
    shards = []
    for location in expand_braces(entry):
        if os.path.isdir(location):
            shards += glob.glob(os.path.join(location, "*.tar"))
        else:
            shards += glob.glob(location)
    shards = sorted(set(shards))
    if not shards:
        raise ValueError(f"data path '{entry}' holds no .tar shards")
    return shards


@dataclass
class SampleSettings:
    image_size: int
    num_image_tokens: int
    context_length: int
    img_first_prob: float = 0.5
    min_similarity: float = 0.24
    max_images: int = 6
    augment: bool = False  # training crops (images.py) instead of the evaluation transform
    crop_scale: tuple = CROP_SCALE


class _Skip(Exception):
    """A sample that cannot be used; the message is the counter's name."""


def _decode(sample: dict, name: str, settings: SampleSettings, stats: Counter, crop_rng: random.Random | None):
    data = sample.get(name)
    if data is None:
        stats["images_missing"] += 1
        return None
    try:
        return load_image(data, settings.image_size, crop_rng, settings.crop_scale)
    except BadImage:
        stats["images_corrupt"] += 1
        return None


def sample_to_row(sample: dict, rng: random.Random, tokenizer, settings: SampleSettings,
                  stats: Counter, crop_rng: random.Random | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """One shard sample -> (ids, image tensors); raises _Skip(reason) for unusable samples.

    The kind is told by what the sample holds: a document (`json` with "items"),
    an MMC4 document (`json` with "text_list"/"image_info" and image files named
    by `image_name`), or an image-text pair (`txt` plus jpg/jpeg/png/webp; a
    `json` beside them is the pair's metadata, as img2dataset writes url,
    caption, width, height and status for every LAION sample). With
    `settings.augment` the images are cropped at random from `crop_rng` (a
    generator of their own, so that the crops do not change the text's random choices).
    """
    crop_rng = crop_rng if settings.augment else None
    P, L = settings.num_image_tokens, settings.context_length
    image_ext = next((ext for ext in PAIR_IMAGE_EXTENSIONS if ext in sample), None)
    obj = None
    if "json" in sample:
        try:
            obj = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            obj = None
    is_document = isinstance(obj, dict) and ("items" in obj or "text_list" in obj)
    if "json" in sample and (is_document or "txt" not in sample or image_ext is None):
        try:
            if obj is None:
                raise ValueError("not JSON")
            if isinstance(obj, dict) and "text_list" in obj:
                sentences, matches = parse_mmc4(obj)
                selected = select_mmc4_images(matches, rng, min_similarity=settings.min_similarity,
                                              max_images=settings.max_images)
                doc = None
            else:
                doc = Document.from_json_obj(obj)
        except ValueError:
            raise _Skip("skipped_bad_json") from None
        tensors: dict[str, torch.Tensor] = {}
        if doc is None:  # MMC4: images that fail to load are dropped before placement, as the reference does
            loaded = []
            for index, name in selected:
                tensor = _decode(sample, name, settings, stats, crop_rng)
                if tensor is not None:
                    tensors[name] = tensor
                    loaded.append((index, name))
            doc = place_mmc4_images(sentences, loaded, rng, settings.img_first_prob)
        else:
            for image in doc.images:
                if image.name not in tensors:
                    tensor = _decode(sample, image.name, settings, stats, crop_rng)
                    if tensor is not None:
                        tensors[image.name] = tensor
            doc = Document([item for item in doc.items if not isinstance(item, Image) or item.name in tensors])
        encoded = encode_document(doc, tokenizer.encode_batch, num_image_tokens=P, context_length=L)
        if encoded is None:
            raise _Skip("skipped_no_image")
        ids, images = encoded
        return ids, [tensors[image.name] for image in images]
    if "txt" in sample and image_ext is not None:
        try:
            text = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise _Skip("skipped_bad_text") from None
        tensor = _decode(sample, image_ext, settings, stats, crop_rng)
        if tensor is None:
            raise _Skip("skipped_no_image")
        ids = encode_pair(tokenizer.encode(text), rng, num_image_tokens=P, context_length=L,
                          img_first_prob=settings.img_first_prob)
        return ids, [tensor]
    raise _Skip("skipped_unknown_sample")


def collate(rows: list[tuple[list[int], list[torch.Tensor]]], context_length: int,
            image_size: int) -> dict[str, torch.Tensor]:
    input_ids = torch.full((len(rows), context_length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), context_length), dtype=torch.bool)
    images = []
    for b, (ids, row_images) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, :len(ids)] = True
        images.extend(row_images)
    stacked = torch.stack(images) if images else torch.zeros((0, 3, image_size, image_size))
    return {"images": stacked, "input_ids": input_ids, "attention_mask": attention_mask}


class SampleStream:
    """The endless, deterministic sample sequence of one stream (DP rank x worker)."""

    def __init__(self, shards: list[str], *, stream: int, num_streams: int, seed: int, shuffle_buffer: int,
                 interleave_shards: int = 1):
        self.shards, self.stream, self.num_streams = list(shards), stream, num_streams
        self.seed, self.shuffle_buffer, self.interleave_shards = seed, shuffle_buffer, max(1, interleave_shards)
        self.warned: set[str] = set()

    def epoch_shards(self, epoch: int) -> tuple[list[str], bool]:
        """(this stream's shards, whether samples must be dealt out too) for `epoch`."""
        order = list(self.shards)
        random.Random(derive_seed(self.seed, "shards", epoch)).shuffle(order)
        if len(order) >= self.num_streams:
            return order[self.stream::self.num_streams], False
        return order, True

    def epoch_samples(self, epoch: int, stats: Counter) -> Iterator[tuple[str, dict]]:
        """(shard name, sample) pairs of one epoch, before the shuffle buffer."""
        shards, deal = self.epoch_shards(epoch)
        position = 0
        for shard, sample in self._interleaved(shards, stats):
            if not deal or position % self.num_streams == self.stream:
                yield shard, sample
            position += 1

    def _interleaved(self, shards: list[str], stats: Counter) -> Iterator[tuple[str, dict]]:
        """Samples of `interleave_shards` shards at a time, one from each in turn (a new shard
        opens as one ends), so that a shuffle buffer smaller than a shard still mixes shards."""
        pending = list(shards)
        open_: list[tuple[str, Iterator[dict]]] = []
        while pending or open_:
            while pending and len(open_) < self.interleave_shards:
                shard = pending.pop(0)
                open_.append((os.path.basename(shard), read_shard(shard)))
            for entry in list(open_):
                try:
                    yield entry[0], next(entry[1])
                except StopIteration:
                    open_.remove(entry)
                except ShardError as e:
                    stats["shards_unreadable"] += 1
                    open_.remove(entry)
                    if entry[0] not in self.warned:  # once per shard, not once per epoch
                        self.warned.add(entry[0])
                        print(f"lcl: warning: skipping the rest of a damaged shard: {e}", file=sys.stderr, flush=True)

    def __call__(self, stats: Counter) -> Iterator[tuple[int, str, dict]]:
        """(epoch, shard name, sample) forever, through a shuffle buffer."""
        for epoch in itertools.count():
            rng = random.Random(derive_seed(self.seed, "buffer", epoch, self.stream))
            buffer: list = []
            yielded = False
            for shard, sample in self.epoch_samples(epoch, stats):
                buffer.append((epoch, shard, sample))
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
                    yielded = True
            rng.shuffle(buffer)
            yielded = yielded or bool(buffer)
            yield from buffer
            if not yielded:
                raise RuntimeError(f"data stream {self.stream} found no readable sample in {len(self.shards)} shards")


class BatchStream(torch.utils.data.IterableDataset):
    """Batches of one DP rank; with DataLoader workers each worker is its own stream.

    Yields (batch, stats counted since the previous batch) so that counts made
    in worker processes reach the loader.
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

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        stream_id = self.dp_rank * self.num_workers + worker
        tokenizer = self.tokenizer
        if tokenizer is None:
            from lcl_megatron.tokenizer import get_tokenizer
            tokenizer = get_tokenizer()
        stats: Counter = Counter()
        L, B = self.settings.context_length, self.micro_batch_size
        # the shortest sequence: <start_of_text> + an image run
        packer = RowPacker(L, self.pack_open_rows, self.settings.num_image_tokens + 3) if self.packing else None
        rows = []
        skipped_in_a_row = 0
        for dataset, (epoch, shard, sample) in self._mixed_samples(stream_id, stats):
            rng = random.Random(derive_seed(self.seed, "sample", dataset, epoch, shard, sample["__key__"]))
            crop_rng = random.Random(derive_seed(self.seed, "crop", dataset, epoch, shard, sample["__key__"]))
            try:
                row = sample_to_row(sample, rng, tokenizer, self.settings, stats, crop_rng)
                rows.extend(packer.add(row) if packer is not None else [row])
                stats["samples"] += 1
                skipped_in_a_row = 0
            except _Skip as skip:
                stats[str(skip)] += 1
                skipped_in_a_row += 1
                if skipped_in_a_row == MAX_SKIPPED_IN_A_ROW:  # data that is all bad would loop forever
                    raise RuntimeError(f"{skipped_in_a_row} samples in a row were unusable "
                                       f"({dict(stats)}); check data.path") from None
                continue
            while len(rows) >= B:
                batch = (collate_packed if packer is not None else collate)(rows[:B], L, self.settings.image_size)
                rows = rows[B:]
                stats["tokens_real"] += int(batch["attention_mask"].sum())
                stats["tokens_total"] += B * L
                counts = Counter(stats)
                stats.clear()  # the same object keeps counting inside the stream
                yield batch, counts


    def _mixed_samples(self, stream_id: int, stats: Counter):
        """(dataset index, (epoch, shard, sample)) forever, datasets drawn by weight."""
        streams = [SampleStream(shards, stream=stream_id, num_streams=self.dp_size * self.num_workers,
                                seed=derive_seed(self.seed, "dataset", i), shuffle_buffer=self.shuffle_buffer,
                                interleave_shards=self.interleave_shards)(stats)
                   for i, (shards, _) in enumerate(self.datasets)]
        if len(streams) == 1:
            for item in streams[0]:
                yield 0, item
        rng = random.Random(derive_seed(self.seed, "mix", stream_id))
        indices, weights = range(len(streams)), [weight for _, weight in self.datasets]
        while True:
            i = rng.choices(indices, weights)[0]
            yield i, next(streams[i])


class TrainLoader:
    """Endless iterable of batches of one DP rank, with `stats` and a resumable position.

    The position is the number of batches consumed. A new iteration regenerates
    the stream from the start and drops that many batches first, so after
    `load_state_dict` it yields exactly the batches an uninterrupted run would
    have seen next.
    """

    def __init__(self, dataset: BatchStream, num_workers: int, pin_memory: bool = False):
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self.stats: Counter = Counter()
        self.batches_consumed = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.num_workers > 0:
            # workers fork after the tokenizer may have run here; its thread pool must not be forked
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            source = iter(torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                                      pin_memory=self.pin_memory))
        else:
            source = iter(self.dataset)
            if self.pin_memory:  # page-locked, so that the copy to the GPU runs asynchronously
                source = (({k: v.pin_memory() for k, v in batch.items()}, stats) for batch, stats in source)
        skip = self.batches_consumed
        for batch, stats in source:
            if skip > 0:
                skip -= 1
                continue
            self.stats.update(stats)
            self.batches_consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches_consumed": self.batches_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.batches_consumed = int(state["batches_consumed"])


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
                except _Skip as skip:
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


def load_zeroshot_set(entry: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A held-out classification set -> (images [N,3,H,W], labels [N], one prompt per class).

    `entry` is "embedded:NAME" or a directory holding shards of `png`+`cls`
    samples and `class_prompts.json` (a JSON list of strings, class i first... last).
    """
    if entry.startswith("embedded:"):
        directory = ensure_corpus(entry.split(":", 1)[1])
        shards = [directory / HELDOUT_SHARD]
    else:
        directory = Path(entry)
        shards = sorted(directory.glob("*.tar"))
    prompts = json.loads((directory / CLASS_PROMPTS_FILE).read_text())
    images, labels = [], []
    for shard in shards:
        for sample in read_shard(shard):
            image_ext = next(ext for ext in PAIR_IMAGE_EXTENSIONS if ext in sample)
            images.append(load_image(sample[image_ext], image_size))
            labels.append(int(sample["cls"].decode()))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), prompts
