"""The one adapter between our model and DeepSpeed: the only module that reaches into DeepSpeed.

Without pipeline parallelism the plain LCL model goes into DeepSpeed's engine
(ZeRO 0-3); with it the model is cut into stages (model/pipeline.py) for
DeepSpeed's pipeline engine (ZeRO 0-1). Public DeepSpeed APIs are used where
they exist; what they do not offer (a hook around the optimizer update, the
weight/master pieces of one parameter to clamp, skipping a lone rank's gradient
all-reduce) uses the private names in `PRIVATE_API`, which
tests/unit/test_deepspeed_adapter.py checks against the installed DeepSpeed.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import torch

from lcl_megatron.config import Config
from lcl_megatron.layout import max_images_per_microbatch
from lcl_megatron.model.dims import logit_scale_range
from lcl_megatron.model.names import FP32_MASTER_ATTRIBUTE, FP32_PARAMETERS
from lcl_megatron.model.pipeline import METRICS, LossStage

# DeepSpeed internals this module relies on, as (module, class, name, parameters): a method with
# those parameters, or (parameters None) an attribute the class (or module, class None) assigns. `_take_model_step`
# is the update both engines run once per optimizer step (`step`, `_exec_optimizer_step`); there
# is no public hook around it.
PRIVATE_API = [
    ("deepspeed.runtime.engine", "DeepSpeedEngine", "_take_model_step", ("self", "lr_kwargs")),
    ("deepspeed.runtime.engine", "DeepSpeedEngine", "_global_grad_norm", None),
    # read before each gradient all-reduce; off where one data-parallel rank has nothing to reduce
    ("deepspeed.runtime.engine", "DeepSpeedEngine", "enable_backward_allreduce", None),
    ("deepspeed.runtime.pipe.engine", "PipelineEngine", "agg_additional_losses", None),
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_partition_layers", ("self", "method")),
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_set_bounds", ("self", "start", "stop")),
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_topo", None),
    ("deepspeed.utils.tensor_fragment", "tensor_fragment", "hp_fragment", None),
    # ZeRO-1/2 and the bf16 optimizer point each weight at a slice of their flat bf16 buffer
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "_hp_mapping", None),
    ("deepspeed.runtime.bf16_optimizer", None, "_hp_mapping", None),
    ("deepspeed.runtime.zero.partition_parameters", None, "ds_tensor", None),  # ZeRO-3's partition of a parameter
]
# Callers of `_take_model_step` whose every update must pass through the hook.
UPDATE_CALLERS = [("deepspeed.runtime.engine", "DeepSpeedEngine", "step"),
                  ("deepspeed.runtime.pipe.engine", "PipelineEngine", "_exec_optimizer_step")]


def build_engine(cfg: Config, model):
    import deepspeed
    from megatron.core import parallel_state

    from lcl_megatron.checkpoint.format import SafeCheckpointEngine
    from lcl_megatron.checkpoint.training_state import zero3_partition_of
    from lcl_megatron.parallel import MegatronMPU, verify_groups_match
    from lcl_megatron.training.deepspeed_config import deepspeed_config
    from lcl_megatron.training.optim import build_optimizer, build_scheduler

    dp_size = parallel_state.get_data_parallel_world_size()
    module = model
    if cfg.parallel.pp > 1:
        module = pipeline_stages(cfg, model, dp_size)
        count_replicated_once_per_stage(module)
    optimizer = build_optimizer(module, cfg)
    exact = {id(p): p.detach().clone() for p in _fp32_parameters(module)}  # before DeepSpeed's bf16 cast
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, cfg),
        mpu=None if cfg.parallel.pp > 1 else MegatronMPU,
        config=deepspeed_config(cfg, dp_size, on_gpu=torch.cuda.is_available()),
        dist_init_required=False)
    engine.checkpoint_engine = SafeCheckpointEngine()
    verify_groups_match(engine)
    if dp_size == 1 and not engine.zero_optimization() and not is_pipeline(engine):
        # Alone, DeepSpeed would still copy every gradient into one flat buffer, "average" it over
        # one rank and copy it back: three passes over all gradients that change nothing.
        engine.enable_backward_allreduce = False
    before = measure_grad_norm if not (engine.zero_optimization() or engine.bfloat16_enabled()) else None
    clamp = logit_scale_clamp(engine, logit_scale_range(cfg.model))
    fp32 = cast_fp32_parameters(engine)
    for p in fp32:  # the master DeepSpeed made from its bf16 copy, made exact again
        if hasattr(p, "ds_id"):
            deepspeed.utils.safe_set_local_fp32_param(p, zero3_partition_of(p, exact[id(p)]))
        else:
            deepspeed.utils.safe_set_full_fp32_param(p, exact[id(p)])
    restore_fp32_parameters(engine)

    def after(engine):
        if clamp is not None:
            clamp(engine)
        restore_fp32_parameters(engine)

    around_each_update(engine, before=before, after=after if clamp or fp32 else None)
    return engine


def _fp32_parameters(module) -> list:
    return [p for name, p in module.named_parameters() if name.rsplit(".", 1)[-1] in FP32_PARAMETERS]


def cast_fp32_parameters(engine) -> list:
    """The model's FP32_PARAMETERS that DeepSpeed's bf16 cast made bf16: views of its ZeRO-1/2 flat
    buffers (each optimizer step points them there again) or ZeRO-3 partitions."""
    if not engine.bfloat16_enabled():
        return []
    return [p for p in _fp32_parameters(engine.module)
            if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")]  # on every DP rank, owner of the master or not


def restore_fp32_parameters(engine) -> None:
    """Collective over data-parallel ranks: the weights the model computes with are, for its
    FP32_PARAMETERS, DeepSpeed's fp32 masters themselves. Under ZeRO-1/2 the parameter becomes its
    master (the bf16 copy stays in the flat buffer, unused); ZeRO-3 gathers the parameter from bf16
    partitions at each forward, so the master hangs on it for the model to compute with
    (model/dims.py). Needed after every update and after a checkpoint is loaded into the engine."""
    from deepspeed.utils import safe_get_full_fp32_param

    for p in cast_fp32_parameters(engine):
        if hasattr(p, "ds_id"):
            setattr(p, FP32_MASTER_ATTRIBUTE, safe_get_full_fp32_param(p).reshape(p.ds_shape))
        else:
            p.data = safe_get_full_fp32_param(p).reshape(p.shape)


def pipeline_stages(cfg: Config, model, dp_size: int):
    """The model as DeepSpeed's PipelineModule, cut at our stage boundaries."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from lcl_megatron.model.pipeline import pipeline_layers, stage_boundaries

    parts = stage_boundaries(len(model.text.layers), cfg.parallel.pp, cfg.parallel.pp_first_stage_layers)
    layers = pipeline_layers(model, max_images_per_microbatch(cfg))
    loss_layer = layers[-1]

    class Stages(PipelineModule):
        """The loss stage returns (loss, metrics): the loss goes to DeepSpeed's backward, the metrics to
        DeepSpeed's reporting hook, which averages them over micro-batches and data-parallel ranks
        and broadcasts them to every stage."""

        def __init__(self):
            super().__init__(layers=layers,
                             topology=PipeModelDataParallelTopology(num_pp=cfg.parallel.pp, num_mp=cfg.parallel.tp,
                                                                    num_dp=dp_size),
                             loss_fn=self.split_loss)
            self.metrics = torch.zeros(len(METRICS))  # of the latest micro-batch (last stage only)

        def _partition_layers(self, method="uniform"):
            # Our boundaries: the ViT stage may take fewer LM layers.
            self.parts = parts
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=parts[stage], stop=parts[stage + 1])

        def split_loss(self, outputs, _label):
            loss, self.metrics = outputs
            # Whole-step shares add up over the micro-batches to the step's loss; DeepSpeed divides each
            # micro-batch's loss by the accumulation count (meant for per-micro-batch means), so it gets them
            # that many times over.
            return loss * cfg.train.grad_accumulation if loss_layer.accumulating else loss

        def get_additional_losses(self):
            return OrderedDict(zip(METRICS, self.metrics))

    return Stages()


