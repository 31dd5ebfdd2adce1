"""Packing: rows hold whole samples, positions restart, segments are exact, losses equal unpacked ones."""

import pytest
import torch

from lcl_megatron.config import DataConfig, load_config
from lcl_megatron.data.global_batch import slice_batch
from lcl_megatron.data.loader import build_train_loader
from lcl_megatron.data.packing import RowPacker, collate_packed
from lcl_megatron.tokens import EOI_ID, IMG_ID, PAD_ID, SOI_ID, SOT_ID
from tests.support.launch import REPO

P = 16


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LCL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def seq(n, images=0):
    return ([7] * n, [torch.full((3, 4, 4), float(n))] * images)


def test_first_fit_keeps_order_within_rows_and_closes_the_oldest_row():
    packer = RowPacker(10, open_rows=2, min_length=2)
    closed = []
    for n in (6, 5, 3, 4, 2, 7):
        closed += packer.add(seq(n))
    # 6 -> row A; 5 -> row B; 3 -> A (9, free 1 < 2: closed); 4 -> B (9, closed); 2 -> C; 7 -> C (9, closed)
    assert [[len(ids) for ids, _ in row] for row in closed] == [[6, 3], [5, 4], [2, 7]]
    assert packer.rows == []


def test_collate_packed_positions_segments_and_images():
    rows = [[seq(3, 1), seq(4)], [seq(8, 2)]]
    batch = collate_packed(rows, 8, 4)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], list(range(8))]
    assert batch["cu_seqlens"].tolist() == [0, 3, 7, 8, 16] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["attention_mask"].sum(1).tolist() == [7, 8]
    assert batch["input_ids"][0, 7] == PAD_ID
    assert [float(x[0, 0, 0]) for x in batch["images"]] == [3.0, 8.0, 8.0]


def packed_loader(cfg, context=256, batch=4, rank=0, size=1):
    return build_train_loader(cfg, image_size=16, num_image_tokens=P, context_length=context,
                              micro_batch_size=batch, dp_rank=rank, dp_size=size, seed=0)


def segments(batch):
    """(row, start, stop) of every segment, from cu_seqlens."""
    L = batch["input_ids"].shape[1]
    bounds = batch["cu_seqlens"].tolist()
    return [(a // L, a % L, a % L + (b - a)) for a, b in zip(bounds[:-1], bounds[1:])]


def test_packed_batches_hold_whole_documents_and_use_more_tokens():
    plain, packed = packed_loader(DataConfig()), packed_loader(DataConfig(packing=True))
    it = iter(packed)
    for _ in range(6):
        batch = next(it)
        ids, pos, mask = batch["input_ids"], batch["position_ids"], batch["attention_mask"]
        L = ids.shape[1]
        assert int((ids == SOI_ID).sum()) == batch["images"].shape[0]
        assert batch["cu_seqlens"][-1] == ids.numel() and all(k * L in batch["cu_seqlens"].tolist() for k in range(5))
        for row, start, stop in segments(batch):
            assert stop <= L and pos[row, start:stop].tolist() == list(range(stop - start))
            if not mask[row, start]:
                assert not mask[row, start:].any()  # padding: the row's tail
                continue
            doc = ids[row, start:stop].tolist()
            assert doc[0] in (SOT_ID, SOI_ID) and mask[row, start:stop].all()
            i = 0
            while i < len(doc):  # every image run is whole inside its document
                if doc[i] == SOI_ID:
                    assert doc[i + 1:i + 1 + P] == [IMG_ID] * P and doc[i + 1 + P] == EOI_ID
                    i += P + 2
                else:
                    i += 1
    plain_it = iter(plain)
    for _ in range(6):
        next(plain_it)
    util = lambda ld: ld.stats["tokens_real"] / ld.stats["tokens_total"]
    assert util(packed) > 0.9 > util(plain)


def test_slicing_a_packed_global_batch_keeps_each_slice_consistent():
    batch = next(iter(packed_loader(DataConfig(packing=True), batch=4)))
    for rank in range(2):
        part = slice_batch(batch, rank, 2)
        L = part["input_ids"].shape[1]
        assert part["cu_seqlens"][0] == 0 and part["cu_seqlens"][-1] == 2 * L
        assert int((part["input_ids"] == SOI_ID).sum()) == part["images"].shape[0]
        whole = batch["cu_seqlens"].tolist()
        assert [b + rank * 2 * L for b in part["cu_seqlens"].tolist()] == \
            [b for b in whole if rank * 2 * L <= b <= (rank + 1) * 2 * L]


@pytest.fixture(scope="module")
def world_of_one():
    from lcl_megatron.model.build import ensure_single_process_groups

    ensure_single_process_groups()  # shared with other in-process tests of this session


def unpack(batch):
    """A packed batch -> one document per row, the same documents and images in the same order."""
    docs = [batch["input_ids"][r, a:b] for r, a, b in segments(batch) if batch["attention_mask"][r, a]]
    ids = torch.full((len(docs), batch["input_ids"].shape[1]), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, doc in enumerate(docs):
        ids[i, :len(doc)], mask[i, :len(doc)] = doc, True
    return batch["images"], ids, mask


def test_packed_losses_equal_unpacked_losses(world_of_one):
    from lcl_megatron.model.lcl import LCLModel

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        "model.embed_dim=32", "model.vision.image_size=16", "model.vision.patch_size=4", "model.vision.width=32",
        "model.vision.layers=1", "model.vision.head_width=16", "model.text.width=32", "model.text.heads=2",
        "model.text.layers=2", "model.pool_heads=2", "model.text.context_length=160"], validate=False)
    torch.manual_seed(0)
    model = LCLModel.from_config(cfg).eval()
    batch = next(iter(packed_loader(DataConfig(packing=True), context=160, batch=2)))
    assert len(segments(batch)) > 4  # several documents per row
    with torch.no_grad():
        packed = model(batch["images"], batch["input_ids"], batch["attention_mask"],
                       batch["position_ids"], batch["cu_seqlens"])
        alone = model(*unpack(batch))
    for key in ("loss", "generation_loss", "contrastive_loss"):
        torch.testing.assert_close(packed[key], alone[key], rtol=1e-5, atol=1e-5)


def test_resume_with_workers_and_packing_repeats_no_batch_and_loses_none():
    """Killed after batch k, resumed from its state: batches k+1... equal the uninterrupted run's, bit for bit."""
    cfg = DataConfig(packing=True, num_workers=2)
    straight_it = iter(packed_loader(cfg, context=128))
    straight = [next(straight_it) for _ in range(7)]
    first = packed_loader(cfg, context=128)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    resumed = packed_loader(cfg, context=128)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for expected in straight[5:]:
        got = next(it)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
