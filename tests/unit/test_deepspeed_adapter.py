"""The DeepSpeed internals training/engine.py relies on still exist in the installed DeepSpeed."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from lcl_megatron.training.engine import PRIVATE_API, UPDATE_CALLERS


@pytest.mark.parametrize("module,cls,name,params", PRIVATE_API, ids=[f"{c}.{n}" for _, c, n, _ in PRIVATE_API])
def test_private_deepspeed_api_is_there(module, cls, name, params):
    owner = importlib.import_module(module)
    if cls is not None:
        owner = getattr(owner, cls)
    if params is not None:
        assert tuple(inspect.signature(getattr(owner, name)).parameters) == params
    else:
        assigned = re.search(rf"\.{name}\s*=", inspect.getsource(owner))
        assert assigned or name in getattr(owner, "__dataclass_fields__", {}), f"{module}.{cls} no longer sets {name}"


@pytest.mark.parametrize("module,cls,method", UPDATE_CALLERS)
def test_every_update_goes_through_the_hooked_method(module, cls, method):
    source = inspect.getsource(getattr(getattr(importlib.import_module(module), cls), method))
    assert "self._take_model_step(" in source


def test_pipeline_reporting_hook_is_there():
    """The loss stage's metrics reach every rank through PipelineModule.get_additional_losses."""
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.pipe.module import PipelineModule

    assert tuple(inspect.signature(PipelineModule.get_additional_losses).parameters) == ("self",)
    assert "self.module.get_additional_losses()" in inspect.getsource(PipelineEngine._exec_forward_pass)
