"""`lcl bench train`: samples/s, tokens/s, MFU and peak memory of the training step of a config.

    lcl bench train --config configs/lcl_vit_l14_llama.yaml --synthetic [--steps 20] [key=value ...]
    torchrun --nproc-per-node 8 -m lcl_megatron.cli bench train --config C --synthetic

It times `lcl train`'s own step (the DeepSpeed engine with the config's layout
and precision) after a few warm-up steps. `--synthetic` feeds full rows in the
config's shape (random pixels, each row holding its share of the images `lcl
plan` expects per micro-batch, the rest text), so a machine without the data,
such as a freshly lent GPU, measures the model alone; without it the config's
data is read as training reads it. Prints one JSON line.

    lcl bench train --config configs/bench_reference_pairs.yaml --reference [--write BENCHMARKS.md]

`--reference` times the reference's training step (bench/reference_train.py)
beside ours on the config's shape, both on the same image-text pair shards
that the bench writes (samples = pairs): the reference's rows hold one pair
each, ours are read as the config says (packed by default). Both sides train
in this process with the same threads, from batches decoded beforehand (the
loader is not timed), in alternating rounds so that the load of a shared
machine falls on both alike; the ratio is the median over the rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lcl_megatron import tokens
from lcl_megatron.config import Config, ConfigError, load_config, validate_config, world_size_from_env
from lcl_megatron.errors import UserError
from lcl_megatron.layout import Layout
from lcl_megatron.utils import write_markdown_section

REFERENCE_SECTION = "## Training step against the reference"
SPEEDUP_GOAL = 2.0


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
    from lcl_megatron.training.batches import micro_batch_source, reads_data
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
    reader = reads_data(parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank())
    source = (synthetic_batches(cfg, images_per_microbatch(cfg), seed=dp_rank) if synthetic
              else build_loader(cfg, dp_rank, dp_size)) if reader else None
    batches = micro_batch_source(source, engine, reader)  # as `lcl train` feeds its step
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


def timed_round(step, steps: int) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, samples) of `steps` calls of `step`, which
    returns the samples it trained on."""
    wall, cpu, samples = time.perf_counter(), time.process_time(), 0.0
    for _ in range(steps):
        samples += step()
    return time.perf_counter() - wall, time.process_time() - cpu, samples


def bench_against_reference(cfg: Config, oracle, rounds: int, steps: int, warmup: int,
                            reference_batch: int, shards_dir: Path) -> dict:
    from lcl_megatron.bench.reference_train import ReferenceStep, reference_rows, write_pair_shards
    from lcl_megatron.data.global_batch import build_loader
    from lcl_megatron.data.bench import machine_name

    distinct = 8  # batches decoded per side, then repeated: the loader is not what is timed
    write_pair_shards(shards_dir, shards=4, per_shard=(distinct + 1) * max(reference_batch, 64) // 4,
                      image_size=cfg.model.vision.image_size, seed=cfg.train.seed)
    cfg.data.path, cfg.data.num_workers = [str(shards_dir)], 0
    model, engine, step_fn, batches, device_type = prepare_steps(cfg, synthetic=False)
    ours = itertools.cycle([next(batches) for _ in range(distinct)])
    reference_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=False),
                                        train=dataclasses.replace(cfg.train, micro_batch_size=reference_batch))
    rows = iter(build_loader(reference_cfg, 0, 1))
    theirs = itertools.cycle([reference_rows(next(rows)) for _ in range(distinct)])
    reference_step = ReferenceStep(oracle, cfg, seed=cfg.train.seed)
    counter = itertools.count(1)
    last = {}

    def our_step() -> float:
        last.update(step_fn(engine, iter([next(ours)]), cfg, next(counter)))
        return last["samples"]

    def their_step() -> float:
        images, input_ids = next(theirs)
        last["reference_loss"] = reference_step(images, input_ids).item()
        return float(images.shape[0])

    for _ in range(warmup):
        our_step(), their_step()
    timings = {"ours": [], "reference": []}
    for r in range(rounds):  # which side goes first alternates, so that neither always follows the other
        for side in (("ours", "reference") if r % 2 else ("reference", "ours")):
            timings[side].append(timed_round(our_step if side == "ours" else their_step, steps))
    rates = {side: [samples / wall for wall, _, samples in runs] for side, runs in timings.items()}
    cpu_rates = {side: [samples / cpu for _, cpu, samples in runs] for side, runs in timings.items()}
    ours_runs = timings["ours"]
    return {"config": cfg.run.name, "date": datetime.date.today().isoformat(),
            "machine": machine_name(), "load_average": os.getloadavg()[0],
            "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": cfg.train.precision,
            "packing": cfg.data.packing, "rows_per_step": cfg.train.micro_batch_size,
            "reference_rows_per_step": reference_batch, "rounds": rounds, "steps_per_round": steps,
            "samples_per_step": sum(s for *_, s in ours_runs) / (rounds * steps),
            "samples_per_s": statistics.median(rates["ours"]),
            "reference_samples_per_s": statistics.median(rates["reference"]),
            "speedup": statistics.median(o / t for o, t in zip(rates["ours"], rates["reference"])),
            "speedup_cpu_time": statistics.median(o / t for o, t in zip(cpu_rates["ours"], cpu_rates["reference"])),
            "loss": last["loss"], "reference_loss": last["reference_loss"]}


