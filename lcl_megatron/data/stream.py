"""Shards -> the endless sample stream of one reader (a data-parallel rank, or a loader worker
within it), with a position that a resumed run seeks to.

Each `data.path` entry is a dataset; with several, every sample is drawn from
dataset i with probability weight_i / sum(weights) ("DIR:WEIGHT", default 1).
Each stream reads its own part of every dataset: per epoch the shard list is
shuffled from (seed, epoch) identically everywhere and dealt out round-robin
(or, with fewer shards than streams, every stream reads all shards and keeps
every n-th sample); each stream reads `data.interleave_shards` of its shards at
once, a sample from each in turn, and a shuffle buffer (`data.shuffle_buffer`,
5,000 as the reference's) mixes them, so that a batch's contrastive negatives
come from many shards. Epochs repeat forever. Every random choice comes from
generators seeded by (seed, epoch, stream), so a run is reproducible.

The position (`state()`) is small and says where every part stands: the epoch,
for each open shard the tar offset of its next sample, the shard and offset of
each sample in the shuffle buffer, and the generators' states. A stream built
with it reads on from there by seeking into the shards: no sample before the
position is read again, so resuming costs the same at any step.
"""

from __future__ import annotations

import glob
import os
import random
import sys
from collections import Counter
from typing import Iterator

from lcl_megatron.config import PIPE_PREFIX, expand_braces
from lcl_megatron.data.embedded import corpus_index, ensure_corpus
from lcl_megatron.data.seeds import derive_seed
from lcl_megatron.data.shards import ShardError, read_samples_at, read_shard_from


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


