"""The model wrapped in a DeepSpeed engine, and one optimizer step on it.

Without pipeline parallelism the plain LCL model goes into DeepSpeed's engine
(ZeRO 0-3); with it the model is cut into stages (model/pipeline.py) for
DeepSpeed's pipeline engine (ZeRO 0-1). Both step functions return the same
metrics, averaged over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from lcl_megatron.config import Config
from lcl_megatron.model.dims import logit_scale_range, max_images_per_microbatch


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss): one line, exit code 1."""


# Gradient buckets, in elements: large enough to keep the links busy, small enough to overlap with
# the backward pass (Megatron's default bucket is 40M parameters).
BUCKET_ELEMENTS = 50_000_000


def deepspeed_config(cfg: Config, dp_size: int, on_gpu: bool = False) -> dict:
    t = cfg.train
    bf16 = t.precision == "bf16"
    # DeepSpeed accumulates bf16 gradients in fp32 only in its ZeRO optimizers (stage 1 is its BF16
    # optimizer): bf16 runs use at least stage 1, which with one data-parallel rank shards nothing.
    stage = max(1, cfg.parallel.zero_stage) if bf16 else cfg.parallel.zero_stage
    zero = {"stage": stage}
    if on_gpu and stage > 0:
        # Reduce gradient buckets while the backward pass goes on (CUDA streams; gloo has none).
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=BUCKET_ELEMENTS,
                    allgather_bucket_size=BUCKET_ELEMENTS)
        if stage == 3:
            zero.update(stage3_prefetch_bucket_size=BUCKET_ELEMENTS, stage3_param_persistence_threshold=100_000)
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accumulation,
        "train_batch_size": t.micro_batch_size * t.grad_accumulation * dp_size,
        "zero_optimization": zero,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        # Stages send more than one tensor that needs a gradient (the image latents ride along for
        # the contrastive loss); DeepSpeed's partitioned pipe tensors carry only the first one.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # bf16 compute, fp32 everything that accumulates: gradients summed over micro-batches and
        # reduced over data-parallel ranks in fp32 (DeepSpeed's default is the model's dtype).
        # DeepSpeed casts every parameter to bf16, the temperature included (its fp32 master copy
        # lives in the optimizer); rotary angles are computed in fp32 and never cast.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    return config


def build_model(cfg: Config, init_from: Path | None = None):
    """The full plain model on every rank (TP-sharded), seeded so that every layout starts alike."""
    from lcl_megatron.convert.native import check_tensors
    from lcl_megatron.model.lcl import LCLModel
    from lcl_megatron.model.sharding import canonical_shapes, load_canonical
    from lcl_megatron.training.checkpoint import MODEL_FILE, load_model_file

    torch.manual_seed(cfg.train.seed)  # identical on every rank: replicated weights agree, TP shards split one init
    model = LCLModel.from_config(cfg)
    if init_from is not None:
        tensors = load_model_file(init_from / MODEL_FILE)
        check_tensors(canonical_shapes(model, cfg.model.text.vocab_size), tensors,
                      what=f"--init-from checkpoint '{init_from}'")
        load_canonical(model, tensors)
    return model


def build_engine(cfg: Config, model):
    import deepspeed
    from megatron.core import parallel_state

    from lcl_megatron.parallel import MegatronMPU, verify_groups_match
    from lcl_megatron.training.checkpoint import SafeCheckpointEngine
    from lcl_megatron.training.optim import build_optimizer, build_scheduler, clamp_logit_scale_after_each_step

    dp_size = parallel_state.get_data_parallel_world_size()
    module = model
    if cfg.parallel.pp > 1:
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        from lcl_megatron.model.pipeline import pipeline_layers, stage_boundaries

        layers = pipeline_layers(model, max_images_per_microbatch(cfg))
        topology = PipeModelDataParallelTopology(num_pp=cfg.parallel.pp, num_mp=cfg.parallel.tp, num_dp=dp_size)
        parts = stage_boundaries(len(model.text.layers), cfg.parallel.pp, cfg.parallel.pp_first_stage_layers)

        class _Stages(PipelineModule):
            def _partition_layers(self, method="uniform"):
                # Our boundaries: the ViT stage may take fewer LM layers.
                self.parts = parts
                stage = self._topo.get_coord(self.global_rank).pipe
                self._set_bounds(start=parts[stage], stop=parts[stage + 1])

        module = _Stages(layers=layers, topology=topology, loss_fn=lambda loss, _label: loss)
        count_replicated_once_per_stage(module)
    optimizer = build_optimizer(module, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, cfg),
        mpu=None if cfg.parallel.pp > 1 else MegatronMPU,
        config=deepspeed_config(cfg, dp_size, on_gpu=torch.cuda.is_available()),
        dist_init_required=False)
    engine.checkpoint_engine = SafeCheckpointEngine()
    verify_groups_match(engine)
    record_grad_norm(engine)
    clamp_logit_scale_after_each_step(engine, logit_scale_range(cfg.model))
    return engine


def count_replicated_once_per_stage(module) -> None:
    """Make DeepSpeed's global gradient norm count each stage's replicated parameters once.

    DeepSpeed counts a parameter that is not tensor-parallel only on rank 0 of
    its "model parallel" group, which under pipeline parallelism spans all
    stages: the norms of stages > 0 would be left out of the clipping norm.
    Marking them on their stage's first TP rank restores the true global norm.
    """
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_rank() == 0 or parallel_state.get_tensor_model_parallel_rank() != 0:
        return
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = True


