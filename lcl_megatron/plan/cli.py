"""`lcl plan`: check a config's layout on a cluster, plan its costs, print them.

    lcl plan --config CONFIG [--nodes N] [--gpus-per-node G] [key=value ...]
"""

from __future__ import annotations

import argparse
import math

from lcl_megatron.config import Config, ConfigError, load_config, validate_config
from lcl_megatron.layout import Layout
from lcl_megatron.plan.checkpoint import DISK_GIB_S, estimate_save
from lcl_megatron.plan.costs import make_plan
from lcl_megatron.plan.report import format_plan


def checked_layout(cfg: Config, nodes: int | None, gpus_per_node: int) -> Layout:
    """Every check `lcl train` makes of `cfg` but the data paths' (a cluster's need not exist here),
    then its layout on nodes x gpus_per_node GPUs (nodes None: the fewest whole nodes it fills)."""
    if gpus_per_node < 1 or (nodes is not None and nodes < 1):
        raise ConfigError(f"--nodes and --gpus-per-node must be positive, got {nodes} and {gpus_per_node}")
    validate_config(cfg, check_data=False)
    if nodes is None:
        model_parallel = cfg.parallel.tp * cfg.parallel.pp
        nodes = model_parallel // math.gcd(model_parallel, gpus_per_node)
    return Layout.of(cfg, nodes * gpus_per_node, gpus_per_node)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lcl plan", description="Per-GPU memory, FLOPs and communication "
                                     "of a config's parallel layout.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example:\n  lcl plan --config configs/lcl_vit_6b_llama7b.yaml --nodes 8 --gpus-per-node 8")
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--nodes", type=int, default=None, help="default: the fewest whole nodes the layout fills")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--disk-gib-s", type=float, default=DISK_GIB_S,
                        help="checkpoint write bandwidth per rank, GiB/s (default %(default)s)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides, validate=False)
    if args.disk_gib_s <= 0:
        raise ConfigError(f"--disk-gib-s must be positive, got {args.disk_gib_s}")
    layout = checked_layout(cfg, args.nodes, args.gpus_per_node)  # user errors fail before the model is built
    plan = make_plan(cfg, layout.nodes, args.gpus_per_node)
    print(format_plan(plan, cfg, args.config, estimate_save(plan, cfg, args.disk_gib_s)))
    return 0
