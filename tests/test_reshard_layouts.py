"""`lcl convert reshard` between layouts: training continues on the new layout as it would have on the old.

Three steps at TP=2 x PP=2 (4 processes, `lcl train` under torchrun, fp32 on
CPU, global batch fixed by data.split=samples), checkpointed; then steps 4-6
three ways: `--resume` on TP=2 x PP=2; on one process from the checkpoint
resharded to `consolidated` (DeepSpeed reads the source on its 4 processes);
on DP=2 with ZeRO-3 from that one resharded again to `tp=1,pp=1,dp=2,zero=3`
(the canonical state is layout-free, so this equals resharding the source:
only config.yaml and the loader states depend on the target). The resumed
runs read the config reshard wrote, with the target layout.
"""

import json

import pytest

from tests.launch import free_port, read_metrics, run_lcl
from tests.test_parallel_equivalence import GLOBAL_BATCH, TINY

STEPS = 6


def _train(run_dir, nproc, *args, resume=False):
    # In-process runs in this session (init_distributed) leave RANK and MASTER_PORT in the environment,
    # and their store still listens there: give a one-process child a fresh port.
    run_lcl(["train", *(["--resume"] if resume else []), *args, f"run.dir={run_dir}", f"train.steps={STEPS}"],
            nproc=nproc, env={"MASTER_PORT": str(free_port())})


def _reshard(src, layout, out):
    from lcl_megatron import cli

    assert cli.main(["convert", "reshard", "--checkpoint", str(src), "--layout", layout, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_reshard_tp2_pp2_to_one_process_and_to_dp2_zero3_continues_alike(tmp_path):
    original = tmp_path / "tp2_pp2"
    tiny = [t for t in TINY if not t.startswith("train.steps=")]  # _train sets it (a key given twice is refused)
    config = ["--config", "configs/demo.yaml", *tiny, "parallel.tp=2", "parallel.pp=2",
              f"train.micro_batch_size={GLOBAL_BATCH}"]
    _train(original, 4, *config, "train.exit_interval=3")
    assert [m["step"] for m in read_metrics(original)] == [1, 2, 3]
    step3 = "checkpoints/step_00000003"
    consolidated = _reshard(original / step3, "consolidated", tmp_path / "consolidated" / step3)
    dp2_zero3 = _reshard(consolidated, "tp=1,pp=1,dp=2,zero=3", tmp_path / "dp2_zero3" / step3)
    manifest = json.loads((dp2_zero3 / "COMPLETE").read_text())
    assert manifest["world_size"] == 2 and manifest["source_layout"] == {"tp": 1, "pp": 1, "dp": 1, "zero": 0}
    assert json.loads((consolidated / "COMPLETE").read_text())["source_layout"] == {"tp": 2, "pp": 2, "dp": 1,
                                                                                      "zero": 0}

    _train(original, 4, *config, resume=True)
    expected = [m for m in read_metrics(original) if m["step"] > 3]
    assert [m["step"] for m in expected] == [4, 5, 6]
    for ckpt, nproc in ((consolidated, 1), (dp2_zero3, 2)):
        _train(ckpt.parent.parent, nproc, "--config", str(ckpt / "config.yaml"), resume=True)
        got = read_metrics(ckpt.parent.parent)
        assert [m["step"] for m in got] == [4, 5, 6], ckpt
        for ref, m in zip(expected, got):
            for key in ("loss", "generation_loss", "contrastive_loss", "lr"):
                assert m[key] == pytest.approx(ref[key], rel=1e-4), (str(ckpt), key, ref["step"])


def test_canonical_state_round_trip_into_another_engine(tmp_path):
    """One process: after a ZeRO-0 step the canonical state, loaded into a ZeRO-3 engine built from
    another seed and saved again, is the same; the next step then matches the ZeRO-0 engine's."""
    import torch
    from safetensors.torch import load_file

    from lcl_megatron.config import load_config
    from lcl_megatron.convert.reshard import OPTIMIZER_TENSORS, load_canonical_state, save_canonical_state
    from lcl_megatron.parallel import init_distributed
    from lcl_megatron.training.checkpoint import write_consolidated, write_manifest
    from lcl_megatron.training.engine import build_engine, build_model, plain_train_step
    from lcl_megatron.training.train import build_loader

    tiny = [*TINY, "train.micro_batch_size=4"]
    cfg = load_config("configs/demo.yaml", tiny)
    init_distributed(cfg.parallel)
    vocab = cfg.model.text.vocab_size
    source = build_engine(cfg, build_model(cfg))
    batches = iter(build_loader(cfg, 0, 1))
    plain_train_step(source, batches, cfg, 1)
    saved = tmp_path / "saved"
    saved.mkdir()
    write_consolidated(source, saved, vocab)
    save_canonical_state(source, saved, vocab)
    write_manifest(saved, {"step": 1})

    target_cfg = load_config("configs/demo.yaml", [*tiny, "parallel.zero_stage=3", "train.seed=99"])
    target = build_engine(target_cfg, build_model(target_cfg))
    assert load_canonical_state(target, saved)["step"] == 1
    again = tmp_path / "again"
    again.mkdir()
    save_canonical_state(target, again, vocab)
    first, second = load_file(saved / OPTIMIZER_TENSORS), load_file(again / OPTIMIZER_TENSORS)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    batch = next(batches)
    steps = {name: plain_train_step(engine, iter([batch]), cfg, 2) for name, engine in
             (("source", source), ("target", target))}
    for key in ("loss", "generation_loss", "contrastive_loss"):
        assert steps["target"][key] == pytest.approx(steps["source"][key], rel=1e-5), key
    assert target.get_lr() == pytest.approx(source.get_lr(), rel=1e-9)
    for engine, out in ((source, saved), (target, again)):  # Adam's moments went into the update alike
        save_canonical_state(engine, out, vocab)
    first, second = load_file(saved / OPTIMIZER_TENSORS), load_file(again / OPTIMIZER_TENSORS)
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-4, atol=1e-7, msg=lambda m: f"{key}: {m}")
