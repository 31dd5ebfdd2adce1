"""`lcl config keys/show` and every command's --help, run as processes."""

from __future__ import annotations

import subprocess

import yaml

from lcl_megatron import cli
from lcl_megatron.config import load_config
from lcl_megatron.config_docs import key_docs
from tests.support.launch import LCL, REPO


def test_config_keys_command_prints_every_key():
    proc = _lcl("config", "keys")
    assert proc.returncode == 0, proc.stderr
    for d in key_docs():
        assert d.key in proc.stdout and d.meaning in proc.stdout


def test_config_show_marks_defaults_and_loads_back(tmp_path):
    overrides = ["train.steps=7", "data.path=[embedded:digits]"]
    proc = _lcl("config", "show", "--config", "configs/demo.yaml", *overrides)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # the demo sets its model: no warning
    lines = {line.strip().split(":")[0]: line for line in proc.stdout.splitlines()}
    assert "# default" not in lines["steps"] and "7" in lines["steps"]  # an override
    assert "# default" not in lines["embed_dim"]  # set by the file
    assert lines["mlp_ratio"].endswith("# default") and lines["pack_open_rows"].endswith("# default")
    shown = tmp_path / "shown.yaml"
    shown.write_text(proc.stdout)
    assert load_config(shown).to_dict() == load_config("configs/demo.yaml", overrides).to_dict()
    assert yaml.safe_load(proc.stdout)["train"]["steps"] == 7


def test_config_show_reveals_the_default_model(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    proc = _lcl("config", "show", "--config", str(empty))
    assert proc.returncode == 0
    assert "large default model" in proc.stderr
    assert yaml.safe_load(proc.stdout)["model"]["text"]["width"] == 512


def test_config_show_bad_key_is_one_line(tmp_path):
    proc = _lcl("config", "show", "--config", "configs/demo.yaml", "train.stepz=3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lcl config show: unknown config key 'train.stepz'"


def test_lcl_help_lists_every_command_with_a_line():
    assert set(cli.SUMMARIES) == set(cli.COMMANDS)
    proc = _lcl("--help")
    assert proc.returncode == 0
    for words, summary in cli.SUMMARIES.items():
        assert f"{' '.join(words)}  " in proc.stdout and summary in proc.stdout
    group = _lcl("convert", "--help")
    assert group.returncode == 0 and "convert to-openclip" in group.stdout and "\n  train " not in group.stdout


def test_verbose_shows_what_a_quiet_run_hides():
    args = ("plan", "--config", "configs/demo.yaml", "--nodes", "1", "--gpus-per-node", "1")
    quiet, verbose = _lcl(*args), _lcl("--verbose", *args)
    assert quiet.returncode == verbose.returncode == 0
    assert quiet.stderr == ""
    assert "Transformer Engine" in verbose.stderr  # megatron-core's note on a CPU install
    assert quiet.stdout == verbose.stdout


def _lcl(*args, cwd=REPO):
    return subprocess.run([*LCL, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
