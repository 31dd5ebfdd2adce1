"""LayerNorm / RMSNorm for megatron-core layer specs, usable with sequence parallelism.

Under sequence parallelism each tensor-parallel rank normalises a different
slice of the sequence, so the norm's gradients must be summed over the TP
group: megatron finds such parameters by their `sequence_parallel` attribute.
"""

import torch


def build_norm(config, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False):
    if config.normalization == "RMSNorm":
        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
    else:
        norm = torch.nn.LayerNorm(hidden_size, eps=eps)
    for p in norm.parameters():
        p.sequence_parallel = sequence_parallel
    return norm


class Norm:
    """Spec-compatible constructor for norms inside the layers, where sequence parallelism applies:
    torch's norms, or `norm_class` (a megatron-style norm taking config, hidden_size, eps)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False, norm_class=None,
                **_unused):
        if norm_class is None:
            return build_norm(config, hidden_size, eps, sequence_parallel=sequence_parallel)
        norm = norm_class(config, hidden_size, eps)
        for p in norm.parameters():
            p.sequence_parallel = sequence_parallel
        return norm
