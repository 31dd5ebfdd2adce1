"""What a checkpoint holds, with every file checked: `lcl convert inspect`.

    lcl convert inspect --checkpoint DIR [--json]

Prints the parallel layout it was written with, its step, the model config,
the parameter count and the tensors in each file, after checking every file
the COMPLETE manifest lists (present, full size, SHA-256) and the config
against the consolidated tensors. Any mismatch: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from lcl_megatron.checkpoint.consolidated import CheckpointMismatch, read_checkpoint
from lcl_megatron.checkpoint.format import engine_files, open_checkpoint, safe_torch_load
from lcl_megatron.config import ConfigError


def _tensor_stats(obj) -> dict:
    """Tensor count and elements under each top-level key of a loaded torch file."""
    def walk(o):
        if isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, dict):
            for v in o.values():
                yield from walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                yield from walk(v)

    groups = obj.items() if isinstance(obj, dict) else [("", obj)]
    stats = {}
    for key, value in groups:
        found = list(walk(value))
        if found:
            stats[str(key)] = {"tensors": len(found), "elements": sum(t.numel() for t in found)}
    return stats


def shard_contents(path: Path) -> dict:
    """Tensors in one file, read without unpickling code (safetensors headers; weights-only torch)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys()]
        return {"": {"tensors": len(shapes), "elements": sum(math.prod(s) for s in shapes)}}
    if path.suffix == ".pt":
        try:
            return _tensor_stats(safe_torch_load(path))
        except Exception as e:  # weights-only refusals and torch's own read errors alike
            raise CheckpointMismatch(f"cannot read shard '{path.name}': {str(e).splitlines()[0]}") from None
    return {}


def describe(path: Path) -> dict:
    from lcl_megatron.model.build import count_parameters

    ckpt, manifest = open_checkpoint(path)
    cfg, tensors = read_checkpoint(ckpt)  # checks the config against the consolidated tensors
    p = cfg.parallel
    world = int(manifest.get("world_size", 1))
    return {
        "checkpoint": str(ckpt),
        "step": manifest.get("step"),
        "layout": {"world_size": world, "tp": p.tp, "pp": p.pp, "dp": max(1, world // (p.tp * p.pp)),
                   "zero_stage": p.zero_stage, "sp": p.sp,
                   "format": "deepspeed" if engine_files(manifest) else "consolidated"},
        "source": {k: v for k, v in manifest.items() if k not in ("files", "step", "world_size")},
        "parameters": count_parameters(cfg.model),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "model": cfg.to_dict()["model"],
        "shards": {name: {"bytes": entry["bytes"], "contents": shard_contents(ckpt / name)}
                   for name, entry in sorted(manifest["files"].items())},
        "verified": f"{len(manifest['files'])} files match their SHA-256",
    }


def _print_human(info: dict) -> None:
    lay = info["layout"]
    print(f"checkpoint  {info['checkpoint']}")
    print(f"step        {info['step']}")
    print(f"layout      {lay['format']}: world {lay['world_size']} = tp {lay['tp']} x pp {lay['pp']} x dp {lay['dp']}, "
          f"ZeRO stage {lay['zero_stage']}" + (", sequence parallel" if lay["sp"] else ""))
    if info["source"]:
        print(f"source      {json.dumps(info['source'])}")
    print(f"parameters  {info['parameters']:,} ({', '.join(info['dtypes'])})")
    print(f"model       {json.dumps(info['model'])}")
    print("files")
    for name, shard in info["shards"].items():
        parts = [f"{k + ': ' if k else ''}{v['tensors']} tensors, {v['elements']:,} elements"
                 for k, v in shard["contents"].items()]
        print(f"  {name:<48} {shard['bytes']:>14,} B  {'; '.join(parts)}")
    print(f"verified    {info['verified']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lcl convert inspect", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  lcl convert inspect --checkpoint runs/demo\n  lcl convert inspect --checkpoint runs/demo/checkpoints/step_00000400 --json")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    try:
        info = describe(Path(args.checkpoint))
    except (ConfigError, CheckpointMismatch, FileNotFoundError) as e:
        print(f"lcl convert inspect: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info))
    else:
        _print_human(info)
    return 0
