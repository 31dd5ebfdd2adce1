"""One optimizer step on a DeepSpeed engine (plain or pipeline), returning the step's metrics.

Both step functions return the same metrics, averaged over micro-batches and
data-parallel ranks.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist

from lcl_megatron.config import Config
from lcl_megatron.layout import max_images_per_microbatch
from lcl_megatron.loss import Accumulation
from lcl_megatron.model.lcl import loss_counts
from lcl_megatron.model.pipeline import METRICS, to_pipeline_batch
from lcl_megatron.training.engine import pipeline_feature_cache, pipeline_metrics


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss): one line, exit code 1."""


def batch_to_device(batch: dict, device) -> dict:
    """The loader's host tensors on the training device (asynchronous copies from pinned memory)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def samples_in(batch: dict) -> torch.Tensor:
    """Samples (pairs or documents, not rows) in a micro-batch: packed rows hold several."""
    if "position_ids" in batch:
        return ((batch["position_ids"] == 0) & batch["attention_mask"].bool()).sum()
    return batch["attention_mask"].any(-1).sum()


def _dp_mean(values: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    values = values.detach().clone()
    dist.all_reduce(values, group=group)
    return values / dist.get_world_size(group)


def _non_finite_error(step: int, loss: float, generation: float, contrastive: float, when: str) -> TrainingError:
    return TrainingError(f"non-finite loss at step {step} (loss={loss}, generation={generation}, "
                         f"contrastive={contrastive}); {when}")


def describe_negatives(cfg: Config) -> str:
    """For the start-up line: which images each image is contrasted with."""
    if cfg.train.grad_accumulation == 1:
        return "contrastive negatives from the micro-batch"
    if cfg.accumulates_negatives:
        return f"contrastive negatives from all {cfg.train.grad_accumulation} accumulated micro-batches"
    return "contrastive negatives from each accumulated micro-batch alone (loss.accumulate_negatives=false)"


def _forward(engine, batch: dict, **kwargs):
    return engine(batch["images"], batch["input_ids"], batch["attention_mask"], batch.get("position_ids"),
                  batch.get("cu_seqlens"), **kwargs)


def step_accumulation(engine, micro_batches: list[dict], cfg: Config) -> Accumulation:
    """This rank's counts over the step's micro-batches and, when the contrastive term is on,
    each one's contrastive features from a forward without gradient (the reference's
    `accum_freq` cache; the data-parallel ranks' are gathered by the loss)."""
    counts = torch.stack([torch.stack(loss_counts(b["input_ids"], b["attention_mask"], b.get("position_ids")))
                          for b in micro_batches]).sum(0).to(engine.device)
    features = []
    if cfg.loss.contrastive_weight > 0:
        with torch.no_grad():
            features = [_forward(engine, batch_to_device(b, engine.device), features_only=True) for b in micro_batches]
    return Accumulation(counts[0], counts[1], [f[0] for f in features], [f[1] for f in features])


