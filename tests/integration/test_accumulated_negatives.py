"""Gradient accumulation with the reference's feature cache: K micro-batches of B train as one batch of K x B.

Each test runs the real step function (`training/step.py`) on a DeepSpeed engine
in this one process, and reads the gradients the engine holds when it updates.
(An integration test only because starting DeepSpeed's communication backend
probes for its compiler in a subprocess, which the unit tier refuses.)
"""

import pytest
import torch

from lcl_megatron import tokens
from lcl_megatron.config import load_config
from lcl_megatron.data.packing import RowPacker, collate_packed
from tests.support.configs import DEMO, TINY_MODEL
from tests.support.launch import with_overrides
from tests.support.model_inputs import IMAGE

LENGTH = 64  # TINY_MODEL's context length
IMAGE_SIZE = 24


def _row(sample: int) -> list[int]:
    """Sample-dependent text around 0-2 images, one of them at the start of the row (no context):
    micro-batches differ in images, pairs and predicted tokens."""
    words = [400 + 37 * sample + i for i in range(3 + sample % 5)]
    row = [tokens.SOT_ID] + words
    if sample % 4 == 3:
        row = IMAGE + row
    if sample % 3 != 0:
        row += IMAGE + words[:2]
    if sample % 5 == 1:
        row += IMAGE
    return row + [tokens.EOT_ID]


def _samples(n: int) -> list[tuple[list[int], list[torch.Tensor]]]:
    """(token ids, images) of n samples."""
    torch.manual_seed(1)
    rows = [_row(sample) for sample in range(n)]
    return [(row, list(torch.randn(row.count(tokens.SOI_ID), 3, IMAGE_SIZE, IMAGE_SIZE))) for row in rows]


def _micro_batches(samples, size: int) -> list[dict]:
    """One sample a row, `size` rows a micro-batch."""
    batches = [collate_packed([[s] for s in samples[i: i + size]], LENGTH, IMAGE_SIZE) for i in range(0, len(samples), size)]
    return [{key: batch[key] for key in ("images", "input_ids", "attention_mask")} for batch in batches]


def _packed_micro_batches(samples, micro_batches: int) -> tuple[list[dict], int]:
    """The samples packed first-fit into rows, split into `micro_batches` of equal row counts:
    (micro-batches holding different numbers of samples and images, rows per micro-batch)."""
    packer, rows = RowPacker(LENGTH, open_rows=2, min_length=8), []
    for sample in samples:
        rows += packer.add(sample)
    rows += packer.rows
    size = len(rows) // micro_batches
    assert size * micro_batches == len(rows)
    return [collate_packed(rows[i: i + size], LENGTH, IMAGE_SIZE) for i in range(0, len(rows), size)], size


def _config(micro_batch_size: int, grad_accumulation: int, *extra: str):
    return load_config(DEMO, with_overrides(TINY_MODEL + [
        f"train.micro_batch_size={micro_batch_size}", f"train.grad_accumulation={grad_accumulation}",
        "train.seed=3", "train.precision=fp32", "optim.lr=1e-3", "schedule.warmup_steps=0", "data.heldout=",
        "loss.contrastive_weight=1.0"], *extra))


def _train_step(cfg, micro_batches: list[dict]):
    """One optimizer step of `plain_train_step`: (metrics, the gradient of each parameter it applied)."""
    from lcl_megatron.parallel import init_distributed
    from lcl_megatron.training.engine import build_engine
    from lcl_megatron.training.initial_model import build_initial_model
    from lcl_megatron.training.step import plain_train_step

    init_distributed(cfg.parallel)
    engine = build_engine(cfg, build_initial_model(cfg))
    applied = {}
    update = engine.step

    def step_recording_gradients():
        if engine.is_gradient_accumulation_boundary():
            applied.update({name: p.grad.detach().clone() for name, p in engine.module.named_parameters()})
        update()

    engine.step = step_recording_gradients
    metrics = plain_train_step(engine, iter(micro_batches), cfg, step=1)
    return metrics, applied


@pytest.fixture(scope="module")
def big_batch():
    """Micro-batch 16, no accumulation: the step to match."""
    return _train_step(_config(16, 1), _micro_batches(_samples(16), 16))


def _assert_same_step(got, want):
    metrics, grads = got
    ref_metrics, ref_grads = want
    for key in ("loss", "generation_loss", "contrastive_loss", "regression_loss", "logit_scale", "tokens", "images",
                "samples"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-7), key
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        # Round-off of fp32 sums in another order: relative to the tensor's largest entry (and an absolute
        # floor for tensors whose true gradient is zero, such as the key bias under softmax).
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-7, msg=name)


@pytest.mark.parametrize("micro_batch_size", [8, 4])
def test_accumulated_micro_batches_train_as_one_batch(big_batch, micro_batch_size):
    accumulation = 16 // micro_batch_size
    got = _train_step(_config(micro_batch_size, accumulation), _micro_batches(_samples(16), micro_batch_size))
    assert big_batch[0]["contrastive_loss"] > 0 and big_batch[1]["logit_scale"].abs().sum() > 0
    _assert_same_step(got, big_batch)


def test_packed_micro_batches_train_as_one_batch():
    """Packed rows: the micro-batches hold different numbers of samples, images and tokens."""
    from lcl_megatron.training.step import samples_in

    whole, rows = _packed_micro_batches(_samples(16), 1)
    halves, half = _packed_micro_batches(_samples(16), 2)
    assert samples_in(halves[0]) != samples_in(halves[1]) and len(halves[0]["images"]) != len(halves[1]["images"])
    one = _train_step(_config(rows, 1, "data.packing=true"), whole)
    _assert_same_step(_train_step(_config(half, 2, "data.packing=true"), halves), one)


def test_regression_and_generation_alone_are_normalised_over_the_step():
    """Without the contrastive term no features are cached; the step's counts still normalise the losses."""
    off = ("loss.contrastive_weight=0", "loss.regression_weight=1")
    one = _train_step(_config(16, 1, *off), _micro_batches(_samples(16), 16))
    _assert_same_step(_train_step(_config(8, 2, *off), _micro_batches(_samples(16), 8)), one)


def test_turned_off_each_micro_batch_is_its_own_batch(big_batch):
    """loss.accumulate_negatives=false: the mean over micro-batches of each one's losses and gradients."""
    from lcl_megatron.model.lcl import LCLModel

    cfg = _config(8, 2, "loss.accumulate_negatives=false")
    micro_batches = _micro_batches(_samples(16), 8)
    got = _train_step(cfg, micro_batches)
    torch.manual_seed(cfg.train.seed)
    model = LCLModel.from_config(cfg)
    outs, grads = [], {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for batch in micro_batches:
        model.zero_grad()
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        out["loss"].backward()
        outs.append(out)
        for name, p in model.named_parameters():
            grads[name] += p.grad / len(micro_batches)
    want = {key: sum(float(o[key]) for o in outs) / len(outs)
            for key in ("loss", "generation_loss", "contrastive_loss", "regression_loss", "logit_scale")}
    want.update(tokens=sum(float(b["attention_mask"].sum()) for b in micro_batches),
                images=sum(b["images"].shape[0] for b in micro_batches), samples=16)
    _assert_same_step(got, (want, grads))
    # Fewer negatives: not the big batch's contrastive loss.
    assert got[0]["contrastive_loss"] < big_batch[0]["contrastive_loss"] - 1e-3
