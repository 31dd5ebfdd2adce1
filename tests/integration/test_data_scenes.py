"""The digit-scenes corpora: MMC4-like documents and captioned pairs of the same scans, held-out scenes apart."""

import json

import numpy as np
import pytest

from lcl_megatron.data import embedded
from lcl_megatron.data.embedded import DIGIT_NAMES, ensure_corpus
from lcl_megatron.data.labelled import load_labelled_set
from lcl_megatron.data.shards import read_shard

DOCUMENTS = 60  # the real corpora hold embedded.TRAIN_DOCUMENTS; the recipe is the same


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LCL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(embedded, "TRAIN_DOCUMENTS", DOCUMENTS)
        mp.setattr(embedded, "TRAIN_SHARDS", 2)
        yield {name: ensure_corpus(name) for name in ("digit-scenes", "digit-scenes-pairs")}


def samples(directory):
    return [s for shard in sorted(directory.glob("train-*.tar")) for s in read_shard(shard)]


def test_both_corpora_share_their_labelled_sets_and_never_train_on_them(corpora):
    scenes, pairs = corpora["digit-scenes"], corpora["digit-scenes-pairs"]
    for shard in (embedded.HELDOUT_SHARD, embedded.PROBE_TRAIN_SHARD):
        assert (scenes / shard).read_bytes() == (pairs / shard).read_bytes()
    held = {s["png"] for s in read_shard(scenes / embedded.HELDOUT_SHARD)}
    probe = {s["png"] for s in read_shard(scenes / embedded.PROBE_TRAIN_SHARD)}
    trained = {v for d in corpora.values() for s in samples(d) for k, v in s.items() if k.endswith("png")}
    assert len(held) > 300 and len(probe) > 1300 and len(trained) > DOCUMENTS
    assert not (held & trained) and not (held & probe)
    # Held-out scenes are drawn from held-out scans only.
    _, labels, train, heldout = embedded.load_scans()
    assert [int(s["cls"]) for s in read_shard(scenes / embedded.HELDOUT_SHARD)] == labels[heldout].tolist()
    assert not set(train) & set(heldout)


def test_documents_are_about_groups_of_images_and_pairs_are_captions(corpora):
    kinds = set()
    for sample in samples(corpora["digit-scenes"]):
        items = json.loads(sample["json"])["items"]
        images = [it for it in items if "image" in it]
        texts = [it["text"] for it in items if "text" in it]
        assert 2 <= len(images) <= 4 and len(texts) in (1, 2)
        # Not a caption per image: the images form one run, with no text between them.
        where = [i for i, it in enumerate(items) if "image" in it]
        assert where == list(range(where[0], where[0] + len(images)))
        kinds.add(texts[0].split()[0])
    assert {"counting", "several"} <= kinds
    for sample in samples(corpora["digit-scenes-pairs"]):
        caption = sample["txt"].decode()
        assert any(name in caption.split() for name in DIGIT_NAMES)


def test_scenes_are_hard_for_pixels_but_keep_the_digit(corpora, monkeypatch):
    monkeypatch.setenv("LCL_CACHE_DIR", str(corpora["digit-scenes"].parent.parent))
    data = load_labelled_set("embedded:digit-scenes", 32)
    images, labels = data["train"]
    assert images.shape == (1438, 3, 32, 32) and data["test"][0].shape[0] == 359
    assert sorted(set(labels.tolist())) == list(range(10))
    # Two renders of one scan differ (fresh position, size, colours) ...
    rng = np.random.default_rng(0)
    scan = embedded.load_scans()[0][0]
    a, b = embedded.render_scene(scan, rng), embedded.render_scene(scan, rng)
    assert a.shape == (32, 32, 3) and np.abs(a.astype(int) - b.astype(int)).mean() > 10
    # ... while the glyph stays brighter than its background.
    assert a.max() > 150