def plain_train_step(engine, batches, cfg: Config, step: int) -> dict:
    """One optimizer step over `train.grad_accumulation` micro-batches.

    With `cfg.accumulates_negatives`, the step's micro-batches are read first and
    the losses of each see them all (see `Accumulation`). The numbers stay on
    the device until one read, before the update: the data-parallel mean of the
    losses, the logit scale and the tokens, which also stops the run on a
    non-finite loss before it reaches the weights (Megatron checks every step
    likewise). The gradient norm is returned as the engine holds it; the caller
    reads it only on logged steps.
    """
    accumulation = cfg.train.grad_accumulation
    whole_step = cfg.accumulates_negatives
    micro_batches = [next(batches) for _ in range(accumulation)] if whole_step else None
    cache = step_accumulation(engine, micro_batches, cfg) if whole_step else None
    # loss, generation, contrastive, regression, logit_scale, tokens, images, samples
    sums = torch.zeros(8, device=engine.device)
    for micro in range(accumulation):
        batch = batch_to_device(micro_batches[micro] if whole_step else next(batches), engine.device)
        if whole_step:
            out = _forward(engine, batch, accumulation=cache.at(micro))
            # These losses are normalised by the whole step's counts: their gradients add up over the
            # micro-batches to the step's. DeepSpeed divides every micro-batch's loss by the accumulation
            # count (meant for per-micro-batch means), so it gets them that many times over. Not
            # `scale_wrt_gas=False`: the hooks its forward puts on the outputs would still divide.
            engine.backward(out["loss"] * accumulation)
        else:
            out = _forward(engine, batch)
            engine.backward(out["loss"])  # a per-micro-batch mean: DeepSpeed divides it by the count
        sums[:6] += torch.stack([out["reported_loss"].float(), out["generation_loss"].float(),
                                 out["contrastive_loss"].float(), out["regression_loss"].float(),
                                 out["logit_scale"].float(), batch["attention_mask"].sum().float()])
        sums[6] += batch["images"].shape[0]
        sums[7] += samples_in(batch)
        if micro == accumulation - 1:  # the next engine.step() updates the weights
            # Whole-step losses come as shares of the step that add up; per-micro-batch ones are averaged.
            if not whole_step:
                sums[:4] /= accumulation
            sums[4] /= accumulation  # the logit scale, the same in every micro-batch
            loss, generation, contrastive, regression, logit_scale, tokens, images, samples = \
                _dp_mean(sums).cpu().tolist()
            if not math.isfinite(loss + generation + contrastive + regression):
                raise _non_finite_error(step, loss, generation, contrastive, "stopping before the update")
        engine.step()
    return {"loss": loss, "generation_loss": generation, "contrastive_loss": contrastive, "regression_loss": regression,
            "logit_scale": logit_scale, "grad_norm": engine.get_global_grad_norm(),
            "tokens": tokens, "images": images, "samples": samples}


def pipeline_train_step(engine, batches, cfg: Config, step: int) -> dict:
    """One optimizer step of DeepSpeed's pipeline schedule.

    The first stage reads the step's micro-batches (later stages take their
    inputs from the previous one; `batches` holds the last stage's placeholder
    labels). With `cfg.accumulates_negatives` the pipeline runs them twice: without
    gradient for the feature cache, then to train (`pipeline_feature_cache`).
    DeepSpeed moves each micro-batch to the device itself, and hands every rank
    the loss stage's metrics averaged over micro-batches and data-parallel
    ranks. The counts are the first stage's.
    """
    accumulation, max_images = cfg.train.grad_accumulation, max_images_per_microbatch(cfg)
    first, last = engine.is_first_stage(), engine.is_last_stage()
    counts = torch.zeros(3)  # tokens, images, samples
    if first:
        micro_batches = [next(batches) for _ in range(accumulation)]
        for batch in micro_batches:
            counts += torch.stack([batch["attention_mask"].sum(), torch.tensor(batch["images"].shape[0]),
                                   samples_in(batch)]).float()
        inputs = [to_pipeline_batch(batch, max_images) for batch in micro_batches]

    def data():
        return iter(inputs) if first else batches if last else None

    whole_step = cfg.accumulates_negatives
    with pipeline_feature_cache(engine, data()) if whole_step else nullcontext():
        engine.train_batch(data_iter=data())
    reported = pipeline_metrics(engine)
    metrics = torch.stack([reported[name].float().reshape(()) for name in METRICS])
    if whole_step:  # the losses came as shares of the step: DeepSpeed's mean over micro-batches, times their count
        metrics[:4] *= accumulation
    counts = counts.to(engine.device)
    if first:
        counts = _dp_mean(counts)
    loss, generation, contrastive, regression, logit_scale, tokens, images, samples = \
        torch.cat([metrics.to(counts.device), counts]).cpu().tolist()
    if not math.isfinite(loss + generation + contrastive + regression):
        raise _non_finite_error(step, loss, generation, contrastive, "stopping")
    return {"loss": loss, "generation_loss": generation, "contrastive_loss": contrastive, "regression_loss": regression,
            "logit_scale": logit_scale, "grad_norm": engine.get_global_grad_norm(), "tokens": tokens, "images": images,
            "samples": samples}


def grad_norm_value(value) -> float:
    """The engine's gradient norm (a float, a device tensor or None) as a number: a host read."""
    return float(value) if value is not None else float("nan")
