"""Loading a checkpoint for evaluation in one process."""

from __future__ import annotations

from pathlib import Path


def load_for_eval(path):
    from lcl_megatron.checkpoint.consolidated import load_model_state, read_checkpoint
    from lcl_megatron.model.build import build_model

    cfg, tensors = read_checkpoint(Path(path))
    cfg.train.precision = "fp32"  # evaluate in fp32 whatever the run trained in
    cfg.parallel.tp = cfg.parallel.pp = 1
    cfg.parallel.sp = False
    model = build_model(cfg)
    load_model_state(model, {k: v.float() for k, v in tensors.items()})
    model.eval()
    return cfg, model
