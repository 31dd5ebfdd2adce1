"""`lcl train`: the training loop, readable top to bottom.

    lcl train --config configs/demo.yaml [key=value ...] [--resume] [--init-from DIR]

The same loop runs one process or thousands: the layout comes from the config
(`parallel.*`) and the world size from the launcher (torchrun, Slurm).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


from lcl_megatron.config import Config, ConfigError, check_layout, load_config, world_size_from_env
from lcl_megatron.config_docs import default_model_warning, given_keys


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="lcl train", description="Train an LCL model; writes run.dir (config, metrics.jsonl, checkpoints, tensorboard).", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  lcl train --config configs/demo.yaml train.steps=50 run.dir=runs/try\n  torchrun --nproc-per-node 2 -m lcl_megatron.cli train --config configs/demo.yaml --resume")
    p.add_argument("--config", help="YAML config (defaults apply to keys it omits: `lcl config show` lists them)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint of run.dir")
    p.add_argument("--init-from", help="start from the weights of this checkpoint (not its optimizer state)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_layout(cfg.parallel, world_size_from_env())
        warning = default_model_warning(given_keys(args.config, args.overrides))
        if warning and os.environ.get("RANK", "0") == "0":  # once per job, before the process group exists
            print(f"lcl train: {warning}", file=sys.stderr)
        init_from = None
        if args.init_from:
            from lcl_megatron.training.checkpoint import resolve_checkpoint

            try:
                init_from = resolve_checkpoint(args.init_from)
            except FileNotFoundError as e:
                raise ConfigError(f"--init-from: {e}") from None
    except ConfigError as e:
        print(f"lcl train: {e}", file=sys.stderr)
        return 2
    from lcl_megatron.convert.native import CheckpointMismatch
    from lcl_megatron.model.pipeline import PipelineInputError
    from lcl_megatron.training.engine import TrainingError

    try:
        result = train(cfg, resume=args.resume, init_from=init_from)
    except CheckpointMismatch as e:
        print(f"lcl train: {e}", file=sys.stderr)
        return 2
    except (TrainingError, PipelineInputError) as e:
        print(f"lcl train: {e}", file=sys.stderr)
        return 1
    return result["exit_code"]  # non-zero when a signal stopped the run and it was not requeued


def build_loader(cfg: Config, dp_rank: int, dp_size: int):
    from lcl_megatron.data.global_batch import GlobalBatchSlicer
    from lcl_megatron.data.loader import build_train_loader

    v = cfg.model.vision
    by_samples = cfg.data.split == "samples"
    loader = build_train_loader(cfg.data, image_size=v.image_size, num_image_tokens=v.num_patches,
                                context_length=cfg.model.text.context_length,
                                micro_batch_size=cfg.train.micro_batch_size * (dp_size if by_samples else 1),
                                dp_rank=0 if by_samples else dp_rank, dp_size=1 if by_samples else dp_size,
                                seed=cfg.train.seed)
    return GlobalBatchSlicer(loader, dp_rank, dp_size) if by_samples else loader


def train(cfg: Config, *, resume: bool = False, init_from: Path | None = None) -> dict:
    import yaml
    from megatron.core import parallel_state

    from lcl_megatron.parallel import init_distributed, is_main_process
    from lcl_megatron.training import checkpoint as ckpt
    from lcl_megatron.training.engine import (build_engine, build_model, is_pipeline, pipeline_train_step,
                                              plain_train_step)
    from lcl_megatron.training.metrics import MetricsLogger
    from lcl_megatron.training.preemption import PreemptionWatcher
    from lcl_megatron.utils import atomic_write_text

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init_distributed(cfg.parallel, timeout_s=cfg.parallel.timeout_s)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    run_dir, ckpt_root = cfg.run_dir, cfg.run_dir / "checkpoints"
    config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", config_text)

    model = build_model(cfg, init_from)
    engine = build_engine(cfg, model)
    train_step = pipeline_train_step if is_pipeline(engine) else plain_train_step
    loader = build_loader(cfg, dp_rank, dp_size)
    save = lambda step: ckpt.save_checkpoint(engine, ckpt_root, step, config_text=config_text,
                                             loader_state=loader.state_dict(), dp_rank=dp_rank,
                                             keep=cfg.checkpoint.keep, vocab_size=cfg.model.text.vocab_size)
    step, newest = 0, None
    if resume:
        newest = ckpt.newest_checkpoint(ckpt_root)
        if newest is not None:
            step, loader_state = ckpt.load_checkpoint(engine, newest, dp_rank)
            if loader_state:
                loader.load_state_dict(loader_state)
            else:
                print(f"lcl train: {newest} holds no data position for data-parallel rank {dp_rank}; "
                      "its loader starts from the beginning", file=sys.stderr)
            restart_schedule(engine, step, cfg)
            if is_main_process():
                print(f"lcl train: resumed from {newest} at step {step}", file=sys.stderr)
        elif is_main_process():
            print(f"lcl train: no complete checkpoint in {ckpt_root}; starting from scratch", file=sys.stderr)
    resumed_step = step

    log = MetricsLogger(run_dir, enabled=is_main_process(), tensorboard=cfg.logging.tensorboard,
                        progress=cfg.logging.progress, total_steps=cfg.train.steps, start_step=step)
    samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accumulation * dp_size
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accumulation * cfg.model.text.context_length
    batches = iter(loader)
    engine.train()
    last = {}
    # Slurm's warning signal or SIGTERM: finish the step, checkpoint, requeue (training/preemption.py).
    watcher = PreemptionWatcher()
    stop_at = min(cfg.train.steps, step + cfg.train.exit_interval) if cfg.train.exit_interval else cfg.train.steps
    try:
        while step < stop_at:
            start = time.perf_counter()
            metrics = train_step(engine, batches, cfg, step + 1)
            step += 1
            elapsed = time.perf_counter() - start
            log.advance()
            if step % cfg.logging.every == 0 or step == stop_at:
                last = {"step": step, "loss": metrics["loss"], "contrastive_loss": metrics["contrastive_loss"],
                        "generation_loss": metrics["generation_loss"], "lr": engine.get_lr()[0],
                        "grad_norm": metrics["grad_norm"], "logit_scale": metrics["logit_scale"],
                        "samples_per_s": samples_per_step / elapsed,
                        "tokens_per_s": metrics["tokens"] * dp_size / elapsed,
                        "token_utilisation": metrics["tokens"] / tokens_per_step}
                log.log(last)
            if watcher.stop_requested():  # collective: every rank leaves after the same step
                break
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < stop_at:
                save(step)
        # A requeued or chained job that resumes at its end has nothing left to save.
        final = newest if newest is not None and step == resumed_step else save(step)
        if cfg.data.heldout and step == cfg.train.steps:
            last["zeroshot_top1"] = evaluate_final(model, engine, final, cfg, log, step)
    finally:
        log.close()
    if is_main_process():
        print(f"checkpoint: {final}")
    last["exit_code"] = watcher.after_final_checkpoint()
    return last


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


def evaluate_final(model, engine, final: Path, cfg: Config, log, step: int) -> float:
    """Zero-shot top-1 of the final weights, on every rank (TP collectives stay in step)."""
    from lcl_megatron.eval.zeroshot import zeroshot_accuracy
    from lcl_megatron.model.sharding import load_canonical
    from lcl_megatron.parallel import is_main_process
    from lcl_megatron.training.checkpoint import MODEL_FILE, load_model_file

    if engine.module is not model or engine.zero_optimization_partition_weights():
        # Pipeline stages and ZeRO-3 partitions hold only parts: reload the full consolidated weights.
        load_canonical(model, load_model_file(final / MODEL_FILE))
    model.eval()
    top1 = zeroshot_accuracy(model, cfg)
    log.log_eval(step, {"zeroshot_top1": top1})
    if is_main_process():
        print(f"zero-shot top-1 on {cfg.data.heldout} (held out): {top1:.4f}")
    return top1