@contextmanager
def pipeline_feature_cache(engine, data_iter):
    """The reference's feature cache under pipeline parallelism: the step's micro-batches run through
    every stage without gradient (DeepSpeed's inference schedule, `eval_batch`) while the loss stage
    records their contrastive features and counts; the `train_batch` inside the block trains on them
    (see `LossStage`). The same micro-batches must come again, in the same order."""
    loss_stage = next((m for m in engine.module.modules() if isinstance(m, LossStage)), None)  # on the last stage
    if loss_stage is not None:
        loss_stage.record_features()
    try:
        engine.eval_batch(data_iter, reduce_output=None, bcast_loss=False)
        if loss_stage is not None:
            loss_stage.train_on_recorded()
        yield
    finally:
        if loss_stage is not None:
            loss_stage.stop_accumulating()


def pipeline_metrics(engine) -> dict:
    """The loss stage's metrics of the last `train_batch`, as DeepSpeed averaged them (on every rank)."""
    return dict(engine.agg_additional_losses)


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


def around_each_update(engine, before=None, after=None) -> None:
    """Run before(engine) / after(engine) around every optimizer update (plain and pipeline engines)."""
    if before is None and after is None:
        return
    take_step = engine._take_model_step

    def step_with_hooks(*args, **kwargs):
        if before is not None:
            before(engine)
        out = take_step(*args, **kwargs)
        if after is not None:
            after(engine)
        return out

    engine._take_model_step = step_with_hooks


def measure_grad_norm(engine) -> None:
    """Without ZeRO or bf16 DeepSpeed records no gradient norm: measure it before the update."""
    from deepspeed.runtime.utils import get_flattened_grad_norm

    engine._global_grad_norm = float(get_flattened_grad_norm(list(engine.module.parameters()), mpu=engine.mpu))


def logit_scale_clamp(engine, bounds: tuple[float, float]):
    """The reference's rule as an after-update hook: the temperature parameter is clamped to `bounds`
    ([0, ln 100]) in fp32. Clamping the parameter, not its use, keeps its gradient alive, so a
    scale that reached the cap can come down again. Only the ranks that hold `logit_scale` (the
    last pipeline stage) clamp; elsewhere None."""
    params = [p for name, p in engine.module.named_parameters() if name.rsplit(".", 1)[-1] == "logit_scale"]
    if not params:
        return None

    def clamp(_engine):
        for param in params:
            clamp_parameter_(param, *bounds)

    return clamp


def clamp_parameter_(param: torch.nn.Parameter, low: float, high: float) -> None:
    """Clamp a parameter in place, on this rank's pieces: the weight the model uses and, where
    DeepSpeed keeps one, its fp32 master (else the next update would undo the clamp)."""
    with torch.no_grad():
        if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of the weight and of its master
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            param.ds_tensor.clamp_(low, high)  # padding is zero, inside the range
            param.data.clamp_(low, high)  # a small parameter stays gathered (persistent); else empty
            master = safe_get_local_fp32_param(param)
            if master is not None:
                safe_set_local_fp32_param(param, master.clamp(low, high))
            return
        param.data.clamp_(low, high)
        mapping = getattr(param, "_hp_mapping", None)  # ZeRO-1/2 and the bf16 optimizer: flat fp32 partitions
        if mapping is not None and mapping.hp_fragment is not None:
            mapping.hp_fragment.clamp_(low, high)


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)
