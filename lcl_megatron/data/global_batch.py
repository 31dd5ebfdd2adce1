"""`data.split: samples`: every data-parallel rank reads the same global batches and keeps its rows.

The global batch is then the same whatever the layout, which is what
layout-equivalence checks need (and what Megatron-LM's batch sampler gives).
Each rank decodes the whole global batch, so at scale `data.split: shards`
(each rank reads its own shards) is the default.
"""

from __future__ import annotations

import os

import torch

from lcl_megatron import tokens


def slice_batch(batch: dict, rank: int, size: int) -> dict:
    """Rows [rank * B/size, (rank + 1) * B/size) of a batch, with their images."""
    rows = batch["input_ids"].shape[0] // size
    lo, hi = rank * rows, (rank + 1) * rows
    images_per_row = (batch["input_ids"] == tokens.SOI_ID).sum(dim=1)
    first = int(images_per_row[:lo].sum())
    last = first + int(images_per_row[lo:hi].sum())
    out = {key: value[lo:hi] for key, value in batch.items() if key not in ("images", "cu_seqlens")}
    out["images"] = batch["images"][first:last]
    if "cu_seqlens" in batch:  # packed: every row end is a boundary, so the slice's are those in [lo*L, hi*L]
        length = batch["input_ids"].shape[1]
        cu = batch["cu_seqlens"]
        out["cu_seqlens"] = cu[(cu >= lo * length) & (cu <= hi * length)] - lo * length
    return out


class GlobalBatchSlicer:
    """Wraps a loader of global batches (built for one rank of one) into this rank's slices."""

    def __init__(self, loader, rank: int, size: int):
        self.loader, self.rank, self.size = loader, rank, size

    def __iter__(self):
        for batch in self.loader:
            yield slice_batch(batch, self.rank, self.size)

    @property
    def stats(self):
        return self.loader.stats

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def build_loader(cfg, dp_rank: int, dp_size: int):
    """The training loader of DP rank `dp_rank` of `dp_size` for a run config, by its data.split;
    on a GPU machine with loader processes (data.num_workers=-1: automatic) and pinned batches."""
    from lcl_megatron.data.loader import build_train_loader, resolve_num_workers

    v = cfg.model.vision
    by_samples = cfg.data.split == "samples"
    on_gpu = torch.cuda.is_available()
    workers = resolve_num_workers(cfg.data.num_workers, on_gpu, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    loader = build_train_loader(cfg.data, image_size=v.image_size, num_image_tokens=v.num_patches,
                                context_length=cfg.model.text.context_length,
                                micro_batch_size=cfg.train.micro_batch_size * (dp_size if by_samples else 1),
                                dp_rank=0 if by_samples else dp_rank, dp_size=1 if by_samples else dp_size,
                                seed=cfg.train.seed, num_workers=workers, pin_memory=on_gpu)
    return GlobalBatchSlicer(loader, dp_rank, dp_size) if by_samples else loader
