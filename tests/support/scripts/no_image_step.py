"""Run under torchrun: train steps where some micro-batches hold no image at all.

Rank 0's micro-batches are text only; other ranks' hold images. Every layout
must complete the steps (no hang, no skipped collective) with finite losses.
Usage: torchrun ... tests/scripts/no_image_step.py RUN_DIR [key=value ...]
"""

import sys

import torch
import torch.distributed as dist

from lcl_megatron import tokens
from lcl_megatron.config import load_config
from lcl_megatron.parallel import init_distributed
from lcl_megatron.training.batches import micro_batch_source, reads_data
from lcl_megatron.training.engine import build_engine, is_pipeline
from lcl_megatron.training.initial_model import build_initial_model
from lcl_megatron.training.step import pipeline_train_step, plain_train_step


def batch(cfg, with_images: bool) -> dict:
    mbs, length = cfg.train.micro_batch_size, cfg.model.text.context_length
    p = cfg.model.vision.num_patches
    ids = torch.full((mbs, length), tokens.PAD_ID)
    mask = torch.zeros(mbs, length, dtype=torch.bool)
    n = 0
    for row in range(mbs):
        seq = [tokens.SOT_ID, 320 + row, 1000, 2000]
        if with_images:
            seq += [tokens.SOI_ID] + [tokens.IMG_ID] * p + [tokens.EOI_ID] + [3000]
            n += 1
        seq += [tokens.EOT_ID]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = True
    size = cfg.model.vision.image_size
    return {"images": torch.randn(n, 3, size, size), "input_ids": ids, "attention_mask": mask}


def main():
    run_dir, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config("configs/demo.yaml", overrides + [f"run.dir={run_dir}"])
    init_distributed(cfg.parallel, timeout_s=120)
    engine = build_engine(cfg, build_initial_model(cfg))
    step_fn = pipeline_train_step if is_pipeline(engine) else plain_train_step
    from megatron.core import parallel_state

    with_images = parallel_state.get_data_parallel_rank() != 0

    def batches():
        while True:
            yield batch(cfg, with_images)

    # As `lcl train` feeds the step: read by one rank per tensor-parallel group, nothing on later stages.
    reader = reads_data(parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank())
    it = micro_batch_source(batches(), engine, reader)
    for step in range(1, 3):
        metrics = step_fn(engine, it, cfg, step)
        assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k != "grad_norm"), metrics
    if dist.get_rank() == 0:
        print("NO_IMAGE_STEPS_OK", metrics)
    dist.barrier()


if __name__ == "__main__":
    main()
