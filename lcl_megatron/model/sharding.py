"""Between the canonical (single-process) tensors and one tensor-parallel rank's shards.

megatron-core marks each split parameter with `tensor_model_parallel`,
`partition_dim` (0 for column-parallel and vocab-parallel, 1 for row-parallel).
Canonical tensors never carry TP padding: the vocabulary rows added to make the
vocab divisible by TP are dropped when gathering and zero-filled when sharding.
SwiGLU's fc1 holds [gate; up]; each rank holds [gate_r; up_r].
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from lcl_megatron.model.state import model_tensors


def _tp():
    if not parallel_state.model_parallel_is_initialized():
        return None, 1, 0
    return (parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())


def _is_glu_fc1(name: str, param) -> bool:
    return "mlp.linear_fc1" in name and getattr(param, "glu_fc1", False)


def mark_glu(model: torch.nn.Module) -> None:
    """Tag SwiGLU fc1 parameters, whose two halves are split over TP separately."""
    for module in model.modules():
        config = getattr(module, "config", None)
        fc1 = getattr(module, "linear_fc1", None)
        if fc1 is not None and config is not None and config.gated_linear_unit:
            for p in fc1.parameters():
                p.glu_fc1 = True


def shard_tensor(name: str, full: torch.Tensor, param, tp: int, rank: int) -> torch.Tensor:
    """The slice of canonical tensor `full` that this rank's `param` holds."""
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    local = param.shape[dim]
    if _is_glu_fc1(name, param):
        gate, up = full.chunk(2, dim=dim)
        half = local // 2
        return torch.cat([gate.narrow(dim, rank * half, half), up.narrow(dim, rank * half, half)], dim=dim)
    if full.shape[dim] < local * tp:  # vocabulary padding
        pad = list(full.shape)
        pad[dim] = local * tp - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad)], dim=dim)
    return full.narrow(dim, rank * local, local)


def load_canonical(model: torch.nn.Module, tensors: dict) -> None:
    """Load canonical tensors into this rank's (possibly TP-sharded) model."""
    _, tp, rank = _tp()
    params = dict(model.named_parameters())
    local = {}
    for name, full in tensors.items():
        param = params.get(name)
        local[name] = shard_tensor(name, full, param, tp, rank) if param is not None else full
    model.load_state_dict(local, strict=False)


def canonical_shape(name: str, shape, param, vocab_size: int) -> tuple:
    """The single-process shape of a tensor whose local (this TP rank's) shape is `shape`."""
    shape = list(shape)
    _, tp, _ = _tp()
    if param is not None and getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
        if name.endswith(("token_embedding.weight", "output_layer.weight")):
            shape[0] = vocab_size
    return tuple(shape)


def gather_tensor(name: str, local: torch.Tensor, param, shape: tuple) -> torch.Tensor:
    """Collective over the TP group: this rank's shard -> the canonical tensor of `shape`."""
    group, tp, _ = _tp()
    if tp > 1 and param is not None and getattr(param, "tensor_model_parallel", False):
        pieces = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        return join_shards(name, pieces, param, shape)
    return local[tuple(slice(0, n) for n in shape)].contiguous()


def join_shards(name: str, pieces: list[torch.Tensor], param, shape: tuple) -> torch.Tensor:
    """Every TP rank's shard of a split parameter, in rank order -> the canonical tensor of `shape`."""
    dim = param.partition_dim
    if _is_glu_fc1(name, param):
        halves = [p.chunk(2, dim=dim) for p in pieces]
        full = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    else:
        full = torch.cat(pieces, dim=dim)
    return full[tuple(slice(0, n) for n in shape)].contiguous()  # crops the vocabulary padding


def canonical_shapes(model: torch.nn.Module, vocab_size: int) -> dict:
    """Name -> single-process shape of every tensor, from this rank's shards (no communication)."""
    params = dict(model.named_parameters())
    return {name: canonical_shape(name, tensor.shape, params.get(name), vocab_size)
            for name, tensor in model_tensors(model.state_dict()).items()}


def gather_canonical(model: torch.nn.Module, canonical_shapes: dict) -> dict:
    """Collective over the TP group: this stage's tensors as canonical (unsharded, unpadded) tensors."""
    params = dict(model.named_parameters())
    return {name: gather_tensor(name, tensor, params.get(name), canonical_shapes[name])
            for name, tensor in model_tensors(model.state_dict()).items()}
