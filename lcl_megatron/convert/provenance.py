"""What an export says about the weights' training, read from the run (never typed in).

The checkpoint's manifest gives the step and world size, its config the data
and the batch, and the run's `metrics.jsonl` (beside `checkpoints/`) the
evaluations logged up to that step.
"""

from __future__ import annotations

import json
from pathlib import Path

from lcl_megatron.config import Config

_TRAINING_KEYS = {"step", "loss"}  # a training record; evaluation records (`log_eval`) have no loss


def run_directory(ckpt: Path) -> Path | None:
    """The run a checkpoint belongs to (`RUN/checkpoints/step_X`), if it lies in one."""
    ckpt = Path(ckpt).resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def evaluation_results(run: Path | None, step: int) -> dict:
    """The newest value of each evaluation logged at or before `step`: {name: {"value", "step"}}."""
    results = {}
    metrics = run / "metrics.jsonl" if run is not None else None
    if metrics is None or not metrics.is_file():
        return results
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a crash mid-write
            continue
        if not isinstance(record, dict) or "loss" in record or int(record.get("step", -1)) > step:
            continue
        for key, value in record.items():
            if key not in _TRAINING_KEYS and isinstance(value, (int, float)):
                results[key] = {"value": value, "step": int(record["step"])}
    return results


def training_facts(cfg: Config, manifest: dict, ckpt: Path) -> dict:
    """Data, steps, samples seen and evaluations of the run that wrote `ckpt`."""
    imported = manifest.get("format") == "openclip"
    step = int(manifest.get("step", 0))
    if imported:  # our config's data section says nothing of weights trained elsewhere
        return {"imported_from": manifest.get("source"), "data": None, "steps": None, "samples_seen": None,
                "evaluation": {}}
    world = int(manifest.get("world_size", 1))
    dp = max(1, world // (cfg.parallel.tp * cfg.parallel.pp))
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accumulation * dp
    return {"data": list(cfg.data.path), "steps": step, "global_batch": global_batch,
            "samples_seen": step * global_batch, "evaluation": evaluation_results(run_directory(ckpt), step)}
