"""One rank of `lcl convert reshard`: load a checkpoint into its own layout's engine, write the canonical state.

    torchrun --nproc-per-node <source world size> -m lcl_megatron.convert.reshard_worker CKPT OUT

Started by convert/reshard.py (not a user command). Every rank builds the
source engine exactly as `lcl train` does, lets DeepSpeed load the
checkpoint, and joins `save_canonical_state`, which writes
OUT/optimizer.safetensors and OUT/optimizer.json.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import yaml


def write_canonical_state(ckpt: Path, out: Path) -> None:
    from megatron.core import parallel_state

    from lcl_megatron.config import config_from_dict
    from lcl_megatron.convert.reshard import save_canonical_state
    from lcl_megatron.parallel import init_distributed
    from lcl_megatron.training.checkpoint import CONFIG_FILE, load_checkpoint
    from lcl_megatron.training.engine import build_engine, build_model

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    cfg = config_from_dict(yaml.safe_load((Path(ckpt) / CONFIG_FILE).read_text()))
    init_distributed(cfg.parallel, timeout_s=cfg.parallel.timeout_s)
    engine = build_engine(cfg, build_model(cfg))
    load_checkpoint(engine, Path(ckpt), parallel_state.get_data_parallel_rank())
    save_canonical_state(engine, Path(out), cfg.model.text.vocab_size)


def main(argv=None) -> int:
    import warnings

    from lcl_megatron.config import ConfigError
    from lcl_megatron.convert.native import CheckpointMismatch
    from lcl_megatron.convert.reshard import ReshardError

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|APEX|full scope).*")
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m lcl_megatron.convert.reshard_worker CKPT OUT", file=sys.stderr)
        return 2
    try:
        write_canonical_state(Path(argv[0]), Path(argv[1]))
    except (ConfigError, CheckpointMismatch, ReshardError) as e:
        print(f"lcl convert reshard: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
