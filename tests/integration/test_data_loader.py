"""Shards -> batches: the batch contract, determinism, DP splitting, resume, bad samples."""

import io
import json
from collections import Counter

import pytest
import torch
from PIL import Image as PILImage

from lcl_megatron.config import DataConfig
from lcl_megatron.data.loader import build_train_loader
from lcl_megatron.data.stream import SampleStream, resolve_shards
from lcl_megatron.data.shards import read_shard, write_shard
from lcl_megatron.tokens import EOI_ID, IMG_ID, PAD_ID, SOI_ID, SOT_ID
from tests.support.paths import MMC4_DIR

P = 16
MMC4 = MMC4_DIR / "docs_no_face_shard_151_v3.sample40.jsonl"


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LCL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def loader(cfg=None, *, seed=0, rank=0, size=1, batch=4, context=96):
    return build_train_loader(cfg or DataConfig(), image_size=16, num_image_tokens=P, context_length=context,
                              micro_batch_size=batch, dp_rank=rank, dp_size=size, seed=seed)


def take(ld, n):
    it = iter(ld)
    return [next(it) for _ in range(n)]


def check_contract(batch, batch_size, context):
    ids, mask, images = batch["input_ids"], batch["attention_mask"], batch["images"]
    assert ids.dtype == torch.int64 and ids.shape == (batch_size, context)
    assert mask.dtype == torch.bool and mask.shape == ids.shape
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 16)
    assert int((ids == SOI_ID).sum()) == images.shape[0] > 0
    for row, row_mask in zip(ids.tolist(), mask.tolist()):
        length = sum(row_mask)
        assert row_mask == [True] * length + [False] * (context - length)
        assert all(t == PAD_ID for t in row[length:])
        assert row[0] in (SOT_ID, SOI_ID)
        i = 0
        while i < length:
            if row[i] == SOI_ID:
                assert row[i + 1:i + 1 + P] == [IMG_ID] * P and row[i + 1 + P] == EOI_ID
                i += P + 2
            else:
                assert row[i] not in (IMG_ID, EOI_ID)
                i += 1


def test_embedded_batches_hold_the_contract_also_when_truncated():
    for context in (96, 40):
        ld = loader(context=context)
        for batch in take(ld, 20):
            check_contract(batch, 4, context)
        assert ld.stats["samples"] >= 80


def test_same_seed_same_batches_other_seed_other_batches():
    a, b, c = take(loader(seed=3), 3), take(loader(seed=3), 3), take(loader(seed=4), 3)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])


