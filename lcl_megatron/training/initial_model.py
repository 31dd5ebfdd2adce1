"""The model a run starts from: seeded alike on every rank, or loaded from `--init-from`."""

from __future__ import annotations

from pathlib import Path

import torch

from lcl_megatron.config import Config


def build_initial_model(cfg: Config, init_from: Path | None = None):
    """The full plain model on every rank (TP-sharded), seeded so that every layout starts alike."""
    from lcl_megatron.checkpoint.consolidated import check_tensors
    from lcl_megatron.checkpoint.format import MODEL_FILE, load_model_file
    from lcl_megatron.model.lcl import LCLModel
    from lcl_megatron.model.sharding import canonical_shapes, load_canonical

    torch.manual_seed(cfg.train.seed)  # identical on every rank: replicated weights agree, TP shards split one init
    model = LCLModel.from_config(cfg)
    if init_from is not None:
        tensors = load_model_file(init_from / MODEL_FILE)
        check_tensors(canonical_shapes(model, cfg.model.text.vocab_size), tensors,
                      what=f"--init-from checkpoint '{init_from}'")
        load_canonical(model, tensors)
    return model
