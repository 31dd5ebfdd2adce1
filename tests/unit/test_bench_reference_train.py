"""The reference's side of `lcl bench train --reference`: its step, its rows, the shards it reads."""

import tempfile
from pathlib import Path

import pytest
import torch

from lcl_megatron.bench import reference_train
from lcl_megatron.bench.train import REFERENCE_SECTION, reference_markdown
from lcl_megatron.bench.train import main as bench_train_main
from lcl_megatron.config import DataConfig, load_config
from lcl_megatron.data.loader import build_train_loader
from lcl_megatron.data.sequences import image_run
from lcl_megatron.errors import UserError
from lcl_megatron.tokenizer import get_tokenizer
from lcl_megatron.tokens import EOT_ID, PAD_ID, SOT_ID
from tests.support import reference_lcl
from tests.support.paths import REPO

CONFIG = REPO / "configs" / "bench_reference_pairs.yaml"


def tiny_config():
    """The bench config's model kind at a size a unit test trains in a moment."""
    return load_config(str(CONFIG), ["model.embed_dim=32", "model.vision.width=48", "model.vision.layers=1",
                                     "model.vision.head_width=16", "model.text.width=32", "model.text.layers=1",
                                     "model.text.context_length=48", "model.pool_heads=4"], validate=False)


def rows(patches: int) -> torch.Tensor:
    run = image_run(patches)
    ids = [run + [320, 1929, EOT_ID], [SOT_ID, 320, 2368, 539] + run, [SOT_ID, 1237, 3306] + run]
    return torch.tensor([row + [PAD_ID] * (48 - len(row)) for row in ids])


def test_oracle_is_loaded_by_path_from_this_checkout():
    oracle = reference_train.load_oracle()
    assert Path(oracle.__file__) == Path(reference_lcl.__file__)
    assert oracle.ReferenceLCL.__name__ == "ReferenceLCL"


def test_head_over_every_position_gives_the_oracles_outputs():
    cfg = tiny_config()
    step = reference_train.ReferenceStep(reference_lcl, cfg)
    ids = rows(cfg.model.vision.num_patches)
    images = torch.randn(3, 3, 32, 32)
    ours, oracle = step.outputs(images, ids), step.model(images, ids)
    assert ours["labels"].tolist() == oracle["labels"].tolist()
    assert len(ours["labels"]) == 3 + 4 + 3  # text, <end_of_text> and <start_of_img> targets; no padding
    for key in ("logits", "image_features", "text_features"):
        torch.testing.assert_close(ours[key], oracle[key])


def test_reference_step_trains_with_adamw_and_the_reference_rule_for_decay():
    cfg = tiny_config()
    step = reference_train.ReferenceStep(reference_lcl, cfg)
    no_decay, decay = step.optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == cfg.optim.weight_decay
    assert any(p is step.model.logit_scale for p in no_decay["params"])
    assert any(p is step.model.lm_head[1].weight for p in decay["params"])
    ids, images = rows(cfg.model.vision.num_patches), torch.randn(3, 3, 32, 32)
    before = step.model.lm_head[1].weight.detach().clone()
    losses = [step(images, ids).item() for _ in range(3)]
    assert not torch.equal(before, step.model.lm_head[1].weight)
    assert losses[-1] < losses[0]


def test_reference_rows_refuse_packed_batches():
    with pytest.raises(ValueError, match="one pair"):
        reference_train.reference_rows({"images": None, "input_ids": None, "position_ids": None})


def test_pair_shards_hold_pairs_with_captions_of_about_twenty_tokens():
    with tempfile.TemporaryDirectory() as tmp:
        reference_train.write_pair_shards(Path(tmp), shards=1, per_shard=8, image_size=32)
        loader = build_train_loader(DataConfig(path=[tmp], shuffle_buffer=1, num_workers=0), image_size=32,
                                    num_image_tokens=16, context_length=128, micro_batch_size=8, dp_rank=0,
                                    dp_size=1, seed=0, tokenizer=get_tokenizer(), num_workers=0)
        batch = next(iter(loader))
    images, ids = reference_train.reference_rows(batch)
    assert images.shape == (8, 3, 32, 32)
    text_tokens = (ids != PAD_ID).sum(1) - (16 + 2) - 1  # minus the image run and <start/end_of_text>
    assert 15 <= text_tokens.float().mean() <= 30


def test_markdown_row_says_whether_the_goal_is_met():
    result = {"date": "2026-12-01", "machine": "cpu, 2 CPU cores", "load_average": 3.0, "threads": 2,
              "torch": "2", "rounds": 5, "steps_per_round": 3, "reference_rows_per_step": 32, "precision": "fp32",
              "packing": True, "rows_per_step": 11, "samples_per_step": 33.0, "reference_samples_per_s": 10.0,
              "samples_per_s": 25.0, "reference_loss": 10.0, "loss": 9.0, "speedup": 2.5, "speedup_cpu_time": 2.4}
    text = reference_markdown(result)
    assert text.startswith(REFERENCE_SECTION) and "2.50x (met" in text
    assert "1.50x (NOT met" in reference_markdown({**result, "speedup": 1.5})


def test_without_the_oracle_the_bench_says_so_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(reference_train, "ORACLE_PATH", tmp_path / "reference_lcl.py")
    assert reference_train.load_oracle() is None
    with pytest.raises(UserError, match="^reference oracle not available"):
        bench_train_main(["--config", str(CONFIG), "--reference"])
