"""`lcl convert reshard` between layouts: training continues on the new layout as it would have on the old.

Four steps at TP=2 x PP=2 x DP=2 with ZeRO-1 (8 processes, `lcl train` under
torchrun, fp32 on CPU, global batch fixed by data.split=samples), checkpointed
after steps 2 and 4. Reshard reads the step-2 checkpoint's DeepSpeed files in
this one process (no process is started) into `consolidated`, and that again
into PP=2 and into DP=2 with ZeRO-3 (the canonical state is layout-free, so
this equals resharding the source: only config.yaml and the loader states
depend on the target). Steps 3-4 resumed on those two layouts match the
8-process run's; their own step-4 checkpoints (ZeRO-0 pipeline layer files;
every parameter cut into padded halves), resharded, hold the 8-process run's
step-4 state.
"""

import json
import multiprocessing
import subprocess

import pytest

from tests.support.launch import free_port, read_metrics, run_lcl, with_overrides
from tests.support.configs import GLOBAL_BATCH, TINY

STEPS = 4


def _train(run_dir, nproc, *args, resume=False):
    # In-process runs in this session (init_distributed) leave RANK and MASTER_PORT in the environment,
    # and their store still listens there: give a one-process child a fresh port.
    run_lcl(["train", *(["--resume"] if resume else []), *args, f"run.dir={run_dir}", f"train.steps={STEPS}"],
            nproc=nproc, env={"MASTER_PORT": str(free_port())})


def _reshard(src, layout, out, monkeypatch):
    """`lcl convert reshard` in this process; starting any other process fails it."""
    from lcl_megatron import cli

    def refuse(*args, **kwargs):
        raise AssertionError("reshard started a process")

    with monkeypatch.context() as m:
        m.setattr(subprocess.Popen, "__init__", refuse)
        m.setattr(multiprocessing.Process, "start", refuse)
        assert cli.main(["convert", "reshard", "--checkpoint", str(src), "--layout", layout, "--out", str(out)]) == 0
    return out


def _canonical_state(ckpt):
    from safetensors.torch import load_file

    from lcl_megatron.checkpoint.format import OPTIMIZER_STATE, OPTIMIZER_TENSORS

    return load_file(ckpt / OPTIMIZER_TENSORS), json.loads((ckpt / OPTIMIZER_STATE).read_text())


def test_reshard_tp2_pp2_dp2_in_one_process_then_pp2_and_dp2_zero3_continue_alike(tmp_path, monkeypatch):
    import torch

    original = tmp_path / "tp2_pp2_dp2"
    tiny = [t for t in TINY if not t.startswith("train.steps=")]  # _train sets it (a key given twice is refused)
    _train(original, 8, "--config", "configs/demo.yaml",
           *with_overrides(tiny, "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1",
                           f"train.micro_batch_size={GLOBAL_BATCH // 2}", "checkpoint.every=2"))
    expected = read_metrics(original)
    assert [m["step"] for m in expected] == [1, 2, 3, 4]
    step2, step4 = "checkpoints/step_00000002", "checkpoints/step_00000004"
    assert (original / step2 / "zero_pp_rank_1_mp_rank_03_optim_states.pt").is_file()  # DP rank 1's ZeRO partition
    consolidated = _reshard(original / step2, "consolidated", tmp_path / "consolidated" / step2, monkeypatch)
    pp2 = _reshard(consolidated, "pp=2", tmp_path / "pp2" / step2, monkeypatch)
    dp2_zero3 = _reshard(consolidated, "tp=1,pp=1,dp=2,zero=3", tmp_path / "dp2_zero3" / step2, monkeypatch)
    manifest = json.loads((dp2_zero3 / "COMPLETE").read_text())
    assert manifest["world_size"] == 2 and manifest["source_layout"] == {"tp": 1, "pp": 1, "dp": 1, "zero": 0}
    assert json.loads((consolidated / "COMPLETE").read_text())["source_layout"] == {"tp": 2, "pp": 2, "dp": 2,
                                                                                      "zero": 1}

    for ckpt, nproc in ((pp2, 2), (dp2_zero3, 2)):
        _train(ckpt.parent.parent, nproc, "--config", str(ckpt / "config.yaml"), resume=True)
        got = read_metrics(ckpt.parent.parent)
        assert [m["step"] for m in got] == [3, 4], ckpt
        for ref, m in zip(expected[2:], got):
            for key in ("loss", "generation_loss", "contrastive_loss", "lr"):
                assert m[key] == pytest.approx(ref[key], rel=1e-4), (str(ckpt), key, ref["step"])

    source = _canonical_state(_reshard(original / step4, "consolidated", tmp_path / "source4", monkeypatch))
    for run in ("pp2", "dp2_zero3"):
        resumed = _canonical_state(_reshard(tmp_path / run / step4, "consolidated", tmp_path / f"{run}_4",
                                            monkeypatch))
        assert resumed[1]["adam_step"] == source[1]["adam_step"] == 4
        assert resumed[1]["global_steps"] == 4 and resumed[1]["global_samples"] == source[1]["global_samples"]
        assert resumed[0].keys() == source[0].keys()
        for key, value in source[0].items():
            torch.testing.assert_close(resumed[0][key], value, rtol=1e-3, atol=1e-6, msg=lambda m: f"{run} {key}: {m}")


