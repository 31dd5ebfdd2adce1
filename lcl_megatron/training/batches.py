"""Where each rank's micro-batches come from.

As in Megatron-LM, one rank of each tensor-parallel group reads and decodes
the data and the others receive its batches over the group (all tensor-parallel
ranks train on the same rows); decoding a batch costs far more host time than
sending it. Pipeline stages after the first receive their inputs from the
previous stage, so they read nothing at all: the last stage gets placeholder
labels (its loss takes the token ids that travel with the activations).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

# Integer-valued keys of a batch, in the order they are sent; `images` is float.
_INDEX_KEYS = ("input_ids", "attention_mask", "position_ids", "cu_seqlens")
_HEADER = 8  # images N, C, H, W; rows B, L; packed (0/1); len(cu_seqlens)


def reads_data(tp_rank: int, pp_rank: int) -> bool:
    """Whether this rank reads the data stream (and owns its position in checkpoints)."""
    return tp_rank == 0 and pp_rank == 0


class TensorParallelBatches:
    """The batches of tensor-parallel rank 0 on every rank of its group, on the training device.

    `source` is the loader's iterator on rank 0 of the group and None elsewhere.
    A fixed-size header carries the shapes, then each tensor is broadcast.
    """

    def __init__(self, source, group, device, dtype=torch.float32):
        self.source, self.group, self.device = source, group, torch.device(device)
        self.src = dist.get_global_rank(group, 0)
        self.image_dtype = dtype

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        header = torch.zeros(_HEADER, dtype=torch.long, device=self.device)
        if self.source is not None:
            batch = {key: value.to(self.device, non_blocking=True) for key, value in next(self.source).items()}
            packed = "cu_seqlens" in batch
            header.copy_(torch.tensor([*batch["images"].shape, *batch["input_ids"].shape, int(packed),
                                       batch["cu_seqlens"].numel() if packed else 0]))
        dist.broadcast(header, self.src, group=self.group)
        n, c, h, w, rows, length, packed, cuts = header.tolist()
        if self.source is None:
            batch = {"images": torch.empty(n, c, h, w, dtype=self.image_dtype, device=self.device),
                     "input_ids": torch.empty(rows, length, dtype=torch.long, device=self.device),
                     "attention_mask": torch.empty(rows, length, dtype=torch.bool, device=self.device)}
            if packed:
                batch["position_ids"] = torch.empty(rows, length, dtype=torch.long, device=self.device)
                batch["cu_seqlens"] = torch.empty(cuts, dtype=torch.int32, device=self.device)
        for key in ("images", *_INDEX_KEYS):
            if key in batch:
                dist.broadcast(batch[key], self.src, group=self.group)
        return batch


def placeholder_labels():
    """What the last pipeline stage loads: DeepSpeed takes only its labels, and ours are unused."""
    while True:
        yield (), torch.zeros(1)


class TimedBatches:
    """Micro-batches, with the seconds spent waiting for them since `waited` was last reset."""

    def __init__(self, source):
        self.source, self.waited = source, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.source)
        finally:
            self.waited += time.perf_counter() - start


def micro_batch_source(loader, engine, reader: bool):
    """This rank's micro-batches: read from `loader` (by the `reads_data` rank), received from its
    tensor-parallel group's reader, or placeholders on pipeline stages after the first."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_rank() > 0:
        return placeholder_labels()
    source = iter(loader) if reader else None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return source
    return TensorParallelBatches(source, parallel_state.get_tensor_model_parallel_group(), engine.device)
