"""The reference's data recipe in the training loader: random resized crops that a resumed
run replays, shuffling that mixes shards before the shuffle buffer, and MMC4 images picked in the
reference's order."""

import io
from collections import Counter

import pytest
import torch
from PIL import Image

from lcl_megatron.config import DataConfig
from lcl_megatron.data.loader import build_train_loader
from lcl_megatron.data.stream import SampleStream
from lcl_megatron.data.shards import write_shard


def _pairs(tmp_path, shards=3, per_shard=6):
    paths = []
    for s in range(shards):
        def samples():
            for i in range(per_shard):
                out = io.BytesIO()
                # wide images with a horizontal ramp: a crop's offset changes the pixels
                Image.frombytes("L", (40, 24), bytes((x * 6 + i) % 256 for _ in range(24) for x in range(40))) \
                    .convert("RGB").save(out, format="PNG")
                yield f"s{s}-{i:03d}", {"png": out.getvalue(), "txt": f"shard {s} sample {i}".encode()}
        path = tmp_path / f"pairs-{s:05d}.tar"
        write_shard(path, samples())
        paths.append(str(path))
    return paths


def _loader(tmp_path, **kwargs):
    cfg = DataConfig(path=[str(tmp_path)], shuffle_buffer=4, img_first_prob=1.0, **kwargs)
    return build_train_loader(cfg, image_size=16, num_image_tokens=4, context_length=32, micro_batch_size=4,
                              dp_rank=0, dp_size=1, seed=3)


def test_training_crops_are_random_yet_replayed_on_resume(tmp_path):
    _pairs(tmp_path)
    crops = [b["images"] for b, _ in zip(_loader(tmp_path), range(5))]
    evals = [b["images"] for b, _ in zip(_loader(tmp_path, augment=False), range(5))]
    assert all(torch.equal(a, b) for a, b in zip(crops, [b["images"] for b, _ in zip(_loader(tmp_path), range(5))]))
    assert not any(torch.equal(a, b) for a, b in zip(crops, evals))  # not the evaluation transform
    resumed = _loader(tmp_path)
    resumed.load_state_dict({"batches_consumed": 3})
    assert all(torch.equal(a, b) for a, b in zip(crops[3:], [b["images"] for b, _ in zip(resumed, range(2))]))


def test_a_stream_interleaves_its_shards(tmp_path):
    shards = _pairs(tmp_path)
    stream = SampleStream(shards, stream=0, num_streams=1, seed=0, shuffle_buffer=1, interleave_shards=3)
    first = [shard for shard, _ in zip((s for s, _ in stream.epoch_samples(0, Counter())), range(3))]
    assert len(set(first)) == 3  # one sample from each shard before a second from any
    samples = [sample["__key__"] for _, sample in stream.epoch_samples(0, Counter())]
    assert sorted(samples) == sorted(f"s{s}-{i:03d}" for s in range(3) for i in range(6))  # each sample once
    single = SampleStream(shards, stream=0, num_streams=1, seed=0, shuffle_buffer=1, interleave_shards=1)
    assert len({s for s, _ in zip((s for s, _ in single.epoch_samples(0, Counter())), range(3))}) == 1


def test_reference_shuffle_defaults():
    cfg = DataConfig()
    assert cfg.shuffle_buffer == 5000 and cfg.interleave_shards > 1 and cfg.augment and cfg.crop_scale_min == 0.9


def _reference_mmc4_images(matched_sentences, loadable, max_images=6):
    """The reference's order (src/training/interleaved.py): one image per sentence, at most
    `max_images`, and only then are the images that fail to load dropped."""
    chosen = sorted(set(matched_sentences))[:max_images]
    return [i for i in chosen if i in loadable]


@pytest.mark.parametrize("form", ["mmc4", "items"])
def test_mmc4_picks_and_caps_before_dropping_unloadable_images(tmp_path, form):
    import json

    from lcl_megatron.data.prepare.commands import mmc4_main
    from lcl_megatron.tokens import SOI_ID

    images = tmp_path / "images"
    images.mkdir()
    sentences = [f"sentence number {i} of the page." for i in range(8)]
    infos = [{"image_name": f"photo{i}.png", "matched_text_index": i, "matched_sim": 0.3} for i in range(8)]
    for i in range(8):
        if i != 2:  # photo2 was never downloaded
            out = io.BytesIO()
            Image.new("RGB", (20, 20), (30 * i, 0, 0)).save(out, format="PNG")
            (images / f"photo{i}.png").write_bytes(out.getvalue())
    (tmp_path / "docs.jsonl").write_text(json.dumps({"url": "u", "text_list": sentences, "image_info": infos}) + "\n")
    assert mmc4_main(["--docs", str(tmp_path / "docs.jsonl"), "--images", str(images), "--out", str(tmp_path / "out"),
                      "--form", form, "--workers", "1", "--no-progress"]) == 0
    loader = build_train_loader(DataConfig(path=[str(tmp_path / "out")], shuffle_buffer=1), image_size=16,
                                num_image_tokens=4, context_length=256, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)
    batch = next(iter(loader))
    expected = _reference_mmc4_images(range(8), loadable=set(range(8)) - {2})
    assert len(expected) == 5  # the reference's 5, where picking among the survivors gave 6
    assert int((batch["input_ids"] == SOI_ID).sum()) == batch["images"].shape[0] == len(expected)
