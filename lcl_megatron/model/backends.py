"""Which modules implement the transformer layers on this machine: megatron-style backend spec providers.

A provider answers megatron-core's `BackendSpecProvider` questions (which
column/row-parallel linear, which norm, which core attention) and the layer
spec (model/layers.py) is built from its answers, so a CPU or GPU choice is
made once, here, and never by flags inside the model:

    LocalBackend             torch norms, megatron-core's linears (our sequence-parallel ones under
                             parallel.sp); runs anywhere, the only one on CPU
    ApexBackend              LocalBackend with apex's fused LayerNorm (CUDA, apex installed)
    TransformerEngineBackend Transformer Engine's norms and linears (CUDA, transformer_engine installed)

Every provider keeps our core attention (kernels/attention.py: SDPA, PyTorch varlen
or flash-attn) and leaves norm and linear unfused, so that parameter names, and
with them checkpoints, are the same whichever provider trained them.
"""

from __future__ import annotations

import importlib

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from lcl_megatron.model.core_attention import CoreAttention
from lcl_megatron.model.norms import Norm
from lcl_megatron.model.sequence_parallel import SequenceParallelColumnLinear, SequenceParallelRowLinear


class LocalBackend:
    """megatron-core's `BackendSpecProvider` for modules that run on CPU and GPU alike."""

    name = "megatron-core with torch norms"

    def __init__(self, sequence_parallel: bool = False):
        # Sequence parallelism is a property of the tower (the ViT's sequence may not divide over TP),
        # so each tower gets its own provider.
        self.sequence_parallel = sequence_parallel

    def column_parallel_linear(self) -> type:
        return SequenceParallelColumnLinear if self.sequence_parallel else ColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return SequenceParallelRowLinear if self.sequence_parallel else RowParallelLinear

    def fuse_layernorm_and_linear(self) -> bool:
        return False

    def column_parallel_layer_norm_linear(self):
        return None

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
        # Norms inside sequence-parallel layers see a slice of the sequence: their gradients are summed
        # over the TP group (model/sequence_parallel.py), which the flag on their parameters asks for.
        return ModuleSpec(module=Norm, params={"sequence_parallel": self.sequence_parallel})

    def core_attention(self) -> type:
        return CoreAttention

    def activation_func(self):
        return None  # the MLP applies TransformerConfig.activation_func


class ApexBackend(LocalBackend):
    """apex's fused LayerNorm kernel (megatron-core's FusedLayerNorm); RMSNorm stays torch's."""

    name = "megatron-core with apex fused LayerNorm"

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
        if rms_norm:
            return super().layer_norm(rms_norm, for_qk)
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        return ModuleSpec(module=Norm, params={"sequence_parallel": self.sequence_parallel, "norm_class": FusedLayerNorm})


class TransformerEngineBackend(LocalBackend):
    """Transformer Engine's norms and tensor-parallel linears (our sequence-parallel linears under parallel.sp)."""

    name = "Transformer Engine norms and linears"

    def column_parallel_linear(self) -> type:
        if self.sequence_parallel:
            return super().column_parallel_linear()
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

        return TEColumnParallelLinear

    def row_parallel_linear(self) -> type:
        if self.sequence_parallel:
            return super().row_parallel_linear()
        from megatron.core.extensions.transformer_engine import TERowParallelLinear

        return TERowParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
        from megatron.core.extensions.transformer_engine import TENorm

        return ModuleSpec(module=Norm, params={"sequence_parallel": self.sequence_parallel, "norm_class": TENorm})


def imports(package: str) -> bool:
    """Whether `package` imports here (a broken or CPU-only build counts as absent)."""
    try:
        importlib.import_module(package)
    except Exception:
        return False
    return True


def choose_backend(on_cuda: bool, have_transformer_engine: bool, have_apex: bool) -> type[LocalBackend]:
    """The decision table: on CUDA Transformer Engine, else apex, else local; off CUDA always local
    (both extensions are CUDA-only)."""
    if not on_cuda:
        return LocalBackend
    if have_transformer_engine:
        return TransformerEngineBackend
    if have_apex:
        return ApexBackend
    return LocalBackend


def backend_for_this_machine() -> type[LocalBackend]:
    import torch

    on_cuda = torch.cuda.is_available()
    return choose_backend(on_cuda, on_cuda and imports("transformer_engine"), on_cuda and imports("apex"))
