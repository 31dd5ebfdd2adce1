"""`lcl train`: the training loop, readable top to bottom.

    lcl train --config configs/demo.yaml [key=value ...] [--resume] [--init-from DIR]

The same loop runs one process or thousands: the layout comes from the config
(`parallel.*`) and the world size from the launcher (torchrun, Slurm).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path


from lcl_megatron.config import Config, ConfigError, data_entries, load_config, steps_for, world_size_from_env
from lcl_megatron.config_docs import default_model_warning, given_keys
from lcl_megatron.data.global_batch import build_loader
from lcl_megatron.layout import Layout


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="lcl train", description="Train an LCL model; writes run.dir (config, metrics.jsonl, checkpoints, tensorboard).", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  lcl train --config configs/demo.yaml train.steps=50 run.dir=runs/try\n  torchrun --nproc-per-node 2 -m lcl_megatron.cli train --config configs/demo.yaml --resume")
    p.add_argument("--config", help="YAML config (defaults apply to keys it omits: `lcl config show` lists them)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint of run.dir")
    p.add_argument("--init-from", help="start from the weights of this checkpoint (not its optimizer state)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p.parse_intermixed_args(argv)  # flags may come before, between or after the overrides


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    Layout.of(cfg, world_size_from_env())
    check_run_dir(cfg.run_dir, resume=args.resume)
    warning = default_model_warning(given_keys(args.config, args.overrides))
    if warning and os.environ.get("RANK", "0") == "0":  # once per job, before the process group exists
        print(f"lcl train: {warning}", file=sys.stderr)
    if cfg.logging.wandb:
        from lcl_megatron.training.wandb_run import require_wandb

        require_wandb()
    init_from = None
    if args.init_from:
        from lcl_megatron.checkpoint.format import resolve_checkpoint

        init_from = resolve_checkpoint(args.init_from)
    check_data(cfg)
    from lcl_megatron.model.pipeline import PipelineInputError
    from lcl_megatron.parallel import destroy_process_groups
    from lcl_megatron.training.step import TrainingError

    try:
        result = train(cfg, resume=args.resume, init_from=init_from)
    except (TrainingError, PipelineInputError) as e:
        print(f"lcl train: {e}", file=sys.stderr)
        return 1
    finally:
        # On every way out (finished, stopped by a signal, failed): process groups left to
        # interpreter teardown can abort a rank that has already written its checkpoint.
        destroy_process_groups()
    return result["exit_code"]  # non-zero when a signal stopped the run and it was not requeued


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse, before anything is built, a run directory we cannot write or whose checkpoints
    this run would mix with its own (and then prune as if they were its own)."""
    from lcl_megatron.checkpoint.format import CHECKPOINTS_DIR, is_complete, step_directories

    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != run_dir and not existing.is_dir():
        raise ConfigError(f"run.dir '{run_dir}' lies under '{existing}', which is a file")
    if existing == run_dir and not run_dir.is_dir():
        raise ConfigError(f"run.dir '{run_dir}' is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir '{run_dir}': cannot write in '{existing}' (permission denied)")
    steps = step_directories(run_dir / CHECKPOINTS_DIR)
    names = ", ".join(p.name for p in steps)
    if steps and not resume:
        raise ConfigError(f"run.dir '{run_dir}' already holds checkpoints ({names}); pass --resume to continue "
                          "that run, or set run.dir to a fresh directory")
    if steps and resume and not any(is_complete(p) for p in steps):
        raise ConfigError(f"--resume: no checkpoint in '{run_dir / CHECKPOINTS_DIR}' is complete ({names}: their saves "
                          "never finished); delete them to start over, or set run.dir to a fresh directory")


