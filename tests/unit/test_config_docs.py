"""`lcl config keys/show`, the generated docs/config.md, and every command's --help."""

from __future__ import annotations


import pytest

from lcl_megatron import cli
from lcl_megatron.config import Config
from lcl_megatron.config_docs import key_docs, render_keys_markdown
from tests.support.launch import REPO


def _leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in tree.items():
        keys |= _leaf_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name}
    return keys



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