def test_resume_from_state_dict_continues_the_same_batches():
    straight = take(loader(), 7)
    first = loader()
    take(first, 4)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    for x, y in zip(straight[4:], take(resumed, 3)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert resumed.state_dict()["batches_consumed"] == 7


def epoch_keys(shards, stream, streams):
    return [(shard, s["__key__"]) for shard, s in
            SampleStream(shards, stream=stream, num_streams=streams, seed=0, shuffle_buffer=1).epoch_samples(0, Counter())]


@pytest.mark.parametrize("streams", [2, 3])
def test_dp_ranks_read_disjoint_samples_covering_the_epoch(streams):
    shards = resolve_shards("embedded:digits")
    per_rank = [epoch_keys(shards, r, streams) for r in range(streams)]
    seen = [k for keys in per_rank for k in keys]
    assert len(seen) == len(set(seen)) == 4096


def test_fewer_shards_than_streams_deal_samples(tmp_path):
    write_shard(tmp_path / "only.tar", [(f"k{i}", {"txt": b"x"}) for i in range(10)])
    per_rank = [epoch_keys([str(tmp_path / "only.tar")], r, 3) for r in range(3)]
    assert [len(k) for k in per_rank] == [4, 3, 3]
    assert len({k for keys in per_rank for k in keys}) == 10


def test_rank_batches_differ():
    a, b = take(loader(rank=0, size=2), 1)[0], take(loader(rank=1, size=2), 1)[0]
    assert not torch.equal(a["input_ids"], b["input_ids"])


def png(color=(200, 10, 10), fmt="PNG"):
    out = io.BytesIO()
    PILImage.new("RGB", (20, 20), color).save(out, format=fmt)
    return out.getvalue()


def doc_json(*items):
    return json.dumps({"items": [{"image": x} if x.endswith(".png") else {"text": x} for x in items]}).encode()


def test_bad_samples_are_skipped_and_counted(tmp_path):
    samples = [
        ("bad_json", {"json": b"{not json"}),
        ("corrupt_only", {"json": doc_json("a", "i0.png"), "i0.png": b"garbage"}),
        ("half_corrupt", {"json": doc_json("a", "i0.png", "b", "i1.png"), "i0.png": b"garbage", "i1.png": png()}),
        ("missing_file", {"json": doc_json("a", "i0.png", "i9.png"), "i0.png": png()}),
        ("no_items", {"json": b'{"items": 3}'}),
        ("pair_bad_image", {"txt": b"a cat", "jpg": b"\xff\xd8 broken"}),
        ("stray", {"cls": b"3"}),
        ("pair", {"txt": "a red square".encode(), "jpg": png(fmt="JPEG")}),
    ]
    write_shard(tmp_path / "s.tar", samples)
    ld = loader(DataConfig(path=[str(tmp_path)], shuffle_buffer=1), batch=1)
    batches = take(ld, 3)  # the three good samples, in shard order
    for batch in batches:
        check_contract(batch, 1, 96)
    assert [int((b["input_ids"] == SOI_ID).sum()) for b in batches] == [1, 1, 1]
    assert ld.stats["tokens_total"] == 3 * 96 and 0 < ld.stats["tokens_real"] < 3 * 96
    assert +Counter({k: v for k, v in ld.stats.items() if not k.startswith("tokens_")}) == Counter(samples=3, skipped_bad_json=2, skipped_no_image=2, images_corrupt=3,
                               images_missing=1, skipped_unknown_sample=1)


def test_truncated_shard_keeps_its_readable_samples(tmp_path):
    write_shard(tmp_path / "a.tar", [(f"d{i}", {"json": doc_json("x", "i.png"), "i.png": png()}) for i in range(6)])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: 512 * 14 + 100])  # inside the 4th sample's first member
    keys = [s["__key__"] for s in epoch_samples_lenient(tmp_path / "a.tar")]
    assert keys == ["d0", "d1", "d2"]
    ld = loader(DataConfig(path=[str(tmp_path)], shuffle_buffer=1), batch=1)
    take(ld, len(keys) + 1)  # the next epoch starts over
    assert ld.stats["shards_unreadable"] == 1


def epoch_samples_lenient(path):
    try:
        yield from read_shard(path)
    except OSError:
        return


def test_mmc4_documents_in_shards_are_read_with_the_reference_rules(tmp_path):
    raws = [json.loads(line) for line in MMC4.read_text().splitlines()]
    samples = []
    for n, raw in enumerate(raws):
        files = {"json": json.dumps(raw).encode()}
        files.update({info["image_name"]: png((n * 6 % 256, 90, 30), "JPEG") for info in raw["image_info"]})
        samples.append((f"mmc4_{n:03d}", files))
    write_shard(tmp_path / "mmc4.tar", samples)
    ld = loader(DataConfig(path=[str(tmp_path / "mmc4.tar")], shuffle_buffer=1), batch=2, context=512)
    for batch in take(ld, 8):
        check_contract(batch, 2, 512)
        assert int((batch["input_ids"] == SOI_ID).sum(dim=1).max()) <= 6
    assert ld.stats["samples"] == 16


def test_workers_give_deterministic_contract_batches():
    cfg = DataConfig(num_workers=2)
    a, b = take(loader(cfg), 4), take(loader(cfg), 4)
    for x, y in zip(a, b):
        check_contract(x, 4, 96)
        assert all(torch.equal(x[k], y[k]) for k in x)
    # worker w of one rank reads the stream that rank w of two ranks without workers reads
    for rank in (0, 1):
        alone = take(loader(rank=rank, size=2), 2)
        assert all(torch.equal(a[rank][k], alone[0][k]) for k in alone[0])
        assert all(torch.equal(a[rank + 2][k], alone[1][k]) for k in alone[0])