def check_data(cfg: Config) -> None:
    """Every embedded corpus named exists and every training dataset yields at least one usable
    sample (read before the model is built)."""
    from lcl_megatron.data.embedded import EMBEDDED_CORPORA
    from lcl_megatron.data.loader import check_readable, settings_for

    for key, entry in data_entries(cfg):
        name = entry.split(":", 1)[1] if entry.startswith("embedded:") else None
        if name is not None and name not in EMBEDDED_CORPORA:
            raise ConfigError(f"config key '{key}' names an unknown embedded corpus {name!r} "
                              f"(known: {', '.join(sorted(EMBEDDED_CORPORA))})")

    settings = settings_for(cfg.data, image_size=cfg.model.vision.image_size,
                            num_image_tokens=cfg.model.vision.num_patches, context_length=cfg.model.text.context_length)
    for entry in cfg.data.path:
        try:
            check_readable(entry, settings)
        except ValueError as e:
            raise ConfigError(f"data.path: {e}") from None


def train(cfg: Config, *, resume: bool = False, init_from: Path | None = None) -> dict:
    import torch
    import yaml
    from megatron.core import parallel_state

    from lcl_megatron.checkpoint.format import CHECKPOINTS_DIR, newest_checkpoint
    from lcl_megatron.checkpoint.manager import CheckpointSaver, load_checkpoint, pick_resume_checkpoint
    from lcl_megatron.parallel import init_distributed, is_main_process
    from lcl_megatron.training.engine import build_engine, is_pipeline, restore_fp32_parameters
    from lcl_megatron.training.initial_model import build_initial_model
    from lcl_megatron.training.batches import TimedBatches, micro_batch_source, reads_data
    from lcl_megatron.training.metrics import MetricsLogger
    from lcl_megatron.training.profiling import StepProfiler, dump_cuda_memory_snapshot, record_cuda_memory_history
    from lcl_megatron.training.throughput import StepMeter
    from lcl_megatron.training.wandb_run import WandbRun
    from lcl_megatron.training.preemption import PreemptionWatcher
    from lcl_megatron.training.step import TrainingError, grad_norm_value, pipeline_train_step, plain_train_step
    from lcl_megatron.utils import DiskFull, atomic_write_text

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    init_distributed(cfg.parallel, timeout_s=cfg.parallel.timeout_s)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    reader = reads_data(parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank())
    cfg.train.steps = steps_for(cfg.train, dp_size)  # train.samples: the steps follow this world's global batch
    run_dir, ckpt_root = cfg.run_dir, cfg.run_dir / CHECKPOINTS_DIR
    newest = pick_resume_checkpoint(ckpt_root, cfg) if resume else None
    config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", config_text)

    model = build_initial_model(cfg, init_from)
    engine = build_engine(cfg, model)
    train_step = pipeline_train_step if is_pipeline(engine) else plain_train_step
    loader = build_loader(cfg, dp_rank, dp_size)
    if is_main_process():
        print(f"lcl train: {describe_backends(cfg, engine, loader, model.backend.name)}", flush=True)

    saver = CheckpointSaver(engine, ckpt_root, cfg, config_text, dp_rank)

    def save(step: int, last: bool = False) -> Path:
        try:
            ckpt = saver.save(step, loader.state_dict() if reader else None, final=step == cfg.train.steps)
            if last:  # the process leaves after it: its files must be on disk
                saver.wait()
        except DiskFull as e:
            intact = newest_checkpoint(ckpt_root)
            raise DiskFull(f"{e}; the checkpoint of step {step} was not saved, "
                           + (f"{intact} is intact: free space, then continue with --resume" if intact else
                              "and there is no earlier one: free space and start again")) from None
        while saver.finished:  # rank 0: the saves completed by now, into metrics.jsonl
            row = saver.finished.pop(0)
            log.log_checkpoint(row.pop("checkpoint_step"), row)
        return ckpt
    step = 0
    if newest is not None:
        step, loader_state = load_checkpoint(engine, newest, dp_rank)
        restore_fp32_parameters(engine)  # loading points them at DeepSpeed's bf16 buffers again
        if loader_state:
            loader.load_state_dict(loader_state)
        elif reader:
            print(f"lcl train: {newest} holds no data position for data-parallel rank {dp_rank}; "
                  "its loader starts from the beginning", file=sys.stderr)
        restart_schedule(engine, step, cfg)
        if is_main_process():
            print(f"lcl train: resumed from {newest} at step {step}", file=sys.stderr)
    elif resume and is_main_process():
        print(f"lcl train: no checkpoint in {ckpt_root}; starting from scratch", file=sys.stderr)
    resumed_step = step

    wandb = WandbRun(run_dir, project=cfg.logging.wandb_project, name=cfg.run.name, config=cfg.to_dict()) \
        if cfg.logging.wandb and is_main_process() else None
    log = MetricsLogger(run_dir, enabled=is_main_process(), tensorboard=cfg.logging.tensorboard,
                        progress=cfg.logging.progress, total_steps=cfg.train.steps, start_step=step, wandb=wandb)
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accumulation * cfg.model.text.context_length
    batches = TimedBatches(micro_batch_source(loader, engine, reader))
    meter = StepMeter(cfg, torch.device(engine.device).type, model) if is_main_process() else None
    profiler = StepProfiler(cfg.train.profile_steps, run_dir / "profile", torch.device(engine.device).type)
    record_cuda_memory_history()
    engine.train()
    last = {}
    # Slurm's warning signal or SIGTERM: finish the step, checkpoint, requeue (training/preemption.py).
    watcher = PreemptionWatcher()
    stop_at = min(cfg.train.steps, step + cfg.train.exit_interval) if cfg.train.exit_interval else cfg.train.steps
    try:
        while step < stop_at:
            start, batches.waited = time.perf_counter(), 0.0
            with profiler.step(step + 1):
                metrics = train_step(engine, batches, cfg, step + 1)
            step += 1
            elapsed = time.perf_counter() - start
            log.advance()
            if step % cfg.logging.every == 0 or step == stop_at:
                last = {"step": step, "loss": metrics["loss"], "contrastive_loss": metrics["contrastive_loss"],
                        "generation_loss": metrics["generation_loss"], "regression_loss": metrics["regression_loss"],
                        "lr": engine.get_lr()[0],
                        "grad_norm": grad_norm_value(metrics["grad_norm"]), "logit_scale": metrics["logit_scale"],
                        "samples_per_s": metrics["samples"] * dp_size / elapsed,
                        "tokens_per_s": metrics["tokens"] * dp_size / elapsed,
                        "token_utilisation": metrics["tokens"] / tokens_per_step,
                        "data_skipped": skipped_counts(loader, cfg, engine.device)}
                if meter is not None:
                    last.update(meter.measure(elapsed, batches.waited, images=metrics["images"] * dp_size,
                                              tokens=metrics["tokens"] * dp_size))
                log.log(last)
            if watcher.stop_requested():  # collective: every rank leaves after the same step
                break
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < stop_at:
                save(step)
            if cfg.eval.every and step % cfg.eval.every == 0:
                evaluate_during_training(model, engine, cfg, log, step)
        # A requeued or chained job that resumes at its end has nothing left to save.
        final = newest if newest is not None and step == resumed_step else save(step, last=True)
        if cfg.data.heldout and step == cfg.train.steps:
            last["zeroshot_top1"] = evaluate_final(model, engine, cfg, log, step)
    except torch.OutOfMemoryError:
        snapshot = dump_cuda_memory_snapshot(run_dir / f"oom_snapshot_rank{torch.distributed.get_rank()}.pickle")
        raise TrainingError(f"out of GPU memory at step {step + 1}; the allocations leading there are in {snapshot} "
                            "(open it at https://pytorch.org/memory_viz)") from None
    finally:
        # Shutdown order: the logs (TensorBoard's writer thread) closed and the signal handlers
        # put back here; the process groups last, in `main`, once nothing here can use them.
        log.close()
        watcher.close()
    if is_main_process():
        print(f"checkpoint: {final}")
    last["exit_code"] = watcher.after_final_checkpoint()
    return last


