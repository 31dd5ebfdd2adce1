"""`lcl launch slurm --dry-run` and `lcl launch local --dry-run`: the scripts and commands they write.

User values with spaces and shell metacharacters must come back out of the
script exactly as given (bash reads them back here) and never run as code."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from launchers import local, slurm
from launchers.sbatch import BODY_MARKER, template_body, template_text
from tests.support.launch import REPO

NASTY = "a b$(touch INJECTED)`touch INJECTED`;'q'\"d\"\\e*"


def dry_run(capsys, *args: str) -> tuple[int, str, str]:
    code = slurm.main(["--dry-run", *args])
    out, err = capsys.readouterr()
    return code, out, err


def settings_values(script: str, cwd, *expressions: str) -> list[str]:
    """Run the script's settings block in bash and print the given expressions, NUL-separated."""
    block = script.split("# ---- settings ")[1].split(BODY_MARKER)[0]
    block = block.split("\n", 1)[1]
    printer = "printf '%s\\0' " + " ".join(expressions)
    proc = subprocess.run(["bash", "-c", block + "\n" + printer], cwd=cwd, capture_output=True, text=True, check=True)
    return proc.stdout.split("\0")[:-1]


def test_dry_run_64_nodes_8_gpus(capsys, tmp_path):
    code, script, err = dry_run(capsys, "--config", "configs/demo.yaml", "--nodes", "64", "--gpus-per-node", "8",
                                "--partition", "gpu", "--time", "2-00:00:00", "--account", "proj42",
                                f"run.dir={tmp_path / 'run'}", "train.steps=100000")
    assert code == 0, err
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for expected in ["--nodes=64", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
                     "--time=2-00:00:00", "--account=proj42", "--requeue", "--signal=USR1@300", "--open-mode=append",
                     f"--output={tmp_path}/run/logs/slurm-%j.out", "--job-name=demo"]:
        assert f"#SBATCH {expected}" in header
    assert "PROCS_PER_NODE=8" in script and "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script
    assert script.endswith(template_body())  # the body is the hand-editable template's, unchanged
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_template_is_a_valid_script():
    text = template_text()
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    assert text.count(BODY_MARKER) == 1 and "#SBATCH --signal=USR1@" in text


def test_values_with_spaces_and_metacharacters_come_back_verbatim(capsys, tmp_path):
    config_dir = tmp_path / f"configs {NASTY}"
    config_dir.mkdir()
    config = config_dir / "my demo.yaml"
    shutil.copy(REPO / "configs" / "demo.yaml", config)
    run_dir = tmp_path / f"runs {NASTY}"
    weights = tmp_path / f"weights {NASTY}"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"")
    from lcl_megatron.checkpoint.format import write_manifest

    write_manifest(weights, {"step": 0})  # only a complete checkpoint is ever taken
    code, script, err = dry_run(capsys, "--config", str(config), "--nodes", "2", "--gpus-per-node", "1",
                                "--init-from", str(weights),
                                "--cpu-nodes", "--job-name", NASTY, "--env", f"MY_SETTING={NASTY}",
                                "--sbatch", f"--comment={NASTY}", f"run.dir={run_dir}", f"run.name={NASTY}")
    assert code == 0, err
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    values = settings_values(script, tmp_path, '"$LCL_CONFIG"', '"$LCL_RUN_DIR"', '"${LCL_OVERRIDES[@]}"',
                             '"$MY_SETTING"', '"${LCL_TRAIN_ARGS[@]}"')
    assert values == [str(config), str(run_dir), f"run.name={NASTY}", NASTY,
                      "--init-from", str(weights)]
    assert not list(tmp_path.rglob("INJECTED"))
    escaped = NASTY.replace("\\", "\\\\").replace('"', '\\"')
    assert f'#SBATCH --job-name="{escaped}"' in script  # sbatch's parser: double quotes, backslash escapes
    assert f'#SBATCH --comment="{escaped}"' in script
    assert "--gpus-per-node" not in "".join(line for line in script.splitlines() if line.startswith("#SBATCH"))


def test_percent_in_the_run_dir_is_kept_literal_by_slurm(capsys, tmp_path):
    code, script, _ = dry_run(capsys, "--config", "configs/demo.yaml", "--nodes", "1", "--gpus-per-node", "1",
                              f"run.dir={tmp_path}/100%run")
    assert code == 0
    assert f"#SBATCH --output={tmp_path}/100%%run/logs/slurm-%j.out" in script


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "--gpus-per-node", "8"], "--nodes must be at least 1"),
    (["--nodes", "2", "--gpus-per-node", "1", "parallel.tp=4"], "world size 2 is not divisible"),
    (["--nodes", "2", "--gpus-per-node", "1", "no.such=1"], "unknown config key 'no'"),
    (["--nodes", "2", "--gpus-per-node", "1", "--env", "1BAD=x"], "not a valid environment variable name"),
    (["--nodes", "2", "--gpus-per-node", "1", "--job-name", "two\nlines"], "line break"),
    (["--nodes", "2", "--gpus-per-node", "1", "--sbatch", "qos=high"], "give an sbatch option"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    code, out, err = dry_run(capsys, "--config", "configs/demo.yaml", *args)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1 and err.startswith("lcl launch slurm: ")


def test_missing_config_is_exit_2(capsys, tmp_path):
    code, _, err = dry_run(capsys, "--config", str(tmp_path / "nope.yaml"), "--nodes", "1", "--gpus-per-node", "1")
    assert code == 2 and "cannot read config file" in err


def test_local_dry_run_prints_torchrun_with_resume(capsys, tmp_path):
    config = tmp_path / f"cfg {NASTY}.yaml"
    shutil.copy(REPO / "configs" / "demo.yaml", config)
    assert local.main(["--config", str(config), "--nproc", "2", "--max-restarts", "2", "--dry-run",
                       f"run.dir={tmp_path}/run"]) == 0
    line = capsys.readouterr().out.strip()
    argv = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, text=True,
                          check=True).stdout.split("\0")[:-1]
    assert argv == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    "--max-restarts=2", "-m", "lcl_megatron.cli", "train", "--config", str(config), "--resume",
                    f"run.dir={tmp_path}/run"]
    assert local.main(["--config", str(config), "--nproc", "3", "--dry-run", "parallel.tp=2"]) == 2


def test_the_warning_leaves_time_for_the_planned_checkpoint_save(capsys, tmp_path):
    from lcl_megatron.config import load_config
    from lcl_megatron.plan.checkpoint import estimate_save
    from lcl_megatron.plan.costs import make_plan

    big = ["data.path=embedded:digits", "parallel.pp=1", "parallel.zero_stage=0", "train.precision=fp32",
           f"run.dir={tmp_path / 'run'}"]
    needed = estimate_save(make_plan(load_config("configs/lcl_vit_6b_llama7b.yaml", big), 2, 8),
                           load_config("configs/lcl_vit_6b_llama7b.yaml", big)).warning_s
    assert needed > 300
    code, script, err = dry_run(capsys, "--config", "configs/lcl_vit_6b_llama7b.yaml", "--nodes", "2",
                                "--gpus-per-node", "8", *big)
    assert code == 0, err
    assert f"#SBATCH --signal=USR1@{needed}" in script.splitlines()
    code, script, err = dry_run(capsys, "--config", "configs/lcl_vit_6b_llama7b.yaml", "--nodes", "2",
                                "--gpus-per-node", "8", "--warning", "60", *big)
    assert code == 0 and "#SBATCH --signal=USR1@60" in script.splitlines()
    assert f"shorter than the {needed} s" in err
