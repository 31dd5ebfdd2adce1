"""Every parallel layout gives the losses and updates of one process on the same global batch.

Runs are started as users start them (`torchrun ... lcl train`), in fp32 on CPU
over gloo, with the layout in the config and the global batch fixed by
`data.split=samples`.
"""

import pytest
import torch

from lcl_megatron.checkpoint.consolidated import read_checkpoint
from tests.support.configs import GLOBAL_BATCH, STEPS, TINY
from tests.support.launch import read_metrics, run_lcl

LAYOUTS = {
    "dp2_zero1": (2, ["parallel.zero_stage=1"]),
    "dp2_zero2": (2, ["parallel.zero_stage=2"]),
    "dp2_zero3_accum2": (2, ["parallel.zero_stage=3", "train.grad_accumulation=2"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp_accum2": (2, ["parallel.tp=2", "parallel.sp=true", "train.grad_accumulation=2"]),
    "tp2_dp2": (4, ["parallel.tp=2", "parallel.zero_stage=1"]),
    "pp2": (2, ["parallel.pp=2"]),
    "pp2_dp2_accum2": (4, ["parallel.pp=2", "parallel.zero_stage=1", "train.grad_accumulation=2"]),
}
# Further layouts for the objectives below: the pipeline's feature cache without data parallelism.
OBJECTIVE_LAYOUTS = {**LAYOUTS, "pp2_accum2": (2, ["parallel.pp=2", "train.grad_accumulation=2"])}


def _train(tmp_path, name, nproc, layout):
    run_dir = tmp_path / name
    dp = nproc // (2 if any(x.startswith(("parallel.tp=2", "parallel.pp=2")) for x in layout) else 1)
    # Accumulated micro-batches split the same global batch further.
    accumulation = 2 if "train.grad_accumulation=2" in layout else 1
    args = ["train", "--config", "configs/demo.yaml", *TINY, *layout, f"run.dir={run_dir}",
            f"train.micro_batch_size={GLOBAL_BATCH // (dp * accumulation)}"]
    run_lcl(args, nproc=nproc)
    # the consolidated weights: model.safetensors, or one part per pipeline stage
    return read_metrics(run_dir), read_checkpoint(run_dir / "checkpoints" / f"step_{STEPS:08d}", check=False)[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("single"), "single", 1, [])


def _assert_same(single, other):
    ref_metrics, ref_params = single
    metrics, params = other
    assert [m["step"] for m in metrics] == [m["step"] for m in ref_metrics] == list(range(1, STEPS + 1))
    for ref, got in zip(ref_metrics, metrics):
        for key in ("loss", "generation_loss", "contrastive_loss"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4), (key, ref["step"])
    assert params.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        # atol covers tensors whose true gradient is zero (e.g. the key bias under softmax): fp noise only.
        torch.testing.assert_close(params[name].float(), ref.float(), rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(tmp_path, single, layout):
    nproc, overrides = LAYOUTS[layout]
    _assert_same(single, _train(tmp_path, layout, nproc, overrides))


def test_training_changes_parameters(single, tmp_path):
    """The comparison above is meaningful: three steps lower the loss, so the layouts are compared on
    real updates, not on weights that never moved."""
    metrics, _ = single
    assert metrics[-1]["loss"] < metrics[0]["loss"]


# Objectives chosen by weight (Emu-like regression, a term switched off) under the layouts that
# gather parameters (ZeRO-3), split the loss over stages (pipeline) or shard the heads (tensor parallel).
OBJECTIVES = {
    "emu": ["loss.generation_weight=1", "loss.contrastive_weight=0", "loss.regression_weight=1"],
    "contrastive_only": ["loss.generation_weight=0", "loss.contrastive_weight=1"],
}


@pytest.fixture(scope="module")
def single_by_objective(tmp_path_factory):
    """The one-process run of an objective, trained when a test first needs it."""
    runs = {}

    def single(name):
        if name not in runs:
            runs[name] = _train(tmp_path_factory.mktemp(name), "single", 1, OBJECTIVES[name])
        return runs[name]

    return single


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("layout", ["dp2_zero3_accum2", "pp2_accum2", "tp2"])
def test_objective_under_layout_matches_single_process(tmp_path, single_by_objective, objective, layout):
    nproc, overrides = OBJECTIVE_LAYOUTS[layout]
    _assert_same(single_by_objective(objective), _train(tmp_path, layout, nproc, overrides + OBJECTIVES[objective]))