def describe_backends(cfg: Config, engine, loader, layers: str) -> str:
    """One line: what runs where, so a slow or surprising run shows its cause at the start."""
    import torch
    import torch.distributed as dist

    from kernels.attention import backend_name
    from lcl_megatron.loss import describe_losses
    from lcl_megatron.training.step import describe_negatives

    device = torch.device(engine.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = "bf16 (fp32 master weights, gradients accumulated and reduced in fp32)" \
        if cfg.train.precision == "bf16" else "fp32" + (" (TF32 matmuls)" if device.type == "cuda" and cfg.train.tf32 else "")
    zero = engine.zero_optimization_stage() if engine.zero_optimization() else 0
    workers = getattr(getattr(loader, "loader", loader), "num_workers", 0)
    return (f"{dist.get_world_size()} x {name}, {precision}, ZeRO {zero}; attention {backend_name(device.type)}; "
            f"losses {describe_losses(cfg.loss.impl, device.type)}, {describe_negatives(cfg)}; layers {layers}; "
            f"{workers} loader worker(s) per reader")


def skipped_counts(loader, cfg: Config, device) -> dict:
    """Collective: input the loaders could not use since the start of this process, per reason,
    summed over the data-parallel ranks that read different shards."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from lcl_megatron.data.samples import SKIP_REASONS

    counts = torch.tensor([loader.stats.get(reason, 0) for reason in SKIP_REASONS], dtype=torch.long, device=device)
    if cfg.data.split == "shards" and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return {reason: int(n) for reason, n in zip(SKIP_REASONS, counts.tolist()) if n}


def restart_schedule(engine, step: int, cfg: Config) -> None:
    """Continue the schedule of *this* config from `step`: a resumed run may change
    train.steps (to extend a run), and the restored optimizer holds the old run's rate."""
    from lcl_megatron.training.optim import lr_at

    lr = lr_at(step, cfg)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    scheduler = engine.lr_scheduler
    scheduler.last_epoch = step
    scheduler._last_lr = [lr] * len(scheduler.base_lrs)


@contextlib.contextmanager
def full_model(model, engine, cfg: Config):
    """The whole plain model on every rank, in eval mode, for the length of the block.

    ZeRO-3 gathers every partition (the full weights in memory while it lasts);
    under pipeline parallelism each stage holds only its layers, so every rank
    receives the other stages' weights into its copy of the plain model (which the
    stages share their own modules with). TP shards stay sharded: every rank runs
    the evaluation and the TP collectives stay in step.
    """
    if engine.zero_optimization_partition_weights():
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(model.parameters()))
    else:
        gathered = contextlib.nullcontext()
        if engine.module is not model:
            from lcl_megatron.checkpoint.consolidated import whole_model_tensors
            from lcl_megatron.model.sharding import load_canonical

            load_canonical(model, whole_model_tensors(engine, cfg.model.text.vocab_size))
            model.to(engine.device)  # the other stages' modules never left the host
    with gathered:
        model.eval()
        try:
            yield model
        finally:
            engine.train()


def evaluate_during_training(model, engine, cfg: Config, log, step: int) -> dict:
    """The `eval` section's evaluations at `step`, logged to metrics.jsonl and TensorBoard."""
    from lcl_megatron.eval.suite import evaluate_all
    from lcl_megatron.parallel import is_main_process

    with full_model(model, engine, cfg):
        results = evaluate_all(model, cfg)
    log.log_eval(step, results)
    if is_main_process():
        print(f"lcl train: step {step} eval " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()), file=sys.stderr)
    return results


def evaluate_final(model, engine, cfg: Config, log, step: int) -> float:
    """Zero-shot top-1 of the final weights on the held-out set, on every rank (TP collectives stay in step)."""
    from lcl_megatron.eval.datasets import LabelledSet
    from lcl_megatron.eval.zeroshot import zeroshot_evaluate

    with full_model(model, engine, cfg):
        top1 = zeroshot_evaluate(model, LabelledSet.open(cfg.data.heldout), cfg.eval.batch_size)["top1"]
    log.log_eval(step, {"zeroshot_top1": top1})
    log.message(f"zero-shot top-1 on {cfg.data.heldout} (held out): {top1:.4f}")
    return top1
