"""Packages import downwards only (docs/architecture.md): the import graph between the packages
of lcl_megatron has no cycle, not even through imports inside functions, and kernels/ stands alone."""

import ast
from collections import defaultdict
from pathlib import Path

from tests.support.paths import REPO

# Lowest first; a unit may import only units listed before it (docs/architecture.md draws the same).
LAYERS = [
    ["errors", "tokens"],
    ["utils", "layout", "tokenizer"],
    ["config"],
    ["config_docs", "parallel", "loss"],
    ["model"],
    ["data", "checkpoint"],
    ["eval", "plan"],
    ["training", "convert"],
    ["bench", "ablation"],
    ["cli"],
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str | None:
    """`lcl_megatron.model.lcl` -> `model`; `lcl_megatron.config` -> `config`."""
    parts = module.split(".")
    return parts[1] if parts[0] == "lcl_megatron" and len(parts) > 1 else None


def imports(path: Path) -> set[str]:
    """Every lcl_megatron module the file imports, at any depth of the file (functions included)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] == "lcl_megatron"}


def unit_edges() -> dict[tuple[str, str], list[str]]:
    edges = defaultdict(list)
    for path in sorted((REPO / "lcl_megatron").rglob("*.py")):
        source = unit_of(".".join(path.relative_to(REPO).with_suffix("").parts)) or "lcl_megatron"
        for module in imports(path):
            target = unit_of(module)
            if target in RANK and target != source:
                edges[source, target].append(str(path.relative_to(REPO)))
    return edges


def test_every_unit_has_a_layer():
    units = {p.stem for p in (REPO / "lcl_megatron").glob("*.py") if p.stem != "__init__"} | \
            {p.name for p in (REPO / "lcl_megatron").iterdir() if (p / "__init__.py").exists()}
    assert units == set(RANK), f"add to or remove from LAYERS (and docs/architecture.md): {units ^ set(RANK)}"


def test_packages_import_downwards_only():
    upward = [f"{src} -> {dst} ({', '.join(sorted(set(files)))})" for (src, dst), files in unit_edges().items()
              if src in RANK and RANK[dst] >= RANK[src]]
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)


def test_kernels_import_nothing_of_lcl_megatron():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "kernels").rglob("*.py") if imports(p)]
    assert not offenders, offenders
