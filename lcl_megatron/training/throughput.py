"""What a step achieves: model FLOPs utilisation (MFU) and peak memory.

MFU is the model FLOPs of a step (the formulas of `lcl plan`: 6 x parameters x
tokens for every matrix product plus attention, no recomputation) divided by
the step time and the devices' peak. GPU peaks are the vendors' dense numbers
for the training dtype (bf16, or TF32 for fp32 matmuls); on a CPU there is no
published peak to trust, so the rate of a large matmul in the training dtype,
measured once, stands in for it.
"""

from __future__ import annotations

import functools
import resource
import sys
import time

import torch

from lcl_megatron.config import Config

# Dense tensor-core TFLOP/s per GPU: (bf16, tf32). Looked up by the first name contained in
# torch.cuda.get_device_name(), so more specific names come first.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0)),
    ("H200", (989.0, 494.0)),
    ("H100", (989.0, 494.0)),
    ("GH200", (989.0, 494.0)),
    ("B200", (2250.0, 1100.0)),
    ("A100", (312.0, 156.0)),
    ("L40S", (362.0, 183.0)),
    ("A10", (125.0, 62.5)),
)


@functools.cache
def peak_flops(device_type: str, precision: str) -> tuple[float, str]:
    """(FLOP/s per device, where the number comes from) for the training dtype."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, (bf16, tf32) in GPU_PEAK_TFLOPS:
            if key in name:
                return (bf16 if precision == "bf16" else tf32) * 1e12, f"{name} datasheet"
        return measured_matmul_flops("cuda", precision), f"{name}: measured matmul rate"
    # A CPU without bf16 matrix units takes minutes over 2048^3 bf16 products; 512^3 measures the same rate.
    return measured_matmul_flops(device_type, precision, size=512), "measured matmul rate"


def measured_matmul_flops(device_type: str, precision: str, size: int = 2048, repeats: int = 5) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=dtype, device=device_type)
    b = torch.randn(size, size, dtype=dtype, device=device_type)
    a @ b  # warm-up
    synchronize(device_type)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device_type)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def synchronize(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


class ModelFlops:
    """Model FLOPs of a step from the images and tokens it really held.

    `lcl plan`'s formulas are affine in the images per micro-batch (each image
    costs the same ViT and pool-project work) and, for full rows, proportional
    in the text work; a step's FLOPs are the plan's at zero images scaled by the
    fraction of row positions holding real tokens, plus the plan's cost per image.
    """

    def __init__(self, cfg: Config, world_size: int, model):
        from lcl_megatron.plan import make_plan

        plans = [make_plan(cfg, nodes=1, gpus_per_node=world_size, images=n, model=model) for n in (1, 2)]
        one, two = (plan.model_flops for plan in plans)
        micro_batches = plans[0].layout.dp * cfg.train.grad_accumulation
        self.per_image = (two - one) / micro_batches
        self.text = one - (two - one)
        self.positions = micro_batches * cfg.train.micro_batch_size * cfg.model.text.context_length

    def __call__(self, images: float, tokens: float) -> float:
        """FLOPs of a step over all ranks that held `images` images and `tokens` real tokens in all."""
        return self.text * min(1.0, tokens / self.positions) + self.per_image * images


def peak_memory_bytes(device_type: str) -> int:
    """CUDA: the most memory tensors held; CPU: the process's resident high-water mark."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class StepMeter:
    """The throughput keys of a logged step: step time, MFU, peak memory, time waiting for data."""

    def __init__(self, cfg: Config, device_type: str, model):
        self.cfg, self.device_type, self.model = cfg, device_type, model
        self.model_flops = None  # built at the first logged step (a few plans), not before the first step

    def measure(self, seconds: float, waited: float, *, images: float, tokens: float) -> dict:
        if self.model_flops is None:
            world = torch.distributed.get_world_size()
            self.model_flops = ModelFlops(self.cfg, world, self.model)
            self.peak = peak_flops(self.device_type, self.cfg.train.precision)[0] * world
        return {"step_time_s": seconds, "mfu": self.model_flops(images, tokens) / seconds / self.peak,
                "peak_memory_gib": peak_memory_bytes(self.device_type) / 2**30,
                "data_wait_fraction": min(1.0, waited / seconds)}
