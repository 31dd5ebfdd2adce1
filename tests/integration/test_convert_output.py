"""Every `lcl convert` command refuses an --out that holds something of the user's.

An output may be absent, an empty directory, or an earlier output of the same
command; `--force` replaces anything but the command's own input. A refusal is
one line on stderr and exit code 2, and leaves every file as it was.
"""

import hashlib
import subprocess
import sys

import pytest

from tests.support.checkpoints import random_checkpoint
from tests.support.checkpoints import tiny_model_config
from tests.support.paths import REPO
from tests.support.cli import run_cli

DIRECTORY_COMMANDS = ("to-hf", "to-megatron-vision", "from-openclip", "reshard")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A checkpoint (inside a run-like directory) and the same weights in OpenCLIP format."""
    root = tmp_path_factory.mktemp("sources")
    ckpt = random_checkpoint(tiny_model_config(), root / "run" / "checkpoints" / "step_00000001")
    code = run_cli_plain("convert", "to-openclip", "--checkpoint", ckpt, "--out", root / "lcl.pt",
                         "--model-config-out", root / "lcl.json")
    assert code == 0
    return {"ckpt": ckpt, "run": root / "run", "pt": root / "lcl.pt", "json": root / "lcl.json"}


def run_cli_plain(*argv) -> int:
    from lcl_megatron import cli

    return cli.main(list(map(str, argv)))


def argv_for(command: str, sources, out, *extra) -> list:
    if command == "from-openclip":
        inputs = ["--checkpoint", sources["pt"], "--model-config", sources["json"]]
    else:
        inputs = ["--checkpoint", sources["ckpt"]]
    layout = ["--layout", "consolidated", "--weights-only"] if command == "reshard" else []
    return ["convert", command, *inputs, *layout, "--out", out, *extra]


def snapshot(path) -> dict:
    """Every file under `path` (or `path` itself) with its bytes' SHA-256."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_refused(capsys, argv, *untouched, says: str):
    before = [snapshot(p) for p in untouched]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and says in err, err
    assert [snapshot(p) for p in untouched] == before


def user_folder(path):
    path.mkdir()
    (path / "notes.txt").write_text("my notes")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\0\1\2")
    return path


@pytest.mark.parametrize("command", DIRECTORY_COMMANDS)
def test_directory_outputs_refuse_what_the_user_had(capsys, tmp_path, sources, command):
    folder = user_folder(tmp_path / "mine")
    assert_refused(capsys, argv_for(command, sources, folder), folder, says="did not write")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    assert_refused(capsys, argv_for(command, sources, a_file), a_file, says="is a file")
    # The run directory, or the checkpoint itself: refused, and for a command that reads them not even --force.
    for target in (sources["run"], sources["ckpt"]):
        assert_refused(capsys, argv_for(command, sources, target), sources["run"], says="")
        if command != "from-openclip":
            assert_refused(capsys, argv_for(command, sources, target, "--force"), sources["run"], says="input")


@pytest.mark.parametrize("command", DIRECTORY_COMMANDS)
def test_directory_outputs_rewrite_their_own_output_and_force_replaces(capsys, tmp_path, sources, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, *argv_for(command, sources, empty))
    assert code == 0, err
    written = sorted(p.name for p in empty.iterdir())
    code, _, err = run_cli(capsys, *argv_for(command, sources, empty))  # its own earlier output
    assert code == 0, err
    assert sorted(p.name for p in empty.iterdir()) == written
    # A file the user put into that output since makes it theirs again.
    (empty / "my_eval.json").write_text("{}")
    assert_refused(capsys, argv_for(command, sources, empty), empty, says="my_eval.json")
    # --force replaces a folder of the user's.
    folder = user_folder(tmp_path / "mine")
    code, _, err = run_cli(capsys, *argv_for(command, sources, folder, "--force"))
    assert code == 0, err
    assert not (folder / "notes.txt").exists() and sorted(p.name for p in folder.iterdir()) == written


def test_to_openclip_refuses_directories_foreign_files_and_read_only_places(capsys, tmp_path, sources):
    argv = lambda out, *extra: ["convert", "to-openclip", "--checkpoint", sources["ckpt"], "--out", out, *extra]
    folder = user_folder(tmp_path / "mine")
    assert_refused(capsys, argv(folder), folder, says="is a directory")
    assert_refused(capsys, argv(folder, "--force"), folder, says="is a directory")
    theirs = tmp_path / "theirs.pt"
    theirs.write_bytes(b"someone else's weights")
    assert_refused(capsys, argv(theirs), theirs, says="did not write")
    assert_refused(capsys, argv(tmp_path / "new.pt", "--model-config-out", theirs), theirs, says="did not write")
    assert not (tmp_path / "new.pt").exists()  # refused before anything was written
    assert_refused(capsys, argv("/sys/lcl.pt"), sources["run"], says="cannot write")
    assert_refused(capsys, argv(theirs / "lcl.pt"), theirs, says="is a file")
    assert_refused(capsys, argv(sources["ckpt"] / "model.safetensors", "--force"), sources["run"], says="input")

    ours = tmp_path / "ours.pt"
    assert run_cli(capsys, *argv(ours))[0] == 0
    assert run_cli(capsys, *argv(ours))[0] == 0  # its own earlier output
    ours.write_bytes(ours.read_bytes() + b"\0")  # changed since: the user's now
    assert_refused(capsys, argv(ours), ours, says="changed since")
    assert run_cli(capsys, *argv(theirs, "--force"))[0] == 0
    assert theirs.read_bytes() == sources["pt"].read_bytes()


def test_the_lcl_process_refuses_its_run_directory_with_one_line(tmp_path, sources):
    """As typed: `lcl convert to-hf --checkpoint runs/x --out runs/x` once erased the whole run."""
    before = snapshot(sources["run"])
    proc = subprocess.run([sys.executable, "-m", "lcl_megatron.cli", "convert", "to-hf", "--checkpoint",
                           str(sources["run"]), "--out", str(sources["run"])],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "would replace the input" in proc.stderr
    assert snapshot(sources["run"]) == before
