"""`lcl bench train`: samples/s, tokens/s, MFU and peak memory of the training step of a config.

    lcl bench train --config configs/lcl_vit_l14_llama.yaml --synthetic [--steps 20] [key=value ...]
    torchrun --nproc-per-node 8 -m lcl_megatron.cli bench train --config C --synthetic

It times `lcl train`'s own step (the DeepSpeed engine with the config's layout
and precision) after a few warm-up steps. `--synthetic` feeds full rows in the
config's shape (random pixels, each row holding its share of the images `lcl
plan` expects per micro-batch, the rest text), so a machine without the data,
such as a freshly lent GPU, measures the model alone; without it the config's
data is read as training reads it. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from lcl_megatron import tokens
from lcl_megatron.config import Config, ConfigError, load_config, validate_config, world_size_from_env
from lcl_megatron.layout import Layout


def synthetic_batches(cfg: Config, images_per_microbatch: int, seed: int = 0):
    """Endless micro-batches of full rows: images spread over the rows, text everywhere else."""
    v, t = cfg.model.vision, cfg.model.text
    rows, length, p = cfg.train.micro_batch_size, t.context_length, v.num_patches
    per_row = [images_per_microbatch // rows + (r < images_per_microbatch % rows) for r in range(rows)]
    generator = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(256, 40000, (rows, length), generator=generator)
        for r, count in enumerate(per_row):
            ids[r, 0], ids[r, -1] = tokens.SOT_ID, tokens.EOT_ID
            gap = (length - 2 - count * (p + 2)) // (count + 1)
            for i in range(count):
                start = 1 + gap * (i + 1) + i * (p + 2)
                ids[r, start], ids[r, start + 1: start + 1 + p], ids[r, start + 1 + p] = \
                    tokens.SOI_ID, tokens.IMG_ID, tokens.EOI_ID
        yield {"images": torch.randn(sum(per_row), 3, v.image_size, v.image_size, generator=generator),
               "input_ids": ids, "attention_mask": torch.ones(rows, length, dtype=torch.bool)}


def step_config(path: str, overrides: list[str], synthetic: bool) -> Config:
    """The checked config of a measured step (ConfigError: one line, exit 2); synthetic rows need
    no data on this machine."""
    cfg = load_config(path, overrides, validate=False)
    validate_config(cfg, check_data=not synthetic)
    Layout.of(cfg, world_size_from_env())
    return cfg


def prepare_steps(cfg: Config, synthetic: bool):
    """(model, engine, step function, micro-batches, device type) of `lcl train`'s step for `cfg`."""
    from megatron.core import parallel_state

    from lcl_megatron.parallel import init_distributed
    from lcl_megatron.plan.costs import images_per_microbatch
    from lcl_megatron.training.engine import build_engine, is_pipeline
    from lcl_megatron.training.initial_model import build_initial_model
    from lcl_megatron.training.step import pipeline_train_step, plain_train_step
    from lcl_megatron.data.global_batch import build_loader

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    init_distributed(cfg.parallel, timeout_s=cfg.parallel.timeout_s)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    model = build_initial_model(cfg)
    engine = build_engine(cfg, model)
    step_fn = pipeline_train_step if is_pipeline(engine) else plain_train_step
    batches = synthetic_batches(cfg, images_per_microbatch(cfg), seed=dp_rank) if synthetic \
        else iter(build_loader(cfg, dp_rank, dp_size))
    engine.train()
    return model, engine, step_fn, batches, torch.device(engine.device).type


def bench_train(cfg: Config, steps: int, warmup: int, synthetic: bool) -> dict:
    from megatron.core import parallel_state

    from lcl_megatron.training.throughput import ModelFlops, peak_flops, peak_memory_bytes, synchronize

    model, engine, step_fn, batches, device_type = prepare_steps(cfg, synthetic)
    world, dp_size = torch.distributed.get_world_size(), parallel_state.get_data_parallel_world_size()
    for step in range(warmup):
        step_fn(engine, batches, cfg, step + 1)
    synchronize(device_type)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    tokens = images = 0.0
    for step in range(warmup, warmup + steps):
        metrics = step_fn(engine, batches, cfg, step + 1)
        tokens, images = tokens + metrics["tokens"] * dp_size, images + metrics["images"] * dp_size
    synchronize(device_type)
    seconds = (time.perf_counter() - start) / steps
    peak, peak_source = peak_flops(device_type, cfg.train.precision)
    flops = ModelFlops(cfg, world, model)(images / steps, tokens / steps)
    samples = cfg.train.micro_batch_size * cfg.train.grad_accumulation * dp_size
    return {"config": cfg.run.name, "device": torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
            "world_size": world, "precision": cfg.train.precision, "synthetic": synthetic,
            "global_batch": samples, "step_s": seconds, "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / steps / seconds, "model_tflop_per_step": flops / 1e12,
            "mfu": flops / seconds / (peak * world), "peak_flops_per_device": peak,
            "peak_flops_source": peak_source, "peak_memory_gib": peak_memory_bytes(device_type) / 2**30}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lcl bench train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  lcl bench train --config configs/demo.yaml --synthetic --steps 5 --warmup 2")
    p.add_argument("--config", required=True, help="YAML config whose model, layout and precision are measured")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--synthetic", action="store_true", help="random rows in the config's shape instead of its data")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    cfg = step_config(args.config, args.overrides, args.synthetic)
    result = bench_train(cfg, args.steps, args.warmup, args.synthetic)
    if torch.distributed.get_rank() == 0:
        print(f"{result['config']} on {result['world_size']} x {result['device']} ({result['precision']}): "
              f"{result['step_s']:.3f} s/step, {result['samples_per_s']:.1f} samples/s, "
              f"{result['tokens_per_s']:,.0f} tokens/s, MFU {result['mfu']:.1%}, "
              f"peak memory {result['peak_memory_gib']:.1f} GiB", file=sys.stderr)
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                          for k, v in result.items()}))
    return 0
