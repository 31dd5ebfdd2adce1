"""`lcl convert inspect` and `lcl convert reshard` on real DeepSpeed checkpoints written by `lcl train`."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lcl_megatron.checkpoint.format import OPTIMIZER_STATE, OPTIMIZER_TENSORS
from lcl_megatron.model.build import count_parameters, expected_tensor_shapes
from lcl_megatron.config import load_config
from tests.support.paths import REPO
from tests.support.checkpoints import tiny_model_config
from tests.support.cli import run_cli
from tests.support.configs import CHECKPOINTS

STAGES = (0, 1, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two optimizer steps of the same tiny model, seed and data under ZeRO stages 0, 1 and 3;
    the checkpoints after step 1."""
    from lcl_megatron import cli

    root = tmp_path_factory.mktemp("runs")
    for stage in STAGES:
        argv = ["train", "--config", REPO / "configs" / "demo.yaml", *CHECKPOINTS, f"parallel.zero_stage={stage}",
                f"run.dir={root / f'zero{stage}'}"]
        assert cli.main(list(map(str, argv))) == 0
    return {stage: root / f"zero{stage}" / "checkpoints" / "step_00000001" for stage in STAGES}


def inspect_json(capsys, path) -> dict:
    code, out, err = run_cli(capsys, "convert", "inspect", "--checkpoint", path, "--json")
    assert code == 0, err
    return json.loads(out)


def test_inspect_reports_layout_step_parameters_and_shards(capsys, runs):
    expected_tensors = len(expected_tensor_shapes(tiny_model_config()))
    for stage, ckpt in runs.items():
        newest = inspect_json(capsys, ckpt.parent.parent)  # a run directory finds its newest checkpoint
        assert newest["checkpoint"] == str(ckpt.parent / "step_00000002") and newest["step"] == 2
        info = inspect_json(capsys, ckpt)
        assert info["checkpoint"] == str(ckpt) and info["step"] == 1
        assert info["layout"] == {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "zero_stage": stage, "sp": False,
                                  "format": "deepspeed"}
        assert info["parameters"] == count_parameters(tiny_model_config())
        shards = info["shards"]
        assert shards["model.safetensors"]["contents"][""] == {"tensors": expected_tensors,
                                                               "elements": info["parameters"]}
        optim = [name for name in shards if "optim_states" in name]
        assert len(optim) == (stage > 0)
        if stage == 0:  # AdamW state sits with the module: two moments per tensor, plus its step
            assert shards["mp_rank_00_model_states.pt"]["contents"]["optimizer"]["tensors"] == 3 * expected_tensors
        else:  # fp32 masters and both moments of each parameter group (2 groups), flattened
            flat = shards[optim[0]]["contents"]["optimizer_state_dict"]
            assert flat["elements"] >= 3 * info["parameters"]
    code, out, _ = run_cli(capsys, "convert", "inspect", "--checkpoint", runs[1])
    assert code == 0 and "ZeRO stage 1" in out and "files match their SHA-256" in out


def _broken(tmp_path, ckpt, name):
    copy = tmp_path / name
    shutil.copytree(ckpt, copy)
    return copy


