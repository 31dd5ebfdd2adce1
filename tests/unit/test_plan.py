"""`lcl plan`: parameter counts against the real model, the memory arithmetic, layout errors.

Only tiny models are instantiated; the large configs are planned from meta-device shapes.
"""

from __future__ import annotations

import math

import pytest

from lcl_megatron.layout import lm_layers_per_stage
from lcl_megatron.cli import main as lcl
from lcl_megatron.plan import checkpoint, costs, report
from lcl_megatron.config import load_config
from tests.support.launch import REPO

DEMO = str(REPO / "configs" / "demo.yaml")
LLAMA = ["model.text.arch=llama", "model.text.num_query_groups=2"]
VARIANTS = {"clip": [], "llama": LLAMA, "llama-ffn": LLAMA + ["model.text.ffn_hidden_size=192"]}


def tiny(overrides=(), variant="clip"):
    return load_config(DEMO, VARIANTS[variant] + list(overrides), validate=False)


def hand_count(cfg, tp: int) -> int:
    """Parameters one TP rank of a pp=1 model holds, written out layer by layer from the architecture."""
    v, t = cfg.model.vision, cfg.model.text
    W, D, P, V = v.width, t.width, v.num_patches, t.vocab_size
    vit_ffn = int(W * v.mlp_ratio)
    whole = W * 3 * v.patch_size ** 2 + W + (P + 1) * W + 2 * 2 * W  # conv1, class, positions, ln_pre, ln_post
    split = v.layers * (3 * W * W + 3 * W + W * W + 2 * vit_ffn * W + vit_ffn)  # qkv, proj, fc1, fc2 (+ biases)
    whole += v.layers * (2 * W + 2 * 2 * W)  # proj and fc2 biases, two LayerNorms
    whole += W + 3 * D + 3 * 2 * W + 3 * W * D + D * D  # pool-project: query, biases, norms, q/k/v, proj
    if t.arch == "clip":
        ffn = int(D * t.mlp_ratio)
        whole += t.context_length * D + t.layers * (2 * D + 4 * D) + 2 * D + 2 * D  # positions, biases, norms
        split += t.layers * (3 * D * D + 3 * D + D * D + 2 * ffn * D + ffn)
    else:
        ffn = t.ffn_hidden_size or 256 * math.ceil(int(8 * D / 3) / 256)  # Llama: 2/3 of 4D, rounded up to 256
        kv = 2 * (t.num_query_groups or t.heads) * (D // t.heads) * D
        whole += t.layers * 2 * D + D + D  # RMSNorms: two per layer, ln_final, the head's
        split += t.layers * (D * D + kv + D * D + 3 * ffn * D)  # q, k/v, proj, SwiGLU fc1 (gate, up) and fc2
    whole += D * D + 1  # text_projection, logit_scale
    vocab = 2 * math.ceil(V / tp) * D  # token embedding and LM head, rows padded to a multiple of tp
    assert split % tp == 0
    return whole + split // tp + vocab


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_total_equals_the_instantiated_model(variant):
    from lcl_megatron.model.build import build_model, count_parameters

    cfg = tiny(variant=variant)
    planned = costs.make_plan(cfg, nodes=1, gpus_per_node=1)
    model = build_model(cfg.model)  # a real CPU model
    assert planned.total_params == sum(p.numel() for p in model.parameters()) == count_parameters(cfg.model)
    assert planned.total_params == hand_count(cfg, tp=1)
    assert sum(planned.group_params.values()) == planned.total_params
    assert planned.stages[0].params == planned.total_params


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tensor_parallel_counts_per_gpu(variant):
    cfg = tiny(["parallel.tp=2"], variant)
    planned = costs.make_plan(cfg, nodes=1, gpus_per_node=2)
    assert planned.stages[0].params == hand_count(cfg, tp=2)
    assert planned.total_params == hand_count(cfg, tp=1)  # the total never carries TP padding
    # the vocabulary (49,411 rows, odd) is padded by one row for tp=2
    assert 2 * planned.stages[0].params > planned.total_params


def test_pipeline_stages_partition_the_model():
    cfg = tiny(["parallel.pp=3", "parallel.tp=2"], "llama")
    planned = costs.make_plan(cfg, nodes=1, gpus_per_node=6)
    assert planned.stage_layers == [1, 1, 1]
    assert sum(s.params for s in planned.stages) == hand_count(cfg, tp=2)
    vit_and_pool = planned.group_params["ViT"] + planned.group_params["pool-project"]
    assert planned.stages[0].params > vit_and_pool > planned.stages[1].params
    assert "ViT" in planned.stages[0].holds and "heads" in planned.stages[2].holds
    assert [s.in_flight for s in planned.stages] == [1, 1, 1]  # grad_accumulation 1 bounds 1F1B's in-flight count


def test_first_stage_share_and_its_balance():
    even = costs.make_plan(tiny(["parallel.pp=2", "model.text.layers=6", "train.grad_accumulation=4"]), 1, 2)
    assert even.stage_layers == [3, 3] and [s.in_flight for s in even.stages] == [2, 1]
    balanced = even.balanced_first_stage_layers
    assert 0 <= balanced <= 5
    moved = costs.make_plan(tiny(["parallel.pp=2", "model.text.layers=6", "train.grad_accumulation=4",
                                 f"parallel.pp_first_stage_layers={balanced}"]), 1, 2)
    assert moved.stage_layers == [balanced, 6 - balanced]
    assert sum(s.params for s in moved.stages) == sum(s.params for s in even.stages) == even.total_params
    slowest = lambda p: max(s.hardware_flops for s in p.stages)
    assert slowest(moved) <= slowest(even)
    assert moved.model_flops == pytest.approx(even.model_flops)  # moving layers moves work, never adds it
    only_vit = costs.make_plan(tiny(["parallel.pp=2", "parallel.pp_first_stage_layers=0"]), 1, 2)
    assert only_vit.stages[0].holds == "ViT, pool-project, embedding"


def test_lm_layers_per_stage_follow_the_pipeline_cut():
    from lcl_megatron.model.pipeline import stage_boundaries

    assert lm_layers_per_stage(32, 2) == [16, 16]
    assert lm_layers_per_stage(10, 4) == [2, 3, 3, 2]
    assert lm_layers_per_stage(10, 4, first_stage_layers=1) == [1, 3, 3, 3]
    assert lm_layers_per_stage(7, 1) == [7]
    for layers in range(1, 13):
        for pp in range(2, layers + 1):  # pp=1 builds no pipeline
            for first in range(-1, layers - pp + 2):
                parts = stage_boundaries(layers, pp, first)  # the first stage's ViT and the last's loss count too
                cut = [parts[i + 1] - parts[i] - (i == 0) - (i == pp - 1) for i in range(pp)]
                assert lm_layers_per_stage(layers, pp, first) == cut, (layers, pp, first)


def test_activation_formula_matches_megatron():
    """Korthikanti et al.: with TP and SP a layer keeps sbh (34/t + 5as/(ht)) bytes in 16 bits. Without
    dropout (2 bytes of masks gone) and with flash attention (the s^2 scores replaced by its saved output,
    2 bytes, and an fp32 log-sum-exp per head and position) that is 34 sbh / t + 4 as b / t."""
    s, b, h, a, t = 64, 3, 256, 8, 4
    low, fp32 = costs.layer_activation_elements(s, b, h, a, a, 4 * h, gated=False, tp=t, sp=True)
    assert 2 * low + 4 * fp32 == pytest.approx(34 * s * b * h / t + 4 * a * s * b / t)
    low_no_sp, _ = costs.layer_activation_elements(s, b, h, a, a, 4 * h, gated=False, tp=t, sp=False)
    assert 2 * low_no_sp == pytest.approx(s * b * h * (8 + 26 / t))  # Megatron's 10 + 24/t, same adjustments
    mha, _ = costs.layer_activation_elements(s, b, h, a, a, 4 * h, gated=False, tp=1, sp=False)
    gqa, _ = costs.layer_activation_elements(s, b, h, a, a // 4, 4 * h, gated=False, tp=1, sp=False)
    assert mha - gqa == pytest.approx(2 * s * b * h * 3 / 4)  # K and V shrink with the query groups
    swiglu, _ = costs.layer_activation_elements(s, b, h, a, a, 4 * h, gated=True, tp=1, sp=False)
    assert swiglu - mha == pytest.approx(2 * 4 * h * s * b)  # gate, up, silu(gate), product vs. input, output


def test_memory_follows_zero_stage_and_checkpointing():
    base = ["parallel.tp=1", "train.precision=bf16"]
    got = {z: costs.make_plan(tiny(base + [f"parallel.zero_stage={z}"]), nodes=1, gpus_per_node=4).stages[0]
           for z in range(4)}
    n = got[0].params
    assert (got[0].weight_bytes, got[0].grad_bytes, got[0].optimizer_bytes) == (2 * n, 2 * n, 12 * n)
    assert got[1].optimizer_bytes == 12 * n / 4 and got[1].grad_bytes == 2 * n
    assert got[2].grad_bytes == 2 * n / 4 and got[2].weight_bytes == 2 * n
    assert got[3].weight_bytes == 2 * n / 4
    s = got[0]
    assert s.activation_bytes_checkpointed < s.activation_bytes_plain
    assert s.activation_bytes == s.activation_bytes_plain  # the demo checkpoints neither tower
    assert s.hardware_flops == s.model_flops
    ckpt = costs.make_plan(tiny(base + ["parallel.activation_checkpointing_lm=true"]), 1, 4).stages[0]
    assert s.activation_bytes_checkpointed < ckpt.activation_bytes < s.activation_bytes_plain
    assert ckpt.hardware_flops > ckpt.model_flops == s.model_flops


def test_feature_cache_adds_a_forward_without_the_lm_head():
    """Accumulated negatives: every micro-batch runs forward once more (not the LM head), sending its
    activations across stage boundaries and TP groups again; the model's FLOPs stay."""
    base = ["parallel.pp=2", "parallel.tp=2", "train.grad_accumulation=4", "loss.contrastive_weight=1"]
    plans = {on: costs.make_plan(tiny(base + [f"loss.accumulate_negatives={on}"]), nodes=1, gpus_per_node=4)
             for on in ("false", "true")}
    (first_off, last_off), (first_on, last_on) = plans["false"].stages, plans["true"].stages
    for off, on in ((first_off, first_on), (last_off, last_on)):
        assert on.model_flops == off.model_flops and off.hardware_flops == off.model_flops
        assert on.pp_bytes > off.pp_bytes and on.tp_bytes > off.tp_bytes
    assert first_on.hardware_flops == pytest.approx(first_off.hardware_flops * 4 / 3)
    # The last stage's extra forward leaves out its LM head: most of this tiny model's stage (vocabulary 49,408).
    assert 0 < last_on.hardware_flops - last_off.hardware_flops < last_off.model_flops / 3 / 2


def test_save_estimate_follows_what_each_rank_writes():
    base = ["parallel.tp=1", "train.precision=bf16"]
    plans = {z: costs.make_plan(tiny(base + [f"parallel.zero_stage={z}"]), nodes=1, gpus_per_node=4) for z in (0, 1, 3)}
    est = {z: checkpoint.estimate_save(p, tiny(base), disk_gib_s=1.0) for z, p in plans.items()}
    n = plans[0].stages[0].params
    assert est[0].busiest_rank_bytes == est[0].total_bytes == 14 * n  # DP rank 0 writes weights and optimizer
    assert est[1].busiest_rank_bytes == 2 * n + 12 * n / 4 and est[1].total_bytes == 14 * n  # optimizer split 4 ways
    assert est[3].busiest_rank_bytes == 14 * n / 4 == est[3].total_bytes / 4  # ZeRO-3: every rank alike
    assert est[1].seconds == pytest.approx(2 * est[1].busiest_rank_bytes / report.GiB)  # write, then hash, 1 GiB/s
    slower = checkpoint.estimate_save(plans[1], tiny(base), disk_gib_s=0.25)
    assert slower.seconds > est[1].seconds and slower.warning_s >= est[1].warning_s
    assert est[1].warning_s >= est[1].seconds + est[1].consolidated_seconds + checkpoint.WARNING_MARGIN_S


INVALID = [
    (["parallel.tp=3"], 1, 3, "ViT heads (4)"),
    (["model.vision.head_width=16", "parallel.tp=8"], 1, 8, "LM heads (4)"),
    (LLAMA + ["parallel.tp=4"], 1, 4, "LM query groups (2)"),
    (["parallel.pp=4"], 1, 4, "exceeds the 3 LM layers"),
    (["parallel.tp=2"], 3, 1, "3 GPUs (3 nodes x 1) cannot be filled by tp x pp = 2 x 1"),
    (["parallel.tp=2", "parallel.sp=true", "model.text.context_length=95"], 1, 2, "context (95)"),
    (["parallel.pp=2", "parallel.zero_stage=2"], 1, 2, "ZeRO 0 or 1"),
    (["model.text.heads=5"], 1, 1, "model.text.heads"),  # the model itself is invalid
    (["train.micro_batch_size=0"], 1, 1, "train.micro_batch_size"),
    ([], 1, 0, "--gpus-per-node must be positive"),
    (["parallel.pp=2", "parallel.pp_first_stage_layers=4"], 1, 2, "parallel.pp_first_stage_layers=4 exceeds"),
]


@pytest.mark.parametrize("overrides,nodes,gpus,message", INVALID)
def test_impossible_layouts_exit_2_with_one_line(capsys, overrides, nodes, gpus, message):
    rc = lcl(["plan", "--config", DEMO, "--nodes", str(nodes), "--gpus-per-node", str(gpus)] + overrides)
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("lcl plan: ") and message in err


def test_a_layout_the_gpus_cannot_hold_names_the_fix(capsys):
    assert lcl(["plan", "--config", DEMO, "--nodes", "1", "--gpus-per-node", "6", "parallel.tp=4"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == ["lcl plan: 6 GPUs (1 node x 6) cannot be filled by tp x pp = 4 x 1; "
                                              "use a multiple of 4 GPUs or change parallel.tp/pp"]


@pytest.mark.parametrize("name,nodes,vit_params", [("lcl_vit_l14_llama", 4, (3.0e8, 3.1e8)),
                                                   ("lcl_vit_6b_llama7b", 8, (5.5e9, 6.5e9))])
def test_large_configs_print_a_table(capsys, name, nodes, vit_params):
    path = str(REPO / "configs" / f"{name}.yaml")
    load_config(path, ["data.path=embedded:digits"])  # everything but the cluster's data path validates
    assert lcl(["plan", "--config", path, "--nodes", str(nodes)]) == 0
    out = capsys.readouterr().out
    assert f"{nodes * 8} GPUs = {nodes} nodes x 8" in out
    assert "memory per GPU" in out and "compute and communication per GPU per step" in out
    assert "GiB per save" in out and "Slurm's warning (--warning) >= " in out
    planned = costs.make_plan(load_config(path, validate=False), nodes, 8)
    assert f"parameters  {planned.total_params:,}" in out
    assert vit_params[0] < planned.group_params["ViT"] < vit_params[1]
    assert all(s.total_bytes < 70 * report.GiB for s in planned.stages)  # fits an 80 GB GPU with headroom
    if name == "lcl_vit_6b_llama7b":
        assert 6.5e9 < planned.group_params["LM"] < 7.5e9  # Llama-2-7B's layers with our 49k vocabulary
        assert (planned.layout.tp, planned.layout.pp, planned.layout.dp) == (8, 2, 4)