def test_weighted_datasets_are_mixed_by_weight(tmp_path):
    for name, text in (("a", b"alpha"), ("b", b"beta")):
        (tmp_path / name).mkdir()
        write_shard(tmp_path / name / "s.tar", [(f"{name}{i}", {"txt": text, "png": png()}) for i in range(20)])
    cfg = DataConfig(path=[f"{tmp_path / 'a'}:3", f"{tmp_path / 'b'}:1"], img_first_prob=0.0)
    rows = torch.cat([b["input_ids"] for b in take(loader(cfg, batch=8), 25)])
    from lcl_megatron.tokenizer import get_tokenizer
    alpha = get_tokenizer().encode("alpha")[0]
    share = float((rows[:, 1] == alpha).float().mean())
    assert 0.68 < share < 0.82  # 3:1 -> 0.75 of 200 samples


def test_data_without_any_usable_sample_fails_clearly(tmp_path, monkeypatch):
    import lcl_megatron.data.loader as loader_module

    monkeypatch.setattr(loader_module, "MAX_SKIPPED_IN_A_ROW", 50)
    write_shard(tmp_path / "bad.tar", [(f"k{i}", {"json": b"[]"}) for i in range(5)])
    with pytest.raises(RuntimeError, match="in a row were unusable"):
        take(loader(DataConfig(path=[str(tmp_path)])), 1)


def test_seeking_to_a_saved_position_many_epochs_in_gives_the_uninterrupted_batches(tmp_path, capsys):
    """Two datasets mixed, one dealt to both ranks through a pipe, shards interleaved, packing, crops:
    a loader built from the position after batch 40 (several epochs in) yields the uninterrupted
    run's next batches bit for bit."""
    for s in range(5):
        write_shard(tmp_path / f"a{s}.tar", [(f"a{s}-{i}", {"txt": f"shard {s} pair {i}{' of words' * i}".encode(),
                                                            "png": png((40 * s, 9 * i, 7))}) for i in range(7)])
    (tmp_path / "b").mkdir()
    write_shard(tmp_path / "b" / "only.tar", [(f"b{i}", {"json": doc_json("one", "i0.png", "two words"),
                                                         "i0.png": png((9 * i, 200, 30))}) for i in range(9)])
    cfg = DataConfig(path=[f"{tmp_path}/a{{0..4}}.tar:2", f"pipe:cat {tmp_path}/b/only.tar:1"], shuffle_buffer=5,
                     interleave_shards=2, packing=True, pack_open_rows=3, augment=True)
    straight = loader(cfg, rank=1, size=2, batch=3, context=48)
    it = iter(straight)
    for _ in range(40):
        next(it)
    state = json.loads(json.dumps(straight.state_dict()))  # as a checkpoint holds it
    expected = [next(it) for _ in range(8)]
    assert state["batches_consumed"] == 40 and state["streams"][0]["samples"]["datasets"][0]["epoch"] >= 5
    assert state["streams"][0]["packing"] and state["streams"][0]["samples"]["datasets"][0]["buffer"]
    resumed = loader(cfg, rank=1, size=2, batch=3, context=48)
    resumed.load_state_dict(state)
    got = take(resumed, 8)
    assert all(g.keys() == e.keys() and all(torch.equal(g[k], e[k]) for k in g) for g, e in zip(got, expected))
    assert resumed.state_dict()["batches_consumed"] == 48
    assert "warning" not in capsys.readouterr().err


def test_a_position_without_stream_state_is_replayed_with_one_warning(capsys):
    straight = take(loader(), 5)
    resumed = loader()
    resumed.load_state_dict({"batches_consumed": 3})
    assert all(torch.equal(g["input_ids"], e["input_ids"]) for g, e in zip(take(resumed, 2), straight[3:]))
    assert capsys.readouterr().err.count("warning") == 1