def _exit_2(capsys, *argv) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", ["inspect", "reshard", "to-hf"])
def test_broken_checkpoints_exit_2(capsys, runs, tmp_path, command):
    extra = {"inspect": [], "reshard": ["--layout", "consolidated", "--out", tmp_path / "out"],
             "to-hf": ["--out", tmp_path / "out"]}[command]
    check = lambda ckpt: _exit_2(capsys, "convert", command, "--checkpoint", ckpt, *extra)

    truncated = _broken(tmp_path, runs[1], "truncated")
    shard = truncated / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert "truncated" in check(truncated) and shard.name in check(truncated)

    missing = _broken(tmp_path, runs[1], "missing")
    (missing / "mp_rank_00_model_states.pt").unlink()
    err = check(missing)
    assert "missing" in err and "mp_rank_00_model_states.pt" in err

    corrupt = _broken(tmp_path, runs[0], "corrupt")
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    assert "SHA-256" in check(corrupt)

    # A config that does not fit the tensors, with a manifest that vouches for it.
    from lcl_megatron.checkpoint.format import read_manifest, write_manifest

    mismatched = _broken(tmp_path, runs[0], "mismatched")
    config = (mismatched / "config.yaml").read_text()
    (mismatched / "config.yaml").write_text(config.replace("width: 32", "width: 64", 1))
    write_manifest(mismatched, {k: v for k, v in read_manifest(mismatched).items() if k != "files"})
    assert "does not match the model" in check(mismatched)

    unfinished = _broken(tmp_path, runs[0], "unfinished")
    (unfinished / "COMPLETE").unlink()
    assert "COMPLETE" in check(unfinished)
    assert not (tmp_path / "out").exists()


def test_reshard_refuses_deepspeed_files_of_another_layout_than_the_config(capsys, runs, tmp_path):
    from lcl_megatron.checkpoint.format import read_manifest, write_manifest

    claims_zero3 = _broken(tmp_path, runs[1], "claims_zero3")
    config = (claims_zero3 / "config.yaml").read_text()
    (claims_zero3 / "config.yaml").write_text(config.replace("zero_stage: 1", "zero_stage: 3", 1))
    write_manifest(claims_zero3, {k: v for k, v in read_manifest(claims_zero3).items() if k != "files"})
    err = _exit_2(capsys, "convert", "reshard", "--checkpoint", claims_zero3, "--layout", "consolidated",
                  "--out", tmp_path / "out")
    assert "lacks DeepSpeed's file zero_pp_rank_0_mp_rank_00_model_states.pt" in err, err
    assert not (tmp_path / "out").exists()


