"""The model wrapped in a DeepSpeed engine, and one optimizer step on it.

Without pipeline parallelism the plain LCL model goes into DeepSpeed's engine
(ZeRO 0-3); with it the model is cut into stages (model/pipeline.py) for
DeepSpeed's pipeline engine (ZeRO 0-1). Both step functions return the same
metrics, averaged over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from lcl_megatron.config import Config


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss): one line, exit code 1."""


def max_images_per_microbatch(cfg: Config) -> int:
    return cfg.parallel.max_images or cfg.train.micro_batch_size * cfg.data.max_images


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accumulation,
        "train_batch_size": t.micro_batch_size * t.grad_accumulation * dp_size,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        # Stages send more than one tensor that needs a gradient (the image latents ride along for
        # the contrastive loss); DeepSpeed's partitioned pipe tensors carry only the first one.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


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
        mpu=None if cfg.parallel.pp > 1 else MegatronMPU, config=deepspeed_config(cfg, dp_size),
        dist_init_required=False)
    engine.checkpoint_engine = SafeCheckpointEngine()
    verify_groups_match(engine)
    record_grad_norm(engine)
    clamp_logit_scale_after_each_step(engine, cfg.model.max_logit_scale)
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


def _all_finite(values: torch.Tensor) -> bool:
    flag = torch.isfinite(values).all().float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _dp_mean(values: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    values = values.detach().clone()
    dist.all_reduce(values, group=group)
    return values / dist.get_world_size(group)


def plain_train_step(engine, batches, cfg: Config, step: int) -> dict:
    """One optimizer step over `train.grad_accumulation` micro-batches."""
    sums, tokens = torch.zeros(4), torch.zeros(1)
    for _ in range(cfg.train.grad_accumulation):
        batch = next(batches)
        out = engine(batch["images"], batch["input_ids"], batch["attention_mask"],
                     batch.get("position_ids"), batch.get("cu_seqlens"))
        values = torch.stack([out["loss"].detach().float(), out["generation_loss"].float(),
                              out["contrastive_loss"].float(), out["logit_scale"].float()])
        if not _all_finite(values[:3]):
            raise TrainingError(f"non-finite loss at step {step} (loss={values[0].item()}, generation="
                                f"{values[1].item()}, contrastive={values[2].item()}); stopping before the update")
        engine.backward(out["loss"])
        engine.step()
        sums += values
        tokens += batch["attention_mask"].sum()
    mean = _dp_mean(sums / cfg.train.grad_accumulation)
    return {"loss": mean[0].item(), "generation_loss": mean[1].item(), "contrastive_loss": mean[2].item(),
            "logit_scale": mean[3].item(), "grad_norm": _float(engine.get_global_grad_norm()),
            "tokens": _dp_mean(tokens).item()}


def pipeline_train_step(engine, batches, cfg: Config, step: int) -> dict:
    """One optimizer step of DeepSpeed's pipeline schedule; metrics come from the last stage."""
    from megatron.core import parallel_state

    from lcl_megatron.model.pipeline import LossStage, to_pipeline_batch

    max_images = max_images_per_microbatch(cfg)
    tokens = torch.zeros(1)

    def micro_batches():
        nonlocal tokens
        while True:
            batch = next(batches)
            tokens += batch["attention_mask"].sum()
            yield to_pipeline_batch(batch, max_images)

    first, last = engine.is_first_stage(), engine.is_last_stage()
    loss = engine.train_batch(data_iter=micro_batches() if (first or last) else None)
    metrics = torch.zeros(4)
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
    if not torch.isfinite(metrics[:3]).all():
        raise TrainingError(f"non-finite loss at step {step} (loss={metrics[0].item()}, generation="
                            f"{metrics[1].item()}, contrastive={metrics[2].item()}); stopping")
    if first:
        tokens = _dp_mean(tokens)
    return {"loss": metrics[0].item(), "generation_loss": metrics[1].item(), "contrastive_loss": metrics[2].item(),
            "logit_scale": metrics[3].item(), "grad_norm": _float(engine.get_global_grad_norm()),
            "tokens": tokens.item()}


def _float(value) -> float:
    return float(value) if value is not None else float("nan")