def record_grad_norm(engine) -> None:
    """Without ZeRO or bf16 DeepSpeed records no gradient norm: measure it before each update."""
    if engine.zero_optimization() or engine.bfloat16_enabled():
        return
    from deepspeed.runtime.utils import get_flattened_grad_norm

    take_step = engine._take_model_step

    def measured_step(*args, **kwargs):
        engine._global_grad_norm = float(get_flattened_grad_norm(list(engine.module.parameters()), mpu=engine.mpu))
        return take_step(*args, **kwargs)

    engine._take_model_step = measured_step


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


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


def plain_train_step(engine, batches, cfg: Config, step: int) -> dict:
    """One optimizer step over `train.grad_accumulation` micro-batches.

    The numbers stay on the device until one read, before the update: the
    data-parallel mean of the losses, the logit scale and the tokens, which
    also stops the run on a non-finite loss before it reaches the weights
    (Megatron checks every step likewise). The gradient norm is returned as
    the engine holds it; the caller reads it only on logged steps.
    """
    accumulation = cfg.train.grad_accumulation
    # loss, generation, contrastive, regression, logit_scale, tokens, images, samples
    sums = torch.zeros(8, device=engine.device)
    for micro in range(accumulation):
        batch = batch_to_device(next(batches), engine.device)
        out = engine(batch["images"], batch["input_ids"], batch["attention_mask"],
                     batch.get("position_ids"), batch.get("cu_seqlens"))
        engine.backward(out["loss"])
        sums[:6] += torch.stack([out["loss"].detach().float(), out["generation_loss"].float(),
                                 out["contrastive_loss"].float(), out["regression_loss"].float(),
                                 out["logit_scale"].float(), batch["attention_mask"].sum().float()])
        sums[6] += batch["images"].shape[0]
        sums[7] += samples_in(batch)
        if micro == accumulation - 1:  # the next engine.step() updates the weights
            loss, generation, contrastive, regression, logit_scale, tokens, images, samples = \
                _dp_mean(sums / accumulation).cpu().tolist()
            if not math.isfinite(loss + generation + contrastive + regression):
                raise _non_finite_error(step, loss, generation, contrastive, "stopping before the update")
        engine.step()
    return {"loss": loss, "generation_loss": generation, "contrastive_loss": contrastive, "regression_loss": regression,
            "logit_scale": logit_scale, "grad_norm": engine.get_global_grad_norm(),
            "tokens": tokens * accumulation, "images": images * accumulation, "samples": samples * accumulation}


def pipeline_train_step(engine, batches, cfg: Config, step: int) -> dict:
    """One optimizer step of DeepSpeed's pipeline schedule; metrics come from the last stage.

    DeepSpeed's pipeline engine moves each micro-batch to the device itself.
    """
    from megatron.core import parallel_state

    from lcl_megatron.model.pipeline import LossStage, to_pipeline_batch

    max_images = max_images_per_microbatch(cfg)
    counts = torch.zeros(3, device=engine.device)  # tokens, images, samples

    def micro_batches():
        while True:
            batch = next(batches)
            counts[0] += batch["attention_mask"].sum()
            counts[1] += batch["images"].shape[0]
            counts[2] += samples_in(batch)
            yield to_pipeline_batch(batch, max_images)

    first, last = engine.is_first_stage(), engine.is_last_stage()
    # Later stages take their inputs from the previous one; `batches` holds the last stage's placeholder labels.
    loss = engine.train_batch(data_iter=micro_batches() if first else batches if last else None)
    metrics = torch.zeros(5, device=engine.device)  # loss, generation, contrastive, regression, logit_scale
    if last:
        stage = next(m for m in engine.module.modules() if isinstance(m, LossStage))
        per_micro = torch.stack(stage.last_metrics).mean(0)
        stage.last_metrics.clear()
        metrics = torch.cat([loss.detach().float().reshape(1), per_micro])
        metrics[1:] = _dp_mean(metrics[1:])
    # Every rank learns the numbers of the last stage of data-parallel rank 0's pipeline
    # (rank layout: tp innermost, then dp, then pp).
    p = cfg.parallel
    src = (p.pp - 1) * p.tp * parallel_state.get_data_parallel_world_size()
    dist.broadcast(metrics, src=src)
    if first:
        counts = _dp_mean(counts)
    loss, generation, contrastive, regression, logit_scale, tokens, images, samples = \
        torch.cat([metrics, counts]).cpu().tolist()
    if not math.isfinite(loss + generation + contrastive + regression):
        raise _non_finite_error(step, loss, generation, contrastive, "stopping")
    return {"loss": loss, "generation_loss": generation, "contrastive_loss": contrastive, "regression_loss": regression,
            "logit_scale": logit_scale, "grad_norm": engine.get_global_grad_norm(), "tokens": tokens, "images": images,
            "samples": samples}


def grad_norm_value(value) -> float:
    """The engine's gradient norm (a float, a device tensor or None) as a number: a host read."""
    return float(value) if value is not None else float("nan")