def test_reshard_to_consolidated_gives_the_same_state_from_every_zero_stage(capsys, runs, tmp_path):
    states = {}
    for stage, ckpt in runs.items():
        out = tmp_path / f"consolidated{stage}"
        code, _, err = run_cli(capsys, "convert", "reshard", "--checkpoint", ckpt, "--layout", "tp=1,pp=1,dp=1",
                               "--out", out)
        assert code == 0, err
        assert (out / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
        weights = load_file(out / "model.safetensors")
        tensors = load_file(out / OPTIMIZER_TENSORS)
        meta = json.loads((out / OPTIMIZER_STATE).read_text())
        assert meta["adam_step"] == 1 and meta["global_steps"] == 1 and meta["lr_scheduler"]["last_epoch"] == 1
        manifest = json.loads((out / "COMPLETE").read_text())
        assert manifest["source_layout"] == {"tp": 1, "pp": 1, "dp": 1, "zero": stage}
        assert sorted(k.split("/", 1)[1] for k in tensors if k.startswith("exp_avg_sq/")) == sorted(weights)
        for name, w in weights.items():  # fp32 training: the masters are the weights
            assert torch.equal(tensors[f"fp32/{name}"], w), name
        # Every parameter got a gradient in the one step.
        assert all(tensors[f"exp_avg/{name}"].abs().sum() > 0 for name in weights)
        states[stage] = tensors
        info = inspect_json(capsys, out)
        assert info["layout"]["format"] == "consolidated" and info["step"] == 1
    # The same step under ZeRO 0, 1 and 3 leaves the same moments, name by name.
    for stage in (1, 3):
        assert states[stage].keys() == states[0].keys()
        for key, value in states[0].items():
            torch.testing.assert_close(states[stage][key], value, rtol=1e-5, atol=1e-9, msg=key)

    # Resharding a consolidated checkpoint again changes nothing; without optimizer state it needs --weights-only.
    code, _, err = run_cli(capsys, "convert", "reshard", "--checkpoint", tmp_path / "consolidated1", "--layout",
                           "consolidated", "--out", tmp_path / "again")
    assert code == 0, err
    again = (tmp_path / "again" / OPTIMIZER_TENSORS).read_bytes()
    assert again == (tmp_path / "consolidated1" / OPTIMIZER_TENSORS).read_bytes()
    (tmp_path / "again" / OPTIMIZER_TENSORS).unlink()
    (tmp_path / "again" / OPTIMIZER_STATE).unlink()
    from lcl_megatron.checkpoint.format import read_manifest, write_manifest

    write_manifest(tmp_path / "again", {k: v for k, v in read_manifest(tmp_path / "again").items() if k != "files"})
    err = _exit_2(capsys, "convert", "reshard", "--checkpoint", tmp_path / "again", "--layout", "consolidated",
                  "--out", tmp_path / "weights")
    assert "--weights-only" in err
    code, _, err = run_cli(capsys, "convert", "reshard", "--checkpoint", tmp_path / "again", "--layout",
                           "consolidated", "--out", tmp_path / "weights", "--weights-only")
    assert code == 0 and not (tmp_path / "weights" / OPTIMIZER_TENSORS).exists(), err

    # The consolidated checkpoint serves evaluation and export.
    code, _, err = run_cli(capsys, "convert", "to-openclip", "--checkpoint", tmp_path / "consolidated3",
                           "--out", tmp_path / "openclip.pt")
    assert code == 0, err


def test_reshard_refuses_layouts_the_model_or_batch_cannot_take(capsys, runs, tmp_path):
    refusals = {"tp=0": "expected", "fast": "expected", "tp=3": "parallel.tp",  # 4 ViT heads
                "pp=3": "parallel.pp",  # 2 LM layers
                "dp=3": "global batch"}  # 2 samples
    for layout, reason in refusals.items():
        err = _exit_2(capsys, "convert", "reshard", "--checkpoint", runs[0], "--layout", layout,
                      "--out", tmp_path / "o")
        assert reason in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_training_continues_from_the_consolidated_checkpoint_on_another_zero_stage(capsys, runs, tmp_path, stage):
    """Step 1 under ZeRO-0, consolidated, then step 2 under ZeRO `stage` in an engine built from
    another seed: the loss and the weights equal those of the run that went on under ZeRO-0."""
    from lcl_megatron.checkpoint.training_state import load_canonical_state
    from lcl_megatron.training.engine import build_engine
    from lcl_megatron.training.initial_model import build_initial_model
    from lcl_megatron.training.step import plain_train_step
    from lcl_megatron.data.global_batch import build_loader

    consolidated = tmp_path / "consolidated"
    code, _, err = run_cli(capsys, "convert", "reshard", "--checkpoint", runs[0], "--layout", f"dp=1,zero={stage}",
                           "--out", consolidated)
    assert code == 0, err
    cfg = load_config(consolidated / "config.yaml")
    assert cfg.parallel.zero_stage == stage
    engine = build_engine(cfg, build_initial_model(load_config(consolidated / "config.yaml", ["train.seed=99"])))
    meta = load_canonical_state(engine, consolidated)
    assert meta["step"] == 1 and meta["global_steps"] == engine.global_steps == 1
    loader = build_loader(cfg, 0, 1)
    loader.load_state_dict(json.loads((consolidated / "loader_dp00000.json").read_text()))
    engine.train()
    metrics = plain_train_step(engine, iter(loader), cfg, 2)

    original = [json.loads(line) for line in (runs[0].parent.parent / "metrics.jsonl").read_text().splitlines()]
    step2 = next(m for m in original if m["step"] == 2)
    for key in ("loss", "contrastive_loss", "generation_loss"):
        assert metrics[key] == pytest.approx(step2[key], rel=1e-4), key
    assert engine.get_lr()[0] == pytest.approx(step2["lr"], rel=1e-6)
    from deepspeed.utils import safe_get_full_fp32_param

    after = load_file(runs[0].parent / "step_00000002" / "model.safetensors")
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param) if stage else param.detach()
        torch.testing.assert_close(full, after[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
