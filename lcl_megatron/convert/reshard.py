"""Any training layout to any other, through a layout-free training state: `lcl convert reshard`.

    lcl convert reshard --checkpoint DIR --layout tp=N,pp=N,dp=N[,zero=0-3] --out DIR [--weights-only]
    lcl convert reshard --checkpoint DIR --layout consolidated --out DIR

The source is read from its files, one model-parallel rank at a time, in this
one process (checkpoint/deepspeed_files.py): a checkpoint of any number of GPUs
converts on one machine, with memory for its canonical state. Every
parameter's full fp32 master and Adam moments (ZeRO 0-3, pipeline stages,
TP shards joined) are named as in the single-process model. That canonical
training state is written to OUT:

    model.safetensors      the source's consolidated weights (copied, or joined from its stages' parts or
                           its DeepSpeed files when it has none)
    optimizer.safetensors  fp32/NAME, exp_avg/NAME, exp_avg_sq/NAME, canonical names and shapes
    optimizer.json         Adam's step, the LR scheduler, the engine's step/sample counters
    loader_dpXXXXX.json    the data position of every target data-parallel rank
    config.yaml            the source's config with the target layout (global batch kept)
    COMPLETE               manifest

`lcl train --resume` on a run whose newest checkpoint is OUT loads it into an
engine of any layout (checkpoint/training_state.py). `consolidated` is
tp = pp = dp = 1; eval and the exports read it too.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
from pathlib import Path

from lcl_megatron.checkpoint.consolidated import read_checkpoint, write_config
from lcl_megatron.checkpoint.deepspeed_files import UnreadableCheckpoint
from lcl_megatron.checkpoint.format import (LOADER_STATES, MODEL_FILE, OPTIMIZER_STATE, OPTIMIZER_TENSORS, engine_files,
                                            loader_file, open_checkpoint, save_model_file, write_manifest)
from lcl_megatron.checkpoint.training_state import check_canonical_state, write_canonical_state
from lcl_megatron.config import Config, ConfigError, ParallelConfig, validate_config
from lcl_megatron.convert.output import add_output_flags, atomic_directory, write_guarded
from lcl_megatron.errors import UserError
from lcl_megatron.layout import Layout

RESHARD = "lcl convert reshard"


class ReshardError(UserError, ValueError):
    """A layout or checkpoint this command cannot convert: one line, exit code 2."""


def parse_layout(text: str) -> dict:
    """'consolidated' or 'tp=N,pp=N,dp=N[,zero=N]' -> {'tp', 'pp', 'dp', 'zero'}; zero None: keep the source's.
    The sizes are checked by the layout's own rules; the model's, by the target config."""
    if text == "consolidated":
        return {"tp": 1, "pp": 1, "dp": 1, "zero": 0}
    expected = "expected 'consolidated' or tp=N,pp=N,dp=N[,zero=0-3]"
    layout = {"tp": 1, "pp": 1, "dp": 1, "zero": None}
    for part in text.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or key not in layout or not value.isdigit():
            raise ReshardError(f"--layout '{text}': {expected}")
        layout[key] = int(value)
    zero = 0 if layout["zero"] is None else layout["zero"]
    try:
        Layout(ParallelConfig(tp=layout["tp"], pp=layout["pp"], zero_stage=zero),
               world=layout["tp"] * layout["pp"] * layout["dp"])
    except ConfigError as e:
        raise ReshardError(f"--layout '{text}': {e}; {expected}") from None
    return layout


# ---------------------------------------------------------------- the command


def target_config(cfg: Config, layout: dict, source_dp: int) -> Config:
    """The source's config on the target layout, with the same global batch."""
    out = copy.deepcopy(cfg)
    p = out.parallel
    p.tp, p.pp = layout["tp"], layout["pp"]
    p.zero_stage = cfg.parallel.zero_stage if layout["zero"] is None else layout["zero"]
    p.sp = cfg.parallel.sp and p.tp > 1
    global_batch = cfg.train.micro_batch_size * source_dp
    if global_batch % layout["dp"]:
        raise ReshardError(f"the global batch of {global_batch} samples per micro-step does not split "
                           f"over dp={layout['dp']}")
    out.train.micro_batch_size = global_batch // layout["dp"]
    try:
        validate_config(out, check_data=False)
    except ConfigError as e:
        raise ReshardError(f"--layout: {e}") from None
    return out


def _write_loader_states(ckpt: Path, out: Path, cfg: Config, source_dp: int, target_dp: int) -> None:
    states = sorted(ckpt.glob(LOADER_STATES))
    if cfg.data.split == "samples":  # every rank reads the same global batches: one position serves all
        if states:
            for rank in range(target_dp):
                shutil.copyfile(states[0], out / loader_file(rank))
    elif target_dp == source_dp:
        for state in states:
            shutil.copyfile(state, out / state.name)
    else:
        print(f"lcl convert reshard: note: with data.split=shards the data position of {source_dp} ranks does "
              f"not carry over to {target_dp}; the new ranks start their shards from the beginning", file=sys.stderr)


def reshard(src: Path, out: Path, layout: dict, weights_only: bool = False) -> Path:
    ckpt, manifest = open_checkpoint(src)  # every listed file present, full size, SHA-256
    cfg, weights = read_checkpoint(ckpt)  # the config against the consolidated tensors
    world = int(manifest.get("world_size", 1))
    source_dp = world // (cfg.parallel.tp * cfg.parallel.pp)
    target = target_config(cfg, layout, source_dp)
    canonical = (ckpt / OPTIMIZER_TENSORS).is_file()
    if not weights_only and not canonical and not engine_files(manifest):
        raise ReshardError(f"checkpoint '{ckpt}' holds no optimizer state; --weights-only writes the weights alone")
    with atomic_directory(out, RESHARD) as tmp:
        if not weights_only:
            if canonical:
                for name in (OPTIMIZER_TENSORS, OPTIMIZER_STATE):
                    shutil.copyfile(ckpt / name, tmp / name)
            else:
                write_canonical_state(ckpt, tmp, cfg, world)
            check_canonical_state(tmp, cfg, what=f"optimizer state of '{ckpt}'")
        if MODEL_FILE in manifest["files"]:
            shutil.copyfile(ckpt / MODEL_FILE, tmp / MODEL_FILE)
        else:
            save_model_file(weights, tmp / MODEL_FILE)
        write_config(tmp, target)
        _write_loader_states(ckpt, tmp, cfg, source_dp, layout["dp"])
        source_layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": source_dp,
                         "zero": cfg.parallel.zero_stage}
        write_manifest(tmp, {"step": manifest.get("step", 0), "world_size": layout["tp"] * layout["pp"] * layout["dp"],
                             "resharded_from": str(ckpt), "source_layout": source_layout})
    return Path(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=RESHARD, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  lcl convert reshard --checkpoint runs/x --layout tp=1,pp=1,dp=2,zero=3 "
                                       "--out runs/x-dp2/checkpoints/step_00000300")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--layout", required=True, help="tp=N,pp=N,dp=N[,zero=0-3] or 'consolidated' (tp=pp=dp=1)")
    add_output_flags(p, "output checkpoint directory (written atomically)")
    p.add_argument("--weights-only", action="store_true", help="leave out the optimizer state")
    args = p.parse_args(argv)
    write = lambda: reshard(Path(args.checkpoint), Path(args.out), parse_layout(args.layout), args.weights_only)
    return 0 if write_guarded(RESHARD, args, write, errors=(ReshardError, UnreadableCheckpoint)) is not None else 2
