"""Replay one saved batch: `lcl eval loss --checkpoint DIR --batch FILE.pt`.

The batch file holds `images` (float [N, 3, H, W], normalised) and `input_ids`
(long [B, L], the reference's layout, right-padded with 0); an optional
`attention_mask` overrides the padding inferred from trailing zeros. Prints one
JSON line: the unweighted `contrastive_loss` and `generation_loss`, and the
weighted `loss`.
"""

from __future__ import annotations

import argparse
import json
import pickle

import torch

from lcl_megatron import tokens


def trailing_padding_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """True on every token up to each row's last non-padding id (id 0 inside a row stays a token)."""
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    real = input_ids != tokens.PAD_ID
    last = torch.where(real, positions, torch.full_like(positions, -1)).max(dim=1, keepdim=True).values
    return positions <= last


def main(argv=None) -> int:
    from lcl_megatron.config import ConfigError
    from lcl_megatron.eval.model_from_checkpoint import load_for_eval

    p = argparse.ArgumentParser(prog="lcl eval loss", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  lcl eval loss --checkpoint runs/demo --batch batch.pt")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--batch", required=True, help="torch file with images and input_ids")
    args = p.parse_args(argv)
    try:
        batch = torch.load(args.batch, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text would advise weights_only=False, i.e. running the file's code
        raise ConfigError(f"batch '{args.batch}' holds objects other than tensors and plain containers; "
                          "refused, since loading them could run code") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ConfigError(f"cannot read batch '{args.batch}': {str(e).splitlines()[0]}") from None
    if not isinstance(batch, dict) or not {"images", "input_ids"} <= batch.keys():
        raise ConfigError(f"batch '{args.batch}' must be a dict with 'images' and 'input_ids'")
    cfg, model = load_for_eval(args.checkpoint)  # a damaged or unfinished checkpoint: UserError, exit 2
    input_ids = batch["input_ids"].long()
    mask = batch.get("attention_mask")
    mask = trailing_padding_mask(input_ids) if mask is None else mask.bool()
    n_soi = int((input_ids == tokens.SOI_ID).sum())
    if n_soi != batch["images"].shape[0]:
        raise ConfigError(f"batch has {batch['images'].shape[0]} images but {n_soi} <start_of_img> tokens")
    with torch.no_grad():
        out = model(batch["images"].float(), input_ids, mask)
    print(json.dumps({"contrastive_loss": out["contrastive_loss"].item(),
                      "generation_loss": out["generation_loss"].item(), "loss": out["loss"].item()}))
    return 0