def reference_markdown(result: dict) -> str:
    r = result
    met = "met" if r["speedup"] >= SPEEDUP_GOAL else "NOT met"
    return "\n".join([
        REFERENCE_SECTION, "",
        f"`lcl bench train --config configs/bench_reference_pairs.yaml --reference`, {r['date']}, on "
        f"{r['machine']} (load average {r['load_average']:.1f}), torch threads: {r['threads']} on both sides, "
        f"torch {r['torch']}, one process. The reference's small shape (ViT 4 x 128, patch 8, 32 px; LM 4 x 128, "
        f"context 128; image-text pairs with ~20-token captions; forward + backward + AdamW), both sides on the "
        f"same pair shards, from batches decoded beforehand, in {r['rounds']} alternating rounds of "
        f"{r['steps_per_round']} steps; samples are pairs; medians over the rounds. The reference (the tests' "
        f"plain-torch oracle of its model and loss): one pair per padded row, {r['reference_rows_per_step']} "
        f"rows a step, LM head over every position, `torch.optim.AdamW`. Ours: `lcl train`'s step through the "
        f"DeepSpeed engine, {r['precision']}, {'packed' if r['packing'] else 'unpacked'} rows, "
        f"{r['rows_per_step']} rows a step ({r['samples_per_step']:.1f} pairs).", "",
        "| side | samples/s | last loss |", "|---|---|---|",
        f"| reference | {r['reference_samples_per_s']:.1f} | {r['reference_loss']:.3f} |",
        f"| ours | {r['samples_per_s']:.1f} | {r['loss']:.3f} |", "",
        f"- samples/s, ours / reference: {r['speedup']:.2f}x ({met}; goal >= {SPEEDUP_GOAL:g}x); "
        f"by CPU time of the process: {r['speedup_cpu_time']:.2f}x",
    ]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lcl bench train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  lcl bench train --config configs/demo.yaml --synthetic --steps 5 --warmup 2")
    p.add_argument("--config", required=True, help="YAML config whose model, layout and precision are measured")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--synthetic", action="store_true", help="random rows in the config's shape instead of its data")
    p.add_argument("--reference", action="store_true",
                   help="also time the reference's step on pair shards, alternating with ours (--steps per round)")
    p.add_argument("--rounds", type=int, default=5, help="--reference: alternating rounds (default 5)")
    p.add_argument("--reference-batch", type=int, default=32, help="--reference: the reference's rows a step (default 32)")
    p.add_argument("--write", metavar="BENCHMARKS_MD", help="--reference: put the row into this file's section")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.reference_batch < 1:
        raise ConfigError("--steps, --rounds and --reference-batch must be >= 1 and --warmup >= 0")
    if args.reference and args.synthetic:
        raise ConfigError("--reference times both sides on pair shards it writes; drop --synthetic")
    if args.write and not args.reference:
        raise ConfigError("--write records the comparison with the reference: add --reference")
    cfg = step_config(args.config, args.overrides, args.synthetic or args.reference)
    if args.reference:
        return main_against_reference(cfg, args)
    result = bench_train(cfg, args.steps, args.warmup, args.synthetic)
    if torch.distributed.get_rank() == 0:
        print(f"{result['config']} on {result['world_size']} x {result['device']} ({result['precision']}): "
              f"{result['step_s']:.3f} s/step, {result['samples_per_s']:.1f} samples/s, "
              f"{result['tokens_per_s']:,.0f} tokens/s, MFU {result['mfu']:.1%}, "
              f"peak memory {result['peak_memory_gib']:.1f} GiB", file=sys.stderr)
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                          for k, v in result.items()}))
    return 0


def main_against_reference(cfg: Config, args) -> int:
    from lcl_megatron.bench.reference_train import load_oracle, model_config

    oracle = load_oracle()
    if oracle is None:
        raise UserError("reference oracle not available (a source checkout has it: tests/support/reference_lcl.py)")
    model_config(cfg)  # a shape the reference cannot build fails here, before any work
    with tempfile.TemporaryDirectory() as shards_dir:
        result = bench_against_reference(cfg, oracle, args.rounds, args.steps, args.warmup,
                                         args.reference_batch, Path(shards_dir))
    print(f"{result['config']}: ours {result['samples_per_s']:.1f} samples/s, reference "
          f"{result['reference_samples_per_s']:.1f}: {result['speedup']:.2f}x", file=sys.stderr)
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()}))
    if args.write:
        write_markdown_section(Path(args.write), REFERENCE_SECTION, reference_markdown(result))
    return 0
