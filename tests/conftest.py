"""Test session settings and the test tiers.

Tiers, by folder: `tests/unit` (one process: no subprocesses, no process group of more than
this process, which megatron-core's layers need even alone: `make test-fast`),
`tests/integration` (several processes, DeepSpeed engines, `lcl` end to end), `tests/cluster`
(a real Slurm cluster). `make test` runs all three. A unit test that starts a process or joins
other processes fails with a message naming the tier it belongs to.
"""

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: kernels run in its interpreter
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Fixtures every tier may use: poisoned outputs for kernels, the Slurm cluster.
pytest_plugins = ["tests.support.kernels", "tests.support.slurm_cluster"]

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "cluster")


def tier_of(path: Path) -> str | None:
    try:
        first = Path(path).resolve().relative_to(TESTS).parts[0]
    except ValueError:
        return None
    return first if first in TIERS else None


def pytest_collection_modifyitems(items):
    for item in items:
        tier = tier_of(item.path)
        if tier:
            item.add_marker(getattr(pytest.mark, tier))


class _UnitTierViolation(AssertionError):
    pass


def _refuse(what):
    def refuse(*args, **kwargs):
        raise _UnitTierViolation(f"a unit test may not {what}: move it to tests/integration")
    return refuse


def _world_of_one_only(init_process_group):
    def init(*args, **kwargs):
        if kwargs.get("world_size") != 1:
            _refuse("join a process group of several processes")()
        return init_process_group(*args, **kwargs)
    return init


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Unit tests run with process creation and process groups refused, fixtures included."""
    if tier_of(item.path) != "unit":
        yield
        return
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "_execute_child", _refuse("start a subprocess"))
        mp.setattr(os, "fork", _refuse("fork a process"))
        init = _world_of_one_only(c10d.init_process_group)
        mp.setattr(dist, "init_process_group", init)
        mp.setattr(c10d, "init_process_group", init)
        yield
