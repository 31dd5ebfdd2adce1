"""Every `lcl` command in README.md and docs/*.md works as written.

The commands of each ```sh block are run in document order (README first, then
docs/ by name) in one scratch directory that looks like a checkout (configs/,
lcl_megatron/ ...), so a later command may use what an earlier one wrote, as a
reader following the pages would. `python -c`, `python - <<'EOF'` and `mkdir`
lines run too: they make the inputs of the `lcl` commands after them. A training run that does
not choose `train.steps` itself gets `train.steps=2` appended, to stay quick.
Commands that need a cluster, a GPU, the network or data outside the checkout
are listed in SKIPPED with the reason, and a test keeps that list current.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.launch import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_PREFIXES = ("lcl ", "python -c ", "python - ", "mkdir ")
SHELL_BLOCK = re.compile(r"^```(sh|bash|shell)\s*$")

NEEDS_SLURM = "submits to Slurm: needs a cluster (its --dry-run twin runs)"
NEEDS_DATA = "needs MMC4 data or a cluster run's output at /data or /scratch"
SKIPPED = {
    "lcl launch slurm --config configs/lcl_vit_b16_laion.yaml --nodes 8 --gpus-per-node 8 --partition gpu "
    "--time 2-00:00:00 --account myproject data.path=/scratch/$USER/laion400m run.dir=/scratch/$USER/runs/b16 "
    "train.steps=200000 parallel.zero_stage=1": NEEDS_SLURM,
    "lcl launch slurm --config C --nodes 16 --gpus-per-node 8 --init-from <old run> run.dir=<new run> "
    "parallel.tp=2 parallel.pp=2": "a template: C and the run directories are placeholders",
    "srun --cpus-per-task 32 --time 4:00:00 lcl prepare mmc4 --docs '/data/mmc4/docs/*.jsonl.zip' "
    "--images /data/mmc4/images --out /scratch/$USER/mmc4-shards --workers 31": NEEDS_DATA,
    "lcl launch slurm --config configs/lcl_vit_b32_mmc4.yaml --nodes 2 --gpus-per-node 8 --partition gpu "
    "--time 1-00:00:00 --dry-run data.path=/scratch/$USER/mmc4-shards run.dir=/scratch/$USER/runs/b32-mmc4 "
    "parallel.zero_stage=1": NEEDS_DATA,
    "lcl launch slurm --config configs/lcl_vit_b32_mmc4.yaml --nodes 2 --gpus-per-node 8 --partition gpu "
    "--time 1-00:00:00 data.path=/scratch/$USER/mmc4-shards run.dir=/scratch/$USER/runs/b32-mmc4 "
    "parallel.zero_stage=1": NEEDS_SLURM,
    "lcl convert inspect --checkpoint /scratch/$USER/runs/b32-mmc4": NEEDS_DATA,
    "lcl eval zeroshot --checkpoint runs/x --data /data/imagenet/val --classnames imagenet # 80 templates": NEEDS_DATA,
    "lcl convert to-hf --checkpoint /scratch/$USER/runs/b32-mmc4 --out /scratch/$USER/exports/b32-mmc4-hf": NEEDS_DATA,
    "lcl convert to-openclip --checkpoint /scratch/$USER/runs/b32-mmc4 --out /scratch/$USER/exports/b32-mmc4.pt":
        NEEDS_DATA,
}
# Printed by a quiet run only if our own code or a missing setting causes it (`lcl --verbose` shows the rest).
NOISE = ("FutureWarning", "unable to detect it")


def _normalise(command: str) -> str:
    return " ".join(command.split())


def doc_commands(path: Path) -> list[str]:
    """The runnable commands of the page's shell blocks: continuation lines joined, heredocs kept whole."""
    commands, block, lines = [], False, path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not block:
            block = bool(SHELL_BLOCK.match(line))
            continue
        if line.startswith("```"):
            block = False
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<'(\w+)'", line)
        if heredoc:
            body = []
            while i < len(lines) and lines[i] != heredoc.group(1):
                body.append(lines[i])
                i += 1
            line = "\n".join([line, *body, heredoc.group(1)])
            i += 1
        command = line.strip()
        if command.startswith(RUN_PREFIXES) or _normalise(command) in SKIPPED:
            commands.append(command)
    return commands


def _without_comment(command: str) -> str:
    return re.sub(r"\s+#\s.*$", "", command)


def as_run(command: str) -> str:
    """The command as the test runs it: short training, the rest unchanged."""
    command = _without_comment(command)
    words = command.split()
    trains = words[:2] == ["lcl", "train"] or (words[:3] == ["lcl", "launch", "local"] and "--dry-run" not in words)
    if trains and not any(w.startswith("train.steps=") for w in words):
        command += " train.steps=2"
    return command


def _scratch_checkout(root: Path) -> None:
    for name in ("configs", "lcl_megatron", "launchers", "kernels"):
        (root / name).symlink_to(REPO / name)
    (root / "docs").mkdir()


def test_skipped_commands_are_in_the_docs():
    found = {_normalise(c) for doc in DOCS for c in doc_commands(doc)}
    assert set(SKIPPED) <= found, f"SKIPPED lists commands no page has any more: {set(SKIPPED) - found}"
    assert sum(c.startswith("lcl ") for c in found) >= 20  # the extractor sees the pages' commands


@pytest.mark.timeout(3600)  # some 30 commands, a few CPU-seconds each, but slow on a busy machine
def test_every_documented_command_works(tmp_path):
    _scratch_checkout(tmp_path)
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                              "TRITON_INTERPRET", "LCL_VERBOSE", "DS_ACCELERATOR")}
    env = {**inherited, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "USER": os.environ.get("USER", "user"),
           "PY": sys.executable}
    prelude = 'lcl() { "$PY" -m lcl_megatron.cli "$@"; }\npython() { "$PY" "$@"; }\n'
    failures, ran = [], 0
    for doc in DOCS:
        for command in doc_commands(doc):
            if _normalise(command) in SKIPPED:
                continue
            start = time.perf_counter()
            proc = subprocess.run(["bash", "-c", prelude + as_run(command)], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=900)
            ran += 1
            where = f"{doc.relative_to(REPO)}: {command}"
            print(f"{time.perf_counter() - start:6.1f} s  exit {proc.returncode}  {where.splitlines()[0]}")
            if proc.returncode != 0:
                failures.append(f"{where}\n  exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
            elif any(noise in proc.stderr for noise in NOISE):
                failures.append(f"{where}\n  warnings on stderr: {proc.stderr.strip()[-2000:]}")
    assert ran >= 20
    assert not failures, "\n\n".join(failures)
