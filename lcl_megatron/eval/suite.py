"""Evaluations a training run makes every `eval.every` steps, on held-out sets.

Each kind is a pair (open the set, evaluate the model on it -> {metric: value});
the model is the full plain model in eval mode (the training loop gathers its
weights first). A new kind (a probe on frozen features, say) plugs in by adding
its pair to EVALUATIONS and a list of sets to the `eval` config section.
"""

from __future__ import annotations

import re

from lcl_megatron.config import Config
from lcl_megatron.eval.datasets import CaptionedSet, LabelledSet
from lcl_megatron.eval.retrieval import retrieval_evaluate
from lcl_megatron.eval.zeroshot import zeroshot_evaluate

EVALUATIONS = {
    "zeroshot": (LabelledSet.open, zeroshot_evaluate),
    "retrieval": (CaptionedSet.open, retrieval_evaluate),
}


def metric_name(kind: str, entry: str, metric: str) -> str:
    """"zeroshot/embedded_digits/top1": a set's location as a TensorBoard-safe tag."""
    return f"{kind}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', entry).strip('_')}/{metric}"


def configured_sets(cfg: Config) -> list[tuple[str, str]]:
    """(kind, set) pairs named by the config's `eval` section, in a fixed order."""
    return [(kind, entry) for kind in EVALUATIONS for entry in getattr(cfg.eval, kind)]


def evaluate_all(model, cfg: Config) -> dict:
    """Every configured evaluation of `model`: {metric_name: value}."""
    results = {}
    for kind, entry in configured_sets(cfg):
        open_set, evaluate = EVALUATIONS[kind]
        values = evaluate(model, open_set(entry), cfg.eval.batch_size)
        results.update({metric_name(kind, entry, k): v for k, v in values.items()})
    return results
