"""The training step, losses, metrics and evaluation with the model on an accelerator.

This machine has no GPU: `tests/fake_device.py` puts the model on a stand-in
device whose tensors hold real values, so every step really runs, and any
tensor left on the host (a batch not moved, a counter made on the CPU, a
collective on a host tensor, which NCCL refuses) raises as on a GPU. The
engines are the part of DeepSpeed the step functions call, run on that
device; DeepSpeed's own device handling is checked on a real GPU by
`make gpu-check`.
"""

import pytest
import torch
from torch import nn

from lcl_megatron.config import load_config
from tests.support.fake_device import DEVICE, FakeDevice
from tests.support.configs import TINY

pytestmark = pytest.mark.device

GRAD_ACCUMULATION = 2


def tiny_config(*extra):
    return load_config(None, TINY + [f"train.grad_accumulation={GRAD_ACCUMULATION}", "train.micro_batch_size=4",
                                     *extra])


class DeviceEngine:
    """DeepSpeed's engine as the plain step uses it: forward, backward, step at the accumulation boundary."""

    def __init__(self, model):
        self.module, self.device = model, DEVICE
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=False)
        self.micro_steps = 0

    def __call__(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def backward(self, loss):
        (loss / GRAD_ACCUMULATION).backward()

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % GRAD_ACCUMULATION == 0:
            self.optimizer.step()
            self.optimizer.zero_grad()

    def get_global_grad_norm(self):
        return torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in self.module.parameters()]))


class DevicePipelineEngine(DeviceEngine):
    """DeepSpeed's pipeline engine for one process holding every stage: it moves each micro-batch's
    inputs to the device (as `_exec_load_micro_batch` does), runs the stages in order (without
    gradient in `eval_batch`) and averages the loss stage's metrics over micro-batches (as its
    `get_additional_losses` reporting does)."""

    def __init__(self, stages):
        super().__init__(nn.Sequential(*stages))

    def is_first_stage(self):
        return True

    def is_last_stage(self):
        return True

    def eval_batch(self, data_iter, **_options):
        with torch.no_grad():
            for _ in range(GRAD_ACCUMULATION):
                inputs, _label = next(data_iter)
                self.module(tuple(t.clone().to(self.device) for t in inputs))

    def train_batch(self, data_iter):
        from lcl_megatron.model.pipeline import METRICS

        losses, metrics = [], []
        for _ in range(GRAD_ACCUMULATION):
            inputs, _label = next(data_iter)
            x = tuple(t.clone().to(self.device) for t in inputs)
            loss, reported = self.module(x)
            loss.backward()
            losses.append(loss.detach())
            metrics.append(reported)
            self.step()
        self.agg_additional_losses = dict(zip(METRICS, torch.stack(metrics).mean(0)))
        return torch.stack(losses).mean()


@pytest.fixture(scope="module")
def groups():
    from lcl_megatron.model.build import ensure_single_process_groups

    ensure_single_process_groups()


def _model_on_device(cfg):
    from lcl_megatron.model.lcl import LCLModel

    torch.manual_seed(cfg.train.seed)
    return LCLModel.from_config(cfg).to(DEVICE)


def _batches(cfg):
    from lcl_megatron.data.global_batch import build_loader

    return iter(build_loader(cfg, dp_rank=0, dp_size=1))


def _on_device(metrics: dict) -> None:
    for key, value in metrics.items():
        assert not isinstance(value, torch.Tensor) or value.device == DEVICE, key


@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_plain_step_runs_on_the_device_with_one_host_read(groups, impl):
    from lcl_megatron.training.step import plain_train_step

    cfg = tiny_config(f"loss.impl={impl}")
    batches = _batches(cfg)
    with FakeDevice() as device:
        engine = DeviceEngine(_model_on_device(cfg))
        before = [p.detach().cpu().clone() for p in engine.module.parameters()]
        device.host_reads = 0
        for step in (1, 2):
            metrics = plain_train_step(engine, batches, cfg, step)
        assert device.host_reads <= 2  # at most one device-to-host read per optimizer step
        _on_device(metrics)
        assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k != "grad_norm")
        after = [p.detach().cpu() for p in engine.module.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_pipeline_step_runs_on_the_device(groups):
    from lcl_megatron.model.pipeline import pipeline_layers
    from lcl_megatron.layout import max_images_per_microbatch
    from lcl_megatron.training.step import pipeline_train_step

    cfg = tiny_config()
    batches = _batches(cfg)
    with FakeDevice():
        model = _model_on_device(cfg)
        engine = DevicePipelineEngine(pipeline_layers(model, max_images_per_microbatch(cfg)))
        metrics = pipeline_train_step(engine, batches, cfg, 1)
    assert 0 < metrics["loss"] < 100 and metrics["tokens"] > 0


def test_evaluation_runs_on_the_device(groups):
    from lcl_megatron.eval.datasets import LabelledSet
    from lcl_megatron.eval.zeroshot import zeroshot_evaluate

    cfg = tiny_config()
    with FakeDevice():
        model = _model_on_device(cfg).eval()
        result = zeroshot_evaluate(model, LabelledSet.open("embedded:digits"), batch_size=128)
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0 and result["samples"] > 0


def test_every_loss_count_stays_on_the_device(groups):
    """Images without context and batches without images: the counts behind the normalisation."""
    from lcl_megatron import tokens

    cfg = tiny_config()
    p = cfg.model.vision.num_patches
    image = [tokens.SOI_ID] + [tokens.IMG_ID] * p + [tokens.EOI_ID]
    size, length = cfg.model.vision.image_size, cfg.model.text.context_length

    def rows(*token_rows):
        ids = torch.full((len(token_rows), length), tokens.PAD_ID)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for r, row in enumerate(token_rows):
            ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), True
        return ids, mask

    with_context = rows([tokens.SOT_ID, 320, 400] + image + [500, tokens.EOT_ID], image + [700, tokens.EOT_ID])
    text_only = rows([tokens.SOT_ID, 320, 400, tokens.EOT_ID])
    with FakeDevice():
        model = _model_on_device(cfg)
        for images, (ids, mask) in ((torch.randn(2, 3, size, size), with_context),
                                    (torch.zeros(0, 3, size, size), text_only)):
            out = model(images.to(DEVICE), ids.to(DEVICE), mask.to(DEVICE))
            out["loss"].backward()
            _on_device(out)
            assert torch.isfinite(out["loss"].cpu())
