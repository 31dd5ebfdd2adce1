"""What a checkpoint of a layout costs: bytes per rank and in all, seconds to write and hash them,
host memory for the background copy, and the warning a Slurm job needs to save before its time limit.

Every rank writes and hashes its own files in parallel (checkpoint/manager.py), so a
save takes as long as its busiest rank: data-parallel rank 0 of the heaviest pipeline
stage, which writes the stage's weights (DeepSpeed's model states; under ZeRO-3 only
its partition) beside its share of the optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lcl_megatron.config import Config
from lcl_megatron.plan.costs import Plan

DISK_GIB_S = 1.0  # write bandwidth per rank, GiB/s, to a parallel file system
HASH_GIB_S = 1.0  # SHA-256 of one core over the just-written (cached) file
WARNING_MARGIN_S = 120  # the step in flight, the manifest, process exit
WARNING_FACTOR = 1.5  # disks are slower than planned when the whole job writes at once
GiB = 1024 ** 3


@dataclass
class SaveEstimate:
    busiest_rank_bytes: float  # DeepSpeed's files of the busiest rank
    total_bytes: float  # one checkpoint, every rank's files
    consolidated_bytes: float  # model.safetensors (or its pipeline parts), when a save writes it
    seconds: float  # a save without the consolidated file, at `disk_gib_s`
    consolidated_seconds: float  # added by a save that writes it (each stage's writer its part)
    disk_gib_s: float

    @property
    def warning_s(self) -> int:
        """The least Slurm warning that leaves time for a save (with the consolidated file, in case
        the signal comes at a save that writes it)."""
        return math.ceil(WARNING_FACTOR * (self.seconds + self.consolidated_seconds) + WARNING_MARGIN_S)


def estimate_save(plan: Plan, cfg: Config, disk_gib_s: float = DISK_GIB_S) -> SaveEstimate:
    lay = plan.layout
    per_second = 1 / (disk_gib_s * GiB) + 1 / (HASH_GIB_S * GiB)
    busiest = max(s.weight_bytes + s.optimizer_bytes for s in plan.stages)  # the plan's per-GPU shares
    # Every DP rank writes its partition (ZeRO-3 weights, ZeRO-1+ optimizer); DP rank 0 alone the rest.
    weight_writers = lay.dp if lay.zero_stage >= 3 else 1
    optimizer_writers = lay.dp if lay.zero_stage >= 1 else 1
    total = sum(lay.tp * (weight_writers * s.weight_bytes + optimizer_writers * s.optimizer_bytes)
                for s in plan.stages)
    model_bytes = 2 if cfg.train.precision == "bf16" else 4  # model.safetensors: the module's dtype
    consolidated = plan.total_params * model_bytes
    largest_part = max(s.params * lay.tp for s in plan.stages) * model_bytes
    return SaveEstimate(busiest_rank_bytes=busiest, total_bytes=total, consolidated_bytes=consolidated,
                        seconds=busiest * per_second, consolidated_seconds=largest_part * per_second,
                        disk_gib_s=disk_gib_s)


def describe_estimate(est: SaveEstimate, cfg: Config) -> list[str]:
    return [
        f"checkpoint  {est.total_bytes / GiB:,.1f} GiB per save, {est.busiest_rank_bytes / GiB:,.2f} GiB on the "
        f"busiest rank: ~{est.seconds:,.0f} s at {est.disk_gib_s:g} GiB/s per rank (write, then SHA-256); "
        f"model.safetensors ({cfg.checkpoint.consolidate}) adds {est.consolidated_bytes / GiB:,.1f} GiB, "
        f"~{est.consolidated_seconds:,.0f} s",
        f"            a background save (checkpoint.async_save) holds up to {est.busiest_rank_bytes / GiB:,.2f} GiB "
        f"of host memory per rank; the run needs room for checkpoint.keep + 1 = {cfg.checkpoint.keep + 1} saves "
        f"({(cfg.checkpoint.keep + 1) * est.total_bytes / GiB:,.1f} GiB); Slurm's warning (--warning) >= "
        f"{est.warning_s} s",
    ]
