"""The config schema: YAML plus key=value overrides, and one-line errors with exit code 2."""


import pytest

from lcl_megatron.config import ConfigError, load_config, parse_overrides
from tests.support.launch import REPO


def test_overrides_parse_as_yaml():
    assert parse_overrides(["optim.lr=1e-3", "parallel.sp=true", "data.path=[a, b]", "run.name=x"]) == {
        "optim": {"lr": "1e-3"}, "parallel": {"sp": True}, "data": {"path": ["a", "b"]}, "run": {"name": "x"}}


def test_yaml_and_overrides_combine():
    cfg = load_config(REPO / "configs/demo.yaml", ["optim.lr=1e-3", "train.steps=7", "parallel.tp=1"])
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.train.steps == 7
    assert cfg.model.vision.image_size == 32  # from the file
    assert cfg.optim.beta2 == 0.98  # a default the file leaves alone


def test_reference_configs_are_valid_models():
    for name in ("lcl_vit_b32_laion", "lcl_vit_b16_laion", "lcl_vit_b32_mmc4"):
        cfg = load_config(REPO / f"configs/{name}.yaml", validate=False)
        from lcl_megatron.config import validate_config

        validate_config(cfg, check_data=False)


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("optim.lr=-0.1", "optim.lr"),
    ("train.steps=ten", "train.steps"),
    ("parallel.zero_stage=5", "parallel.zero_stage"),
    ("model.vision.patch_size=5", "model.vision.patch_size"),
    ("parallel.tp=3", "parallel.tp"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(REPO / "configs/demo.yaml", [override])


