"""Several documents or pairs per row: first-fit packing and the packed batch.

A packed batch adds to the batch contract (samples.py):
    position_ids  int64 [B, L]: 0, 1, ... restarting at every document; the
                  padding after a row's last document counts 0, 1, ... too
    cu_seqlens    int32 [S + 1]: segment boundaries over the B x L tokens
                  flattened row-major (flash-attn's varlen convention): 0, the
                  end of each document in order, the end of each row's padding
                  (so every multiple of L is a boundary), ending at B x L
Attention stays within a segment; a document's first token has position 0.
"""

from __future__ import annotations

import torch

from lcl_megatron.tokens import PAD_ID

Sequence = tuple[list[int], list[torch.Tensor]]  # ids and their images, as sample_to_row returns


class RowPacker:
    """First-fit packing with at most `open_rows` rows being filled at a time.

    A sequence goes into the first open row with room for it; when none has
    room, the oldest open row is closed and a new one opened. Rows whose free
    space is below `min_length` (no sequence can fit) close at once. The
    result depends only on the order of the sequences.
    """

    def __init__(self, context_length: int, open_rows: int, min_length: int):
        self.context_length, self.open_rows, self.min_length = context_length, open_rows, min_length
        self.rows: list[list[Sequence]] = []
        self.free: list[int] = []

    def add(self, sequence: Sequence) -> list[list[Sequence]]:
        """Place one sequence (at most `context_length` ids); return the rows closed by it."""
        length = len(sequence[0])
        closed = []
        slot = next((i for i, free in enumerate(self.free) if free >= length), None)
        if slot is None:
            if len(self.rows) == self.open_rows:
                closed.append(self._close(0))
            self.rows.append([])
            self.free.append(self.context_length)
            slot = len(self.rows) - 1
        self.rows[slot].append(sequence)
        self.free[slot] -= length
        if self.free[slot] < self.min_length:
            closed.append(self._close(slot))
        return closed

    def _close(self, index: int) -> list[Sequence]:
        self.free.pop(index)
        return self.rows.pop(index)


def collate_packed(rows: list[list[Sequence]], context_length: int, image_size: int) -> dict[str, torch.Tensor]:
    """Packed rows -> the batch contract plus position_ids and cu_seqlens (module docstring)."""
    L = context_length
    input_ids = torch.full((len(rows), L), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), L), dtype=torch.bool)
    position_ids = torch.zeros((len(rows), L), dtype=torch.long)
    bounds = [0]
    images = []
    for b, row in enumerate(rows):
        start = 0
        for ids, row_images in row:
            end = start + len(ids)
            input_ids[b, start:end] = torch.tensor(ids, dtype=torch.long)
            position_ids[b, start:end] = torch.arange(len(ids))
            bounds.append(b * L + end)
            images.extend(row_images)
            start = end
        attention_mask[b, :start] = True
        if start < L:
            position_ids[b, start:] = torch.arange(L - start)
            bounds.append((b + 1) * L)
    stacked = torch.stack(images) if images else torch.zeros((0, 3, image_size, image_size))
    return {"images": stacked, "input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": position_ids, "cu_seqlens": torch.tensor(bounds, dtype=torch.int32)}
