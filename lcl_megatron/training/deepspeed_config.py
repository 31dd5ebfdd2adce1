"""The DeepSpeed config of a run, derived from ours."""

from __future__ import annotations

from lcl_megatron.config import Config

# Gradient buckets, in elements: large enough to keep the links busy, small enough to overlap with
# the backward pass (Megatron's default bucket is 40M parameters).
BUCKET_ELEMENTS = 50_000_000


def deepspeed_config(cfg: Config, dp_size: int, on_gpu: bool = False) -> dict:
    t = cfg.train
    bf16 = t.precision == "bf16"
    # DeepSpeed accumulates bf16 gradients in fp32 only in its ZeRO optimizers (stage 1 is its BF16
    # optimizer): bf16 runs use at least stage 1, which with one data-parallel rank shards nothing.
    stage = max(1, cfg.parallel.zero_stage) if bf16 else cfg.parallel.zero_stage
    zero = {"stage": stage}
    if on_gpu and stage > 0:
        # Reduce gradient buckets while the backward pass goes on (CUDA streams; gloo has none).
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=BUCKET_ELEMENTS,
                    allgather_bucket_size=BUCKET_ELEMENTS)
        if stage == 3:
            zero.update(stage3_prefetch_bucket_size=BUCKET_ELEMENTS, stage3_param_persistence_threshold=100_000)
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accumulation,
        "train_batch_size": t.micro_batch_size * t.grad_accumulation * dp_size,
        "zero_optimization": zero,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        # Stages send more than one tensor that needs a gradient (the image latents ride along for
        # the contrastive loss); DeepSpeed's partitioned pipe tensors carry only the first one.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # bf16 compute, fp32 everything that accumulates: gradients summed over micro-batches and
        # reduced over data-parallel ranks in fp32 (DeepSpeed's default is the model's dtype).
        # DeepSpeed casts every parameter to bf16; the model's fp32 ones (the temperature) are pointed
        # back at their fp32 masters by training/engine.py. Rotary angles are computed in fp32, never cast.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    return config
