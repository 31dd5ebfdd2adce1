"""`lcl train`: the training loop, readable top to bottom.

    lcl train --config configs/demo.yaml [key=value ...] [--resume] [--init-from DIR]

The same loop runs one process or thousands: the layout comes from the config
(`parallel.*`) and the world size from the launcher (torchrun, Slurm).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lcl_megatron.config import Config, ConfigError, load_config
from lcl_megatron.parallel import check_layout, world_size_from_env


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss): one line, exit code 1."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lcl train", description="Train an LCL model.")
    p.add_argument("--config", help="YAML config (defaults apply to keys it omits)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint of run.dir")
    p.add_argument("--init-from", help="start from the weights of this checkpoint (not its optimizer state)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_layout(cfg.parallel, world_size_from_env())
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

    try:
        train(cfg, resume=args.resume, init_from=init_from)
    except CheckpointMismatch as e:
        print(f"lcl train: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"lcl train: {e}", file=sys.stderr)
        return 1
    return 0


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
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, init_from: Path | None = None):
    """Model, optimizer and schedule wrapped in a DeepSpeed engine over megatron's groups."""
    import deepspeed
    from megatron.core import parallel_state

    from lcl_megatron.model.lcl import LCLModel
    from lcl_megatron.parallel import MegatronMPU, verify_groups_match
    from lcl_megatron.training.checkpoint import SafeCheckpointEngine, load_model_file, MODEL_FILE
    from lcl_megatron.training.optim import build_optimizer, build_scheduler

    torch.manual_seed(cfg.train.seed)  # identical on every rank: replicated weights agree, TP shards split one init
    model = LCLModel.from_config(cfg)
    if init_from is not None:
        from lcl_megatron.convert.native import check_tensors
        from lcl_megatron.model.sharding import canonical_shapes, load_canonical

        tensors = load_model_file(init_from / MODEL_FILE)
        check_tensors(canonical_shapes(model), tensors, what=f"--init-from checkpoint '{init_from}'")
        load_canonical(model, tensors)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=MegatronMPU,
        config=deepspeed_config(cfg, parallel_state.get_data_parallel_world_size()), dist_init_required=False)
    engine.checkpoint_engine = SafeCheckpointEngine()
    verify_groups_match(engine)
    return engine


def _grad_norm_before_step(engine):
    """Without ZeRO or bf16 DeepSpeed records no gradient norm, so measure it (TP-aware)."""
    if engine.zero_optimization() or engine.bfloat16_enabled():
        return None
    from deepspeed.runtime.utils import get_flattened_grad_norm

    return float(get_flattened_grad_norm(list(engine.module.parameters()), mpu=engine.mpu))


def _all_finite(values: torch.Tensor) -> bool:
    flag = torch.isfinite(values).all().float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _dp_mean(values: torch.Tensor, group) -> torch.Tensor:
    values = values.detach().clone()
    dist.all_reduce(values, group=group)
    return values / dist.get_world_size(group)


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
    from lcl_megatron.training.metrics import MetricsLogger
    from lcl_megatron.utils import atomic_write_text

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init_distributed(cfg.parallel)
    dp_group = parallel_state.get_data_parallel_group()
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    run_dir, ckpt_root = cfg.run_dir, cfg.run_dir / "checkpoints"
    config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", config_text)

    engine = build_engine(cfg, init_from)
    loader = build_loader(cfg, dp_rank, dp_size)
    step = 0
    if resume:
        newest = ckpt.newest_checkpoint(ckpt_root)
        if newest is not None:
            step, loader_state = ckpt.load_checkpoint(engine, newest, dp_rank)
            loader.load_state_dict(loader_state)
            if is_main_process():
                print(f"lcl train: resumed from {newest} at step {step}", file=sys.stderr)
        elif is_main_process():
            print(f"lcl train: no complete checkpoint in {ckpt_root}; starting from scratch", file=sys.stderr)

    log = MetricsLogger(run_dir, enabled=is_main_process(), tensorboard=cfg.logging.tensorboard,
                        progress=cfg.logging.progress, total_steps=cfg.train.steps, start_step=step)
    batches = iter(loader)
    engine.train()
    last = {}
    while step < cfg.train.steps:
        start = time.perf_counter()
        sums = torch.zeros(3)
        tokens_seen = torch.zeros(1)
        grad_norm = None
        for micro in range(cfg.train.grad_accumulation):
            batch = next(batches)
            out = engine(batch["images"], batch["input_ids"], batch["attention_mask"])
            values = torch.stack([out["loss"].detach().float(), out["generation_loss"].float(),
                                  out["contrastive_loss"].float()])
            if not _all_finite(values):
                log.close()
                raise TrainingError(f"non-finite loss at step {step + 1} (loss={values[0].item()}, "
                                    f"generation={values[1].item()}, contrastive={values[2].item()}); stopping")
            engine.backward(out["loss"])
            if micro == cfg.train.grad_accumulation - 1:
                grad_norm = _grad_norm_before_step(engine)
            engine.step()
            sums += values
            tokens_seen += batch["attention_mask"].sum()
        step += 1
        elapsed = time.perf_counter() - start
        log.advance()
        if step % cfg.logging.every == 0 or step == cfg.train.steps:
            mean = _dp_mean(sums / cfg.train.grad_accumulation, dp_group)
            tokens_total = _dp_mean(tokens_seen, dp_group) * dp_size
            grad_norm = grad_norm if grad_norm is not None else engine.get_global_grad_norm()
            last = {
                "step": step,
                "loss": mean[0].item(),
                "contrastive_loss": mean[2].item(),
                "generation_loss": mean[1].item(),
                "lr": engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "logit_scale": float(out["logit_scale"]),
                "samples_per_s": cfg.train.micro_batch_size * cfg.train.grad_accumulation * dp_size / elapsed,
                "tokens_per_s": tokens_total.item() / elapsed,
            }
            log.log(last)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
            ckpt.save_checkpoint(engine, ckpt_root, step, config_text=config_text,
                                 loader_state=loader.state_dict(), dp_rank=dp_rank, keep=cfg.checkpoint.keep)

    final = ckpt.save_checkpoint(engine, ckpt_root, step, config_text=config_text,
                                 loader_state=loader.state_dict(), dp_rank=dp_rank, keep=cfg.checkpoint.keep)
    if cfg.data.heldout:
        from lcl_megatron.eval.zeroshot import zeroshot_accuracy

        engine.eval()
        top1 = zeroshot_accuracy(engine.module, cfg)
        log.log_eval(step, {"zeroshot_top1": top1})
        if is_main_process():
            print(f"zero-shot top-1 on {cfg.data.heldout} (held out): {top1:.4f}")
        last["zeroshot_top1"] = top1
    log.close()
    if is_main_process():
        print(f"checkpoint: {final}")
    return last
