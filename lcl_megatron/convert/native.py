"""Our checkpoint's weights as plain tensors, and strict loading with a readable mismatch report."""

from __future__ import annotations

import torch

from lcl_megatron.errors import UserError


class CheckpointMismatch(UserError, ValueError):
    """Tensors that do not fit the model: one line listing them (CLI exit code 2)."""


def model_tensors(state_dict: dict) -> dict:
    """Drop megatron's `_extra_state` entries (None for our local layers)."""
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _summary(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tensors(expected: dict, given: dict, what: str = "checkpoint") -> None:
    """`expected` and `given` map names to tensors or shapes; raise CheckpointMismatch on any difference."""
    shape = lambda v: tuple(v.shape) if hasattr(v, "shape") else tuple(v)
    missing = expected.keys() - given.keys()
    unexpected = given.keys() - expected.keys()
    wrong = [f"{k} {shape(given[k])} != {shape(expected[k])}" for k in expected.keys() & given.keys()
             if shape(given[k]) != shape(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing {_summary(missing)}")
    if unexpected:
        problems.append(f"unexpected {_summary(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {_summary(wrong)}")
    if problems:
        raise CheckpointMismatch(f"{what} does not match the model: " + "; ".join(problems))


def load_native_state_dict(model: torch.nn.Module, tensors: dict) -> None:
    expected = model_tensors(model.state_dict())
    check_tensors(expected, tensors)
    model.load_state_dict(tensors, strict=False)
