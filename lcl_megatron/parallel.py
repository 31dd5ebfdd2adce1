"""Process groups: torch.distributed, megatron-core's parallel_state and DeepSpeed's view of them.

Rank layout (Megatron's and DeepSpeed's alike): tensor-parallel ranks innermost,
then data-parallel, then pipeline stages. Even one process initialises all of
it, so the single-process path is the same code as the cluster path.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from lcl_megatron.config import ParallelConfig
from lcl_megatron.layout import Layout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelConfig, timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) and megatron-core's groups."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" not in os.environ:
            # A plain `lcl train` or an in-process tool: a world of one on a private port,
            # leaving the environment alone (child processes must not inherit it).
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1, timeout=timeout)
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it
        else:  # launched by torchrun / Slurm
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    layout = Layout(parallel, world=dist.get_world_size())  # a launcher's world that the layout cannot fill
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                                 pipeline_model_parallel_size=layout.pp)


class MegatronMPU:
    """megatron-core's groups under the `mpu` interface DeepSpeed expects.

    DeepSpeed's "model parallel" is tensor parallelism (pipeline stages are its
    own engine's business); data parallelism is megatron's data-parallel group.
    """

    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)


def verify_groups_match(engine) -> None:
    """DeepSpeed must reduce gradients over exactly megatron's data-parallel ranks."""
    ours = dist.get_process_group_ranks(parallel_state.get_data_parallel_group())
    theirs_group = getattr(engine, "data_parallel_group", None) or engine.seq_data_parallel_group
    theirs = dist.get_process_group_ranks(theirs_group)
    if sorted(ours) != sorted(theirs):
        raise RuntimeError(f"DeepSpeed's data-parallel ranks {theirs} differ from megatron-core's {ours}")


def destroy_process_groups() -> None:
    """Every process group down while the interpreter is whole: megatron-core's, then torch.distributed's
    through DeepSpeed when it runs (so that it also drops the references it keeps to them).

    Groups still alive at exit are torn down by interpreter and C++ static teardown in no set
    order, their gloo/NCCL and TCPStore threads still running: a rank can then abort
    ("terminate called without an active exception") after its checkpoint was written."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        return
    deepspeed_comm = sys.modules.get("deepspeed.comm")  # never imported: DeepSpeed holds no group
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
