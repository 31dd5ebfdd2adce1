"""The embedded digits corpus: deterministic, atomic, with a disjoint held-out split."""

import json
import re

import pytest

from lcl_megatron.config import ConfigError, load_config
from lcl_megatron.data import embedded
from lcl_megatron.data.embedded import DIGIT_NAMES, class_prompts, ensure_corpus
from lcl_megatron.eval.datasets import load_zeroshot_set
from lcl_megatron.data.shards import read_shard
from tests.support.paths import corpus_file_hashes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LCL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield ensure_corpus("digits")


def test_build_is_deterministic(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LCL_CACHE_DIR", str(tmp_path))
    again = ensure_corpus("digits")
    assert again != corpus
    assert corpus_file_hashes(again) == corpus_file_hashes(corpus)
    index = json.loads((corpus / "index.json").read_text())
    assert sum(e["samples"] for e in index["train"].values()) == embedded.TRAIN_DOCUMENTS
    assert all(e["sha256"] == corpus_file_hashes(corpus)[name] for part in ("train", "heldout")
               for name, e in index[part].items())


def train_documents(corpus):
    for shard in sorted(corpus.glob("train-*.tar")):
        yield from read_shard(shard)


def test_heldout_scans_never_appear_in_training(corpus):
    held = [s["png"] for s in read_shard(corpus / embedded.HELDOUT_SHARD)]
    assert len(held) > 300
    train_images = {v for s in train_documents(corpus) for k, v in s.items() if k.endswith(".png")}
    assert len(train_images) > 1300
    assert not train_images & set(held)


def test_every_image_is_named_right_before_or_right_after_it(corpus):
    from sklearn.datasets import load_digits

    digits = load_digits()
    label_of = {embedded._png(image): int(label) for image, label in zip(digits.images, digits.target)}
    before = after = images = prompt_uses = 0
    for sample in train_documents(corpus):
        items = json.loads(sample["json"])["items"]
        assert 1 <= sum("image" in it for it in items) <= 4
        for i, item in enumerate(items):
            if "image" not in item:
                continue
            name = DIGIT_NAMES[label_of[sample[item["image"]]]]
            prev = items[i - 1].get("text", "") if i > 0 else ""
            nxt = items[i + 1].get("text", "") if i + 1 < len(items) else ""
            named_before = bool(re.search(rf"\b{name}\b", prev))
            named_after = bool(re.search(rf"\b{name}\b", nxt))
            assert named_before or named_after
            if not named_before:  # an image named after it opens its document: no misleading context
                assert i == 0 and len(items) == 2
            images += 1
            before += named_before
            after += named_after
            prompt_uses += prev in class_prompts()
    assert 0.75 < before / images < 0.92 and 0.08 < after / images < 0.25
    assert prompt_uses / images > 0.15  # the zero-shot prompt is how training introduces many images


def test_zeroshot_set_has_every_class_and_one_prompt_each(corpus, monkeypatch):
    monkeypatch.setenv("LCL_CACHE_DIR", str(corpus.parent.parent))
    images, labels, prompts = load_zeroshot_set("embedded:digits", 24)
    assert images.shape == (len(labels), 3, 24, 24)
    assert sorted(set(labels.tolist())) == list(range(10))
    assert prompts == class_prompts() and prompts[7] == "here is a handwritten seven:"


def test_an_unknown_embedded_corpus_is_refused_before_training_builds_anything():
    from lcl_megatron.training.train import check_data

    check_data(load_config(None, ["data.path=embedded:digits"]))
    with pytest.raises(ConfigError, match="data.heldout.*unknown embedded corpus 'letters'"):
        check_data(load_config(None, ["data.path=embedded:digits", "data.heldout=embedded:letters"]))


def failing_build(out):
    (out / "train-00000.tar").write_bytes(b"partial")
    raise KeyboardInterrupt  # as if the build were interrupted


def test_interrupted_build_leaves_nothing_and_next_use_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("LCL_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(embedded.EMBEDDED_CORPORA, "digits", (embedded.DIGITS_VERSION, failing_build))
    with pytest.raises(KeyboardInterrupt):
        ensure_corpus("digits")
    assert list((tmp_path / "embedded").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("LCL_CACHE_DIR", str(tmp_path))
    assert (ensure_corpus("digits") / "index.json").is_file()


