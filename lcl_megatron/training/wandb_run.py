"""Weights & Biases as an optional sink of the run's metrics (`logging.wandb=true`).

The W&B run id is kept in the run directory (`wandb_run_id`), so a requeued or
resumed job continues the same W&B run instead of starting a new one. Offline
mode (`WANDB_MODE=offline`) works without a network; `wandb sync` uploads later.
The `wandb` package is optional: without it, `logging.wandb=true` stops the run
before any model is built, with one line saying what to install.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from lcl_megatron.errors import UserError
from lcl_megatron.utils import atomic_write_text

RUN_ID_FILE = "wandb_run_id"


class WandbUnavailable(UserError):
    """logging.wandb=true without the wandb package."""


def require_wandb() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise WandbUnavailable("logging.wandb=true needs the wandb package: pip install wandb "
                               "(or set logging.wandb=false)") from None


class WandbRun:
    def __init__(self, run_dir: Path, *, project: str, name: str, config: dict):
        import wandb

        id_file = Path(run_dir) / RUN_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(6)  # W&B ids: letters and digits
            atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run_dir),
                              config=config)

    def log(self, values: dict, step: int, section: str) -> None:
        numbers = {f"{section}/{key}": value for key, value in values.items()
                   if key != "step" and isinstance(value, (int, float))}
        self.run.log(numbers, step=step)

    def finish(self) -> None:
        self.run.finish()