def rng_state(rng: random.Random) -> list:
    """A generator's state as JSON can hold it."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_from_state(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


def read_sources(sources: list[tuple[str, int]]) -> list[dict]:
    """The samples at (shard, offset) `sources`, in their order, each shard opened once."""
    offsets: dict[str, list[int]] = {}
    for shard, offset in sources:
        offsets.setdefault(shard, []).append(offset)
    found = {shard: read_samples_at(shard, wanted) for shard, wanted in offsets.items()}
    return [found[shard][offset] for shard, offset in sources]


class EpochReader:
    """One epoch of one stream's shards, interleaved and dealt, before the shuffle buffer.

    Open shards are read in passes, a sample from each in turn; a pass that ends
    opens new shards up to `interleave_shards`, and a shard that ends (or turns
    out damaged) leaves the pass at once.
    """

    def __init__(self, stream: SampleStream, epoch: int, state: dict | None = None):
        self.stream = stream
        self.shards, self.deal = stream.epoch_shards(epoch)
        state = state or {"opened": 0, "open": [], "cursor": 0, "read": 0}
        self.opened = state["opened"]  # of self.shards, in order
        self.open = [[index, offset, None] for index, offset in state["open"]]  # shard, next offset, reader
        self.cursor = state["cursor"]  # the open shard that gives the next sample of this pass
        self.read = state["read"]  # samples read so far, those dealt to other streams included

    def state(self) -> dict:
        return {"opened": self.opened, "open": [[index, offset] for index, offset, _ in self.open],
                "cursor": self.cursor, "read": self.read}

    def next(self, stats: Counter) -> tuple[str, int, dict] | None:
        """(shard, offset, sample) of this stream, or None when the epoch is over."""
        stream = self.stream
        while True:
            if self.cursor >= len(self.open):  # a new pass
                self.cursor = 0
                while self.opened < len(self.shards) and len(self.open) < stream.interleave_shards:
                    self.open.append([self.opened, 0, None])
                    self.opened += 1
                if not self.open:
                    return None
            entry = self.open[self.cursor]
            shard = self.shards[entry[0]]
            if entry[2] is None:
                entry[2] = read_shard_from(shard, entry[1])
            try:
                offset, entry[1], sample = next(entry[2])
            except StopIteration:
                self.open.pop(self.cursor)
                continue
            except ShardError as e:
                stats["shards_unreadable"] += 1
                self.open.pop(self.cursor)
                name = os.path.basename(shard)
                if name not in stream.warned:  # once per shard, not once per epoch
                    stream.warned.add(name)
                    print(f"lcl: warning: skipping the rest of a damaged shard: {e}", file=sys.stderr, flush=True)
                continue
            self.cursor += 1
            position, self.read = self.read, self.read + 1
            if not self.deal or position % stream.num_streams == stream.stream:
                return shard, offset, sample


class SampleStream:
    """The endless, deterministic sample sequence of one stream of one dataset, with its position."""

    def __init__(self, shards: list[str], *, stream: int, num_streams: int, seed: int, shuffle_buffer: int,
                 interleave_shards: int = 1, state: dict | None = None):
        self.shards, self.stream, self.num_streams = list(shards), stream, num_streams
        self.seed, self.shuffle_buffer, self.interleave_shards = seed, shuffle_buffer, max(1, interleave_shards)
        self.index = {shard: i for i, shard in enumerate(self.shards)}
        self.warned: set[str] = set()
        if state is None:
            self._start_epoch(0)
        else:
            self.epoch, self.draining, self.yielded = state["epoch"], state["draining"], state["yielded"]
            self.rng = rng_from_state(state["rng"])
            self.reader = EpochReader(self, self.epoch, state["reader"])
            # the buffered samples are read again where they lie: at most `shuffle_buffer` of them
            self.buffer = [(self.shards[i], offset, sample)
                           for (i, offset), sample in zip(state["buffer"], read_sources(
                               [(self.shards[i], offset) for i, offset in state["buffer"]]))]

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.draining, self.yielded = epoch, False, False
        self.rng = random.Random(derive_seed(self.seed, "buffer", epoch, self.stream))
        self.reader = EpochReader(self, epoch)
        self.buffer: list[tuple[str, int, dict]] = []

    def state(self) -> dict:
        return {"epoch": self.epoch, "draining": self.draining, "yielded": self.yielded,
                "rng": rng_state(self.rng), "reader": self.reader.state(),
                "buffer": [[self.index[shard], offset] for shard, offset, _ in self.buffer]}

    def epoch_shards(self, epoch: int) -> tuple[list[str], bool]:
        """(this stream's shards, whether samples must be dealt out too) for `epoch`."""
        order = list(self.shards)
        random.Random(derive_seed(self.seed, "shards", epoch)).shuffle(order)
        if len(order) >= self.num_streams:
            return order[self.stream::self.num_streams], False
        return order, True

    def epoch_samples(self, epoch: int, stats: Counter) -> Iterator[tuple[str, dict]]:
        """(shard name, sample) pairs of one epoch, before the shuffle buffer."""
        reader = EpochReader(self, epoch)
        while (item := reader.next(stats)) is not None:
            yield os.path.basename(item[0]), item[2]

    def next(self, stats: Counter) -> tuple[int, str, int, dict]:
        """The next (epoch, shard, offset, sample), through the shuffle buffer."""
        while True:
            if not self.draining:
                item = self.reader.next(stats)
                if item is not None:
                    self.buffer.append(item)
                    if len(self.buffer) >= self.shuffle_buffer:
                        self.yielded = True
                        return (self.epoch, *self.buffer.pop(self.rng.randrange(len(self.buffer))))
                    continue
                self.rng.shuffle(self.buffer)
                self.buffer.reverse()  # drained from the end, so the shuffled order comes out first
                self.draining = True
            if self.buffer:
                self.yielded = True
                return (self.epoch, *self.buffer.pop())
            if not self.yielded:
                raise RuntimeError(f"data stream {self.stream} found no readable sample in {len(self.shards)} shards")
            self._start_epoch(self.epoch + 1)


class MixedStream:
    """The samples of one stream of every dataset, each drawn from dataset i with probability
    weight_i / sum(weights), with the position of all of them."""

    def __init__(self, datasets: list[tuple[list[str], float]], *, stream: int, num_streams: int, seed: int,
                 shuffle_buffer: int, interleave_shards: int = 1, state: dict | None = None):
        self.weights = [weight for _, weight in datasets]
        self.streams = [SampleStream(shards, stream=stream, num_streams=num_streams,
                                     seed=derive_seed(seed, "dataset", i), shuffle_buffer=shuffle_buffer,
                                     interleave_shards=interleave_shards,
                                     state=state["datasets"][i] if state else None)
                        for i, (shards, _) in enumerate(datasets)]
        self.rng = (rng_from_state(state["rng"]) if state else random.Random(derive_seed(seed, "mix", stream)))

    def state(self) -> dict:
        return {"rng": rng_state(self.rng), "datasets": [s.state() for s in self.streams]}

    def next(self, stats: Counter) -> tuple[int, int, str, int, dict]:
        """(dataset index, epoch, shard, offset, sample)."""
        i = 0 if len(self.streams) == 1 else self.rng.choices(range(len(self.streams)), self.weights)[0]
        return (i, *self.streams[i].next(stats))
