"""The tiny configurations tests train and convert, as `key=value` overrides of configs/demo.yaml."""

from tests.support.launch import with_overrides
from tests.support.paths import REPO

DEMO = REPO / "configs" / "demo.yaml"
GLOBAL_BATCH = 8
STEPS = 3

# The one tiny model: 24 px images in 8 px patches (9 image tokens), two layers a tower.
TINY_MODEL = [
    "model.embed_dim=32", "model.pool_heads=4",
    "model.vision.image_size=24", "model.vision.patch_size=8", "model.vision.width=32",
    "model.vision.layers=2", "model.vision.head_width=8",
    "model.text.context_length=64", "model.text.width=32", "model.text.heads=4", "model.text.layers=2",
]
# Layout-comparison runs: fixed global batch (data.split=samples), every step logged, nothing saved.
TINY = TINY_MODEL + [
    f"train.steps={STEPS}", "train.seed=7", "optim.lr=1e-3", "schedule.warmup_steps=1", "optim.grad_clip=1.0",
    "data.split=samples", "data.heldout=", "logging.every=1", "logging.progress=false",
    "logging.tensorboard=false", "checkpoint.every=0",
]
# `lcl train` runs of one process: per-process micro-batches of 4, steps and evaluation set by the test.
TRAIN_BASE = [t for t in TINY if not t.startswith(("train.steps", "data.split", "data.heldout"))] + [
    "train.micro_batch_size=4"]
# Checkpoint-conversion runs: two steps of micro-batch 2, a checkpoint after each, each with model.safetensors.
CHECKPOINTS = TINY_MODEL + ["train.steps=2", "train.micro_batch_size=2", "checkpoint.every=1",
                            "checkpoint.consolidate=every", "data.heldout=", "logging.progress=false",
                            "logging.tensorboard=false"]


def with_base(*extra) -> list[str]:
    """TRAIN_BASE with the keys `extra` sets replaced."""
    return with_overrides(TRAIN_BASE, *extra)