def test_canonical_state_round_trip_into_another_engine(tmp_path):
    """One process: after a ZeRO-0 step the canonical state read from DeepSpeed's files, loaded into a ZeRO-3
    engine built from another seed, saved by DeepSpeed and read again, is the same; the next step then
    matches the ZeRO-0 engine's."""
    import torch
    from safetensors.torch import load_file

    from lcl_megatron.config import load_config
    from lcl_megatron.checkpoint.consolidated import gather_model_file
    from lcl_megatron.checkpoint.format import OPTIMIZER_TENSORS, save_model_file, write_manifest
    from lcl_megatron.checkpoint.training_state import load_canonical_state, write_canonical_state
    from lcl_megatron.parallel import init_distributed
    from lcl_megatron.training.engine import build_engine
    from lcl_megatron.training.initial_model import build_initial_model
    from lcl_megatron.training.step import plain_train_step
    from lcl_megatron.data.global_batch import build_loader

    def save_canonical(engine, cfg, out):  # DeepSpeed's files as `lcl train` writes them, read as reshard does
        engine.save_checkpoint(str(tmp_path / "deepspeed"), tag=out.name, save_latest=False)
        out.mkdir(exist_ok=True)
        write_canonical_state(tmp_path / "deepspeed" / out.name, out, cfg, 1)
        return load_file(out / OPTIMIZER_TENSORS)

    tiny = [*TINY, "train.micro_batch_size=4"]
    cfg = load_config("configs/demo.yaml", tiny)
    init_distributed(cfg.parallel)
    vocab = cfg.model.text.vocab_size
    source = build_engine(cfg, build_initial_model(cfg))
    batches = iter(build_loader(cfg, 0, 1))
    plain_train_step(source, batches, cfg, 1)
    saved = tmp_path / "saved"
    first = save_canonical(source, cfg, saved)
    name, tensors = gather_model_file(source, vocab)
    save_model_file(tensors, saved / name)
    write_manifest(saved, {"step": 1})

    target_cfg = load_config("configs/demo.yaml", with_overrides(tiny, "parallel.zero_stage=3", "train.seed=99"))
    target = build_engine(target_cfg, build_initial_model(target_cfg))
    assert load_canonical_state(target, saved)["step"] == 1
    second = save_canonical(target, target_cfg, tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    batch = next(batches)
    steps = {name: plain_train_step(engine, iter([batch]), cfg, 2) for name, engine in
             (("source", source), ("target", target))}
    for key in ("loss", "generation_loss", "contrastive_loss"):
        assert steps["target"][key] == pytest.approx(steps["source"][key], rel=1e-5), key
    assert target.get_lr() == pytest.approx(source.get_lr(), rel=1e-9)
    # Adam's moments went into the update alike
    first = save_canonical(source, cfg, tmp_path / "saved2")
    second = save_canonical(target, target_cfg, tmp_path / "again2")
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-4, atol=1e-7, msg=lambda m: f"{key}: {m}")
