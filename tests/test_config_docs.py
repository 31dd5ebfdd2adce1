"""`lcl config keys/show`, the generated docs/config.md, and every command's --help."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from lcl_megatron import cli
from lcl_megatron.config import Config, load_config
from lcl_megatron.config_docs import key_docs, render_keys_markdown
from tests.launch import LCL, REPO


def _leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in tree.items():
        keys |= _leaf_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name}
    return keys


def _lcl(*args, cwd=REPO):
    return subprocess.run([*LCL, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_config_md_is_current():
    assert (REPO / "docs" / "config.md").read_text() == render_keys_markdown(), \
        "docs/config.md is stale: run `make docs` (lcl config keys --markdown > docs/config.md)"


def test_every_key_has_type_default_and_meaning():
    docs = {d.key: d for d in key_docs()}
    assert set(docs) == _leaf_keys(Config().to_dict())
    assert all(len(d.meaning) > 10 for d in docs.values())
    assert (docs["data.pack_open_rows"].type, docs["data.pack_open_rows"].default) == ("int", 8)
    assert docs["data.path"].type == "list of str" and docs["data.path"].default == ["embedded:digits"]
    assert "collective timeout" in docs["parallel.timeout_s"].meaning


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


@pytest.mark.parametrize("words", sorted(cli.COMMANDS))
def test_every_command_help_has_a_description_and_an_example(words, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([*words, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    usage, _, rest = text.partition("\n\n")
    assert usage.startswith(f"usage: lcl {' '.join(words)}")
    assert rest.strip() and not rest.lstrip().startswith(("options:", "positional arguments:"))  # a description
    example = text.split("example:\n", 1)[1]
    assert f"lcl {' '.join(words)}" in example or f"lcl_megatron.cli {' '.join(words)}" in example


@pytest.mark.slow
def test_verbose_shows_what_a_quiet_run_hides():
    args = ("plan", "--config", "configs/demo.yaml", "--nodes", "1", "--gpus-per-node", "1")
    quiet, verbose = _lcl(*args), _lcl("--verbose", *args)
    assert quiet.returncode == verbose.returncode == 0
    assert quiet.stderr == ""
    assert "Transformer Engine" in verbose.stderr  # megatron-core's note on a CPU install
    assert quiet.stdout == verbose.stdout
