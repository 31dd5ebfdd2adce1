"""The temperature parameter is clamped to [0, ln 100] after every optimizer step, under every layout.

Runs start above the cap (model.init_logit_scale=5): the first step uses exp(5), as the
reference would before its first clamp, and the second exactly exp(ln 100) in fp32 (the
masters DeepSpeed keeps are clamped too, else the next update would undo it). The parameter
stays fp32 under bf16 training: a bf16 copy would round ln 100 (4.605) to 4.594, a scale of 98.9.
"""

import math

import pytest
import torch

from lcl_megatron.checkpoint.consolidated import read_checkpoint

from tests.support.launch import read_metrics, run_lcl, with_overrides
from tests.support.configs import TINY

CAP = math.log(100)


def _train(tmp_path, nproc=1, *layout):
    run_dir = tmp_path / "run"
    run_lcl(["train", "--config", "configs/demo.yaml",
             *with_overrides(TINY, "train.steps=2", "train.micro_batch_size=4", "model.init_logit_scale=5.0",
                             "optim.lr=1e-2", "schedule.warmup_steps=0", *layout), f"run.dir={run_dir}"], nproc=nproc)
    metrics = read_metrics(run_dir)
    # the consolidated weights: model.safetensors, or one part per pipeline stage
    saved = read_checkpoint(run_dir / "checkpoints" / "step_00000002", check=False)[1]["logit_scale"]
    return metrics, saved


def _check(metrics, saved):
    assert metrics[0]["logit_scale"] == pytest.approx(math.exp(5.0), rel=1e-6)  # used as initialised
    assert metrics[1]["logit_scale"] == pytest.approx(100.0, rel=1e-6)  # clamped to ln 100 after step 1
    assert saved.dtype == torch.float32
    assert float(saved) <= CAP + 1e-6 and float(saved) >= CAP - 0.05


def test_clamped_after_each_step_single_process(tmp_path):
    _check(*_train(tmp_path))


def test_gradient_at_the_cap_is_not_zero():
    """What the old clamp-at-use lost: at the cap, the loss still moves the parameter."""
    from lcl_megatron.model.dims import exp_logit_scale

    param = torch.nn.Parameter(torch.tensor([CAP]))
    exp_logit_scale(param).backward()
    assert float(param.grad) == pytest.approx(100.0)


# ZeRO-3 in bf16 covers its fp32 case too: the same partitions clamped, plus the fp32 master it computes with.
@pytest.mark.parametrize("nproc, layout", [(2, ["parallel.zero_stage=3", "train.precision=bf16"]),
                                           (2, ["parallel.zero_stage=1", "train.precision=bf16"]),
                                           (2, ["parallel.pp=2"])], ids=["zero3_bf16", "zero1_bf16", "pp2"])
def test_clamped_under_parallel_layouts(tmp_path, nproc, layout):
    _check(*_train(tmp_path, nproc, *layout))


def test_built_in_fp32_whatever_the_precision():
    from lcl_megatron.config import load_config
    from lcl_megatron.model.build import build_model

    model = build_model(load_config(None, TINY + ["train.precision=bf16", "model.init_logit_scale=4.6"]))
    assert model.logit_scale.dtype == torch.float32 and model.logit_scale.item() == torch.tensor(4.6).item()
    assert model.text.lm_head.output_layer.weight.dtype == torch.bfloat16
