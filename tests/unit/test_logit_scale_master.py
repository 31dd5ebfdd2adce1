"""The temperature computed from a bf16-held parameter: its fp32 master's value, the parameter's gradient."""

import math

import pytest
import torch

from lcl_megatron.model.dims import exp_logit_scale
from lcl_megatron.model.names import FP32_MASTER_ATTRIBUTE

CAP = math.log(100)


def test_value_is_the_fp32_master_and_the_gradient_reaches_the_parameter():
    param = torch.nn.Parameter(torch.tensor([CAP], dtype=torch.bfloat16))  # 4.594 in bf16: a scale of 98.9
    assert float(exp_logit_scale(param)) == pytest.approx(98.86, abs=0.01)
    setattr(param, FP32_MASTER_ATTRIBUTE, torch.tensor([CAP]))
    scale = exp_logit_scale(param)
    assert scale.dtype == torch.float32 and float(scale) == pytest.approx(100.0, rel=1e-6)
    scale.backward()
    assert param.grad is not None and float(param.grad) == pytest.approx(100.0, rel=1e-2)  # d exp(s)/ds, in bf16
