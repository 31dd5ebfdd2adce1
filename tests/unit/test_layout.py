"""The one layout object: its sizes, and `lcl plan` and `lcl train` accepting and refusing the same layouts."""

from __future__ import annotations

import copy
import random
import re

import pytest

from lcl_megatron.config import Config, ConfigError, ParallelConfig, load_config, validate_config
from lcl_megatron.layout import Layout
from lcl_megatron.plan.cli import checked_layout
from tests.support.launch import REPO

DEMO = str(REPO / "configs" / "demo.yaml")


def _train_check(cfg: Config, world: int) -> Layout:
    """What `lcl train` checks before it builds anything (load_config's validation, then the layout on the
    launcher's world)."""
    validate_config(cfg)
    return Layout.of(cfg, world)


def _plan_check(cfg: Config, nodes: int, gpus_per_node: int) -> Layout:
    """What `lcl plan` checks before it builds the meta-device model."""
    return checked_layout(cfg, nodes, gpus_per_node)


def _outcome(check, *args):
    try:
        return check(*args), None
    except ConfigError as e:
        return None, str(e)


def _random_layout(rng: random.Random) -> tuple[dict, int, int]:
    """Random layout and model sizes to set over the demo config, nodes, GPUs per node. Each size is
    mostly valid, so that most draws meet the later rules rather than the first one."""
    pick = lambda common, rare: rng.choice(rare) if rng.random() < 0.08 else rng.choice(common)
    layers = rng.randint(1, 6)
    text = {"layers": layers, "heads": rng.choice([1, 2, 4, 8]), "arch": rng.choice(["clip", "llama"]),
            "mlp_ratio": pick([4.0, 3.0], [2.53]), "context_length": pick([96], [95, 100])}
    if text["arch"] == "llama":
        text.update(num_query_groups=pick([0], [1, 2, 4]), ffn_hidden_size=pick([0, 192], [100, 202]))
    tree = {
        "parallel": {"tp": pick([1, 2, 2, 4], [3, 8]), "pp": rng.choice([1, 1, 2, 3]), "sp": rng.random() < 0.3,
                     "zero_stage": pick([0, 1, 1, 2, 3], [4]), "max_images": pick([0, 5], [-1]),
                     "pp_first_stage_layers": rng.randint(-1, layers + 1)},
        "model": {"text": text, "vision": {"width": pick([128], [96]), "head_width": pick([16, 32], [64]),
                                           "mlp_ratio": pick([4.0], [1.53])}},
        "data": {"packing": rng.random() < 0.2},
    }
    return tree, rng.randint(1, 4), rng.choice([1, 2, 4, 6, 8])


def _with(cfg, tree: dict):
    """A copy of `cfg` (a config or a section of one) with the values of `tree` set."""
    out = copy.copy(cfg)
    for key, value in tree.items():
        setattr(out, key, _with(getattr(out, key), value) if isinstance(value, dict) else value)
    return out


def test_plan_and_train_accept_and_refuse_the_same_layouts():
    demo = load_config(DEMO, validate=False)
    rng = random.Random(0)
    accepted = refused = 0
    for _ in range(300):
        tree, nodes, gpus_per_node = _random_layout(rng)
        world = nodes * gpus_per_node
        cfg = _with(demo, tree)  # validation reads a config, never changes it
        trained, train_error = _outcome(_train_check, cfg, world)
        planned, plan_error = _outcome(_plan_check, cfg, nodes, gpus_per_node)
        case = f"{tree} on {nodes} x {gpus_per_node}: train {train_error!r}, plan {plan_error!r}"
        assert (trained is None) == (planned is None), case
        if trained is not None:
            accepted += 1
            assert (trained.tp, trained.pp, trained.dp) == (planned.tp, planned.pp, planned.dp), case
            assert trained.tp * trained.pp * trained.dp == world
        else:
            refused += 1
            # One rule, one message; only the world is described as the launcher sees it (processes)
            # or as a cluster of nodes (GPUs).
            assert train_error == plan_error or (train_error.startswith(f"world size {world} is not divisible")
                                                 and "cannot be filled by tp x pp" in plan_error), case
    assert accepted >= 50 and refused >= 50  # the draws reach both sides of the rules


@pytest.mark.parametrize("overrides, message", [
    # the first stage must leave every later stage an LM layer
    (["parallel.pp=2", "parallel.pp_first_stage_layers=3"], "parallel.pp_first_stage_layers=3 exceeds the 2 LM layers"),
    # a SwiGLU width tp does not divide fails here, not in an assert inside megatron-core
    (["model.text.arch=llama", "model.text.ffn_hidden_size=201", "parallel.tp=2"],
     "parallel.tp=2 does not divide the LM MLP width (201)"),
    (["data.packing=true", "parallel.pp=2"], "data.packing needs parallel.pp=1"),
    (["parallel.sp=true"], "parallel.sp needs parallel.tp > 1"),
])
def test_rules_the_commands_used_to_disagree_on(overrides, message):
    for check, args in ((_train_check, (load_config(DEMO, overrides, validate=False), 8)),
                        (_plan_check, (load_config(DEMO, overrides, validate=False), 1, 8))):
        with pytest.raises(ConfigError, match=re.escape(message)):
            check(*args)


def test_sizes_and_what_is_enabled():
    cfg = load_config(DEMO, ["parallel.tp=2", "parallel.pp=3", "parallel.sp=true", "parallel.zero_stage=1",
                             "model.text.layers=7", "parallel.pp_first_stage_layers=1", "train.grad_accumulation=4"])
    layout = Layout.of(cfg, 24, gpus_per_node=8)
    assert (layout.tp, layout.pp, layout.dp, layout.nodes, layout.microbatches) == (2, 3, 4, 3, 4)
    assert layout.global_batch == 16 * 4 * 4
    assert layout.stage_layers == [1, 3, 3]
    assert layout.padded_vocab_size % 2 == 0 and 0 <= layout.padded_vocab_size - cfg.model.text.vocab_size < 2
    assert layout.tp_enabled and layout.pp_enabled and layout.dp_enabled and layout.sp_enabled
    assert layout.dp_shard_enabled
    assert not layout.vit_sp_enabled  # the ViT sequence, 16 patches + the class token, is odd
    single = Layout.of(load_config(DEMO), 1)
    assert not (single.tp_enabled or single.pp_enabled or single.dp_enabled or single.sp_enabled
                or single.dp_shard_enabled)
    with pytest.raises(ValueError, match="world size"):
        Layout.of(cfg).dp  # a config alone has no data-parallel size
    # the sizes alone, as `lcl convert reshard --layout` gives them
    assert Layout(ParallelConfig(tp=2, pp=2, zero_stage=1), world=8).dp == 2
    with pytest.raises(ConfigError, match="parallel.zero_stage=2 with parallel.pp=2"):
        Layout(ParallelConfig(pp=2, zero_stage=2), world=2)


