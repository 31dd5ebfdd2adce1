"""Zero-shot classification as the reference does it.

Each class's text feature is the average of its prompts' features, one prompt
per template ("a photo of a {}." ...), each L2-normalised, the average
normalised again (OpenCLIP's zero-shot classifier). A prompt's feature is the
context feature at the <start_of_img> that replaces its <end_of_text>. Images
are compared with every class and ranked; top-1 and top-5 accuracy are reported.

    lcl eval zeroshot --checkpoint DIR [--data SET] [--classnames imagenet|FILE] [--templates openai_imagenet|FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from lcl_megatron.eval.datasets import LabelledSet

TEXT_BATCH = 256


@torch.no_grad()
def text_features(model, texts: list[str], batch_size: int = TEXT_BATCH) -> torch.Tensor:
    """L2-normalised fp32 features [len(texts), D] of texts in the zero-shot layout."""
    from lcl_megatron.model.lcl import zeroshot_text_ids
    from lcl_megatron.tokenizer import get_tokenizer

    tokenizer, out, device = get_tokenizer(), [], next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        ids = zeroshot_text_ids(tokenizer(texts[start:start + batch_size]), model.cfg.text.context_length)
        out.append(F.normalize(model.text_features(ids.to(device)).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def zeroshot_classifier(model, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """[num_classes, D]: per class, the renormalised mean of its normalised prompt features."""
    prompts = [template.format(name) for name in classnames for template in templates]
    per_prompt = text_features(model, prompts).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


@torch.no_grad()
def zeroshot_evaluate(model, dataset: LabelledSet, batch_size: int = 64) -> dict:
    """{"top1", "top5", "samples"} of `model` on `dataset`, streamed in batches."""
    classifier = zeroshot_classifier(model, dataset.classnames, dataset.templates)
    parameter = next(model.parameters())
    k = min(5, classifier.shape[0])
    hits_sum = torch.zeros(2, dtype=torch.long, device=parameter.device)  # top-1, top-5; read once at the end
    total = 0
    for images, labels in dataset.batches(model.cfg.vision.image_size, batch_size):  # host tensors
        if int(labels.max()) >= classifier.shape[0]:
            raise ValueError(f"{dataset.location}: label {int(labels.max())} but only {classifier.shape[0]} classes")
        images = images.to(parameter.device, parameter.dtype, non_blocking=True)
        ranked = (model.image_features(images) @ classifier.t()).topk(k, dim=-1).indices
        hits = ranked == labels.to(parameter.device)[:, None]
        hits_sum += torch.stack([hits[:, 0].sum(), hits.any(dim=-1).sum()])
        total += labels.shape[0]
    top1, top5 = hits_sum.cpu().tolist()
    return {"top1": top1 / max(1, total), "top5": top5 / max(1, total), "samples": total}


def main(argv=None) -> int:
    from lcl_megatron.config import ConfigError
    from lcl_megatron.eval.model_from_checkpoint import load_for_eval

    p = argparse.ArgumentParser(
        prog="lcl eval zeroshot", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\nSets (see lcl_megatron/eval/datasets.py): embedded:NAME, an image "
        "folder with one sub-folder per class, or webdataset shards of image + cls with a class-names file.",
        epilog="example:\n  lcl eval zeroshot --checkpoint runs/demo --data embedded:digits")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--data", help="labelled set (default: the checkpoint config's data.heldout)")
    p.add_argument("--classnames", help="'imagenet' (OpenCLIP's 1,000 names), or a .json list / .txt file "
                   "(default: classnames.json/.txt in the set, or its sub-folder names)")
    p.add_argument("--templates", help="'openai_imagenet' (OpenAI's 80, the default for directories) or a .json "
                   "list of strings with one '{}'")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    args = p.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
        # a set named on the command line is checked before the model is loaded
        dataset = LabelledSet.open(args.data, args.classnames, args.templates) if args.data else None
        cfg, model = load_for_eval(args.checkpoint)
        entry = args.data or cfg.data.heldout
        if not entry:
            raise ConfigError("no held-out set: pass --data")
        dataset = dataset or LabelledSet.open(entry, args.classnames, args.templates)
        result = zeroshot_evaluate(model, dataset, args.batch_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"lcl eval zeroshot: {e}", file=sys.stderr)
        return 2
    print(f"zero-shot on {entry}: top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f} "
          f"({result['samples']} images, {len(dataset.classnames)} classes x {len(dataset.templates)} templates)")
    print(json.dumps({"data": entry, "classes": len(dataset.classnames), "templates": len(dataset.templates),
                      **result}))  # the last line: machine-readable
    return 0
