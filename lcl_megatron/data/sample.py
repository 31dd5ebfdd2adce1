"""`lcl data sample`: write the batch that training step N would train on.

    lcl data sample --config C [--step N] --out F.pt [--png G.png] [--dp-size D --dp-rank R] [key=value ...]

The loader is the training loader of the config (same seed, shuffling, crops),
so the batch is exactly what `lcl train` feeds data-parallel rank R of a run
with D replicas at step N: its `train.grad_accumulation` micro-batches, stacked.
The file holds `images`, `input_ids` and `attention_mask`, the format
`lcl eval loss --batch` reads. `--png` draws the images in a grid, each under
the text of its row.
"""

from __future__ import annotations

import argparse
import io
import json
import textwrap
from pathlib import Path

import torch

from lcl_megatron.config import ConfigError, load_config

THUMBNAIL = 128  # pixels per image in the grid
COLUMNS = 4
CAPTION_LINES = 6


def step_batch(cfg, step: int, dp_rank: int = 0, dp_size: int = 1) -> dict:
    """The micro-batches of optimizer step `step` (1-based) on DP rank `dp_rank`, concatenated."""
    from lcl_megatron.data.global_batch import build_loader

    accumulation = cfg.train.grad_accumulation
    batches = iter(build_loader(cfg, dp_rank, dp_size))
    for _ in range((step - 1) * accumulation):
        next(batches)
    micro = [next(batches) for _ in range(accumulation)]
    return {key: torch.cat([m[key] for m in micro]) for key in ("images", "input_ids", "attention_mask")}


def image_rows(batch: dict) -> list[int]:
    """The row of each image, in the batch's row-major image order."""
    from lcl_megatron import tokens

    rows, _ = (batch["input_ids"] == tokens.SOI_ID).nonzero(as_tuple=True)
    return rows.tolist()


def row_text(ids: torch.Tensor, mask: torch.Tensor) -> str:
    """A row's text with each image run shown as [image]."""
    from lcl_megatron import tokens
    from lcl_megatron.tokenizer import get_tokenizer

    tokenizer, parts, run = get_tokenizer(), [], []
    for token in ids[mask].tolist():
        if token == tokens.SOI_ID:
            parts.append(tokenizer.decode(run))
            parts.append("[image]")
            run = []
        elif token not in (tokens.IMG_ID, tokens.EOI_ID, tokens.SOT_ID, tokens.EOT_ID):
            run.append(token)
    parts.append(tokenizer.decode(run))
    return " ".join(p.strip() for p in parts if p.strip())


def draw_grid(batch: dict) -> bytes:
    """PNG bytes: every image of the batch, un-normalised, above the text of its row."""
    from PIL import Image, ImageDraw

    from lcl_megatron.data.images import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    images, rows = batch["images"], image_rows(batch)
    texts = [row_text(ids, mask) for ids, mask in zip(batch["input_ids"], batch["attention_mask"].bool())]
    mean, std = torch.tensor(OPENAI_DATASET_MEAN)[:, None, None], torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    line_height, cell_height = 12, THUMBNAIL + CAPTION_LINES * 12 + 8
    count = max(1, images.shape[0])
    grid = Image.new("RGB", (COLUMNS * THUMBNAIL, -(-count // COLUMNS) * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, row) in enumerate(zip(images, rows)):
        pixels = ((image.float() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        x, y = (i % COLUMNS) * THUMBNAIL, (i // COLUMNS) * cell_height
        grid.paste(Image.fromarray(pixels, "RGB").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.NEAREST), (x, y))
        nth = rows[:i].count(row) + 1
        caption = textwrap.wrap(f"row {row}, image {nth}: {texts[row]}", width=THUMBNAIL // 6)[:CAPTION_LINES]
        for j, line in enumerate(caption):
            draw.text((x + 2, y + THUMBNAIL + 2 + j * line_height), line, fill="black")
    out = io.BytesIO()
    grid.save(out, format="PNG")
    return out.getvalue()


def main(argv=None) -> int:
    from lcl_megatron.utils import atomic_write_bytes

    p = argparse.ArgumentParser(prog="lcl data sample", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n", 1)[0] + "\n\n" + __doc__.split("\n\n", 2)[2],
                                epilog="example:\n  lcl data sample --config configs/demo.yaml --step 3 --out step3.pt "
                                       "--png step3.png")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--step", type=int, default=1, help="optimizer step, from 1 (default 1)")
    p.add_argument("--out", required=True, help="batch file to write (.pt); never overwritten")
    p.add_argument("--png", help="also write a grid of the batch's images with their text")
    p.add_argument("--dp-size", type=int, default=1, help="data-parallel replicas of the run (default 1)")
    p.add_argument("--dp-rank", type=int, default=0, help="the replica whose batch to write (default 0)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.step < 1:
        raise ConfigError(f"--step must be at least 1, got {args.step}")
    if not 0 <= args.dp_rank < args.dp_size:
        raise ConfigError(f"--dp-rank must be in [0, --dp-size={args.dp_size}), got {args.dp_rank}")
    if cfg.data.packing:
        raise ConfigError("data.packing: packed batches carry document boundaries that lcl eval loss does not read; "
                          "sample with data.packing=false")
    for path in filter(None, (args.out, args.png)):
        if Path(path).exists():
            raise ConfigError(f"'{path}' exists; refusing to overwrite it")
        if not Path(path).resolve().parent.is_dir():
            raise ConfigError(f"the directory of '{path}' does not exist")
    batch = step_batch(cfg, args.step, args.dp_rank, args.dp_size)
    buffer = io.BytesIO()
    torch.save(batch, buffer)
    atomic_write_bytes(args.out, buffer.getvalue())
    if args.png:
        atomic_write_bytes(args.png, draw_grid(batch))
    rows, images = batch["input_ids"].shape[0], batch["images"].shape[0]
    print(f"step {args.step}, DP rank {args.dp_rank} of {args.dp_size}: {rows} rows, {images} images, "
          f"{int(batch['attention_mask'].sum())} tokens -> {args.out}" + (f", {args.png}" if args.png else ""))
    print(json.dumps({"step": args.step, "dp_rank": args.dp_rank, "dp_size": args.dp_size, "rows": rows,
                      "images": images, "tokens": int(batch["attention_mask"].sum()), "out": args.out,
                      "png": args.png}))
    return 0
