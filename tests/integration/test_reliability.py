"""A user's ordinary mistakes and faults, through the public `lcl` commands.

Each refusal is one line on stderr with exit code 2, no traceback, and leaves
every file the user had as it was. docs/reliability.md maps each case to its test.
"""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image as PILImage

from lcl_megatron.config import load_config
from lcl_megatron.data.shards import write_shard
from lcl_megatron.checkpoint.format import COMPLETE, complete_checkpoints
from tests.support.launch import LCL, REPO, read_metrics, run_lcl
from tests.support.configs import TINY
from tests.support.configs import with_base

STEP1, STEP2 = "step_00000001", "step_00000002"


def train_args(run_dir, *extra):
    return ["train", "--config", "configs/demo.yaml", *with_base(*extra), f"run.dir={run_dir}"]


def snapshot(root) -> dict:
    """Every file and directory under `root` with its contents' hash."""
    root = os.fspath(root)
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


def refused(proc, *words, code=2) -> str:
    """The process exited `code` with one line on stderr holding `words`; returns that line."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def flip_bytes(path, count=64):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def jpeg(color, size=(20, 16)) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", size, color).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished two-step run with a complete checkpoint after each step."""
    run_dir = tmp_path_factory.mktemp("reliability") / "run"
    run_lcl(train_args(run_dir, "train.steps=2", "checkpoint.every=1", "checkpoint.keep=2", "data.heldout="))
    return run_dir


# ---------------------------------------------------------------- data loss


def test_training_into_a_run_that_holds_checkpoints_is_refused(run):
    before = snapshot(run)
    proc = run_lcl(train_args(run, "train.steps=3", "data.heldout="), check=False)
    refused(proc, "--resume", "run.dir", STEP2)
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["model_flipped", "engine_truncated"])
def test_eval_refuses_a_damaged_checkpoint(run, tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / STEP2, ckpt)
    if damage == "model_flipped":
        name = "model.safetensors"
        flip_bytes(ckpt / name)
    else:
        name = "mp_rank_00_model_states.pt"
        (ckpt / name).write_bytes((ckpt / name).read_bytes()[:1000])
    before = snapshot(tmp_path)
    proc = run_lcl(["eval", "zeroshot", "--checkpoint", str(ckpt), "--data", "embedded:digits"], check=False)
    refused(proc, name, "SHA-256" if damage == "model_flipped" else "truncated")
    assert snapshot(tmp_path) == before


def test_init_from_a_damaged_checkpoint_is_refused(run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / STEP2, ckpt)
    flip_bytes(ckpt / "model.safetensors")
    before = snapshot(ckpt)
    proc = run_lcl(train_args(tmp_path / "new", "train.steps=1", "data.heldout=", "--init-from", str(ckpt)), check=False)
    refused(proc, "model.safetensors", "SHA-256")
    assert snapshot(ckpt) == before


def test_resume_sets_a_damaged_checkpoint_aside_and_continues_from_the_one_before(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    flip_bytes(run_dir / "checkpoints" / STEP2 / "mp_rank_00_model_states.pt")
    damaged = snapshot(run_dir / "checkpoints" / STEP2)
    # --resume among the overrides: flags may come anywhere
    args = ["train", "--config", "configs/demo.yaml", "--resume",
            *with_base("train.steps=3", "checkpoint.every=1", "checkpoint.keep=2", "data.heldout="), f"run.dir={run_dir}"]
    proc = run_lcl(args)
    assert "does not match its SHA-256" in proc.stderr and "Traceback" not in proc.stderr
    assert f"resumed from {run_dir / 'checkpoints' / STEP1} at step 1" in proc.stderr
    assert snapshot(run_dir / "checkpoints" / f"{STEP2}.damaged") == damaged  # kept for the user, untouched
    assert [c.name for c in complete_checkpoints(run_dir / "checkpoints")] == [STEP2, "step_00000003"]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]  # step 2 of the first run is replaced by its rerun
    assert all(m["loss"] == m["loss"] for m in metrics)  # not NaN: the damaged state was never loaded


def test_resume_without_a_complete_checkpoint_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000003").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt").write_bytes(b"half a save")
    before = snapshot(tmp_path)
    proc = run_lcl(train_args(run_dir, "--resume"), check=False)
    refused(proc, "step_00000003", "start over")
    assert snapshot(tmp_path) == before


def test_eval_refuses_a_step_directory_whose_save_never_finished(run, tmp_path):
    ckpt = tmp_path / STEP2
    shutil.copytree(run / "checkpoints" / STEP2, ckpt)
    (ckpt / COMPLETE).unlink()
    before = snapshot(tmp_path)
    proc = run_lcl(["eval", "zeroshot", "--checkpoint", str(ckpt), "--data", "embedded:digits"], check=False)
    refused(proc, COMPLETE, "never finished")
    assert snapshot(tmp_path) == before


def _interrupt(tmp_path, signals: int):
    """`lcl train` interrupted with Ctrl-C (`signals` times) once it is training."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET")}
    proc = subprocess.Popen(LCL + train_args(run_dir, "train.steps=100000", "data.heldout=", "logging.every=1"),
                            cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    if signals == 2:
        # Signals of one kind that arrive before the first is handled merge into one: wait for its message.
        while not any("got SIGINT" in line for line in lines):
            assert time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    reader.join(timeout=30)
    return proc.returncode, "".join(lines), run_dir


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    code, stderr, run_dir = _interrupt(tmp_path, 1)
    assert code == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-3000:]
    assert "got SIGINT" in stderr and "continue with --resume" in stderr
    saved = complete_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1 and int(saved[0].name.split("_")[1]) == read_metrics(run_dir)[-1]["step"]


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    code, stderr, run_dir = _interrupt(tmp_path, 2)
    assert code == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-3000:]
    assert "second Ctrl-C" in stderr and "checkpoint written" not in stderr


def test_a_kill_during_a_background_save_leaves_the_previous_checkpoint_for_resume(run, tmp_path):
    from lcl_megatron.checkpoint.format import resolve_checkpoint, verify_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    third = run_dir / "checkpoints" / "step_00000003"
    args = train_args(run_dir, "train.steps=100000", "checkpoint.every=1", "checkpoint.keep=2", "data.heldout=",
                      "checkpoint.async_save=true", "--resume")
    proc = subprocess.Popen(LCL + args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not third.exists():  # training goes on while the background thread writes step 3's files
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.002)
    proc.kill()
    proc.wait(timeout=60)
    assert not (third / COMPLETE).exists()
    assert resolve_checkpoint(run_dir) == run_dir / "checkpoints" / STEP2  # what --resume and eval take
    verify_checkpoint(run_dir / "checkpoints" / STEP2)


def test_files_follow_the_umask(run):
    umask = os.umask(0)
    os.umask(umask)
    ckpt = run / "checkpoints" / STEP2
    for path in [run / "config.yaml", ckpt / COMPLETE, ckpt / "model.safetensors", ckpt / "mp_rank_00_model_states.pt"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    for path in [run, run / "checkpoints", ckpt]:
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path


# ---------------------------------------------------------------- crashes


def test_zero3_run_of_the_demo_config_trains_and_evaluates(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [t for t in TINY if not t.startswith(("data.heldout", "train.steps"))]
    run_lcl(["train", "--config", "configs/demo.yaml", *overrides, "parallel.zero_stage=3", "train.steps=2",
             "train.micro_batch_size=4", "data.heldout=embedded:digits", f"run.dir={run_dir}"], nproc=2)
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "zeroshot_top1" in line]
    assert len(evals) == 1
    # the gathered ZeRO-3 weights score exactly what the consolidated checkpoint scores in one process
    proc = run_lcl(["eval", "zeroshot", "--checkpoint", str(run_dir)])
    assert f"{evals[0]['zeroshot_top1']:.4f}" in proc.stdout


# ---------------------------------------------------------------- real data as it comes


def write_laion(directory, count=8):
    """A LAION shard as img2dataset writes it: KEY.jpg, KEY.txt, KEY.json per sample, with the
    shard's .parquet and _stats.json beside the tar."""
    directory.mkdir()
    rows, samples = [], []
    for n in range(count):
        key = f"{n:09d}"
        caption = f"a photo of colour number {n}"
        image = jpeg((30 * n % 255, 90, 160))
        meta = {"url": f"https://example.org/{n}.jpg", "caption": caption, "key": key, "status": "success",
                "error_message": None, "width": 20, "height": 16, "original_width": 640, "original_height": 512,
                "exif": "{}", "sha256": hashlib.sha256(image).hexdigest()}
        samples.append((key, {"jpg": image, "txt": caption.encode(), "json": json.dumps(meta).encode()}))
        rows.append(meta)
    write_shard(directory / "00000.tar", samples)
    pq.write_table(pa.Table.from_pylist(rows), directory / "00000.parquet")
    (directory / "00000_stats.json").write_text(json.dumps({"count": count, "successes": count, "failed_to_download": 0,
                                                            "status_dict": {"success": count}}))


def write_mmc4(directory, count=4):
    """MMC4 documents as `lcl prepare mmc4` writes them (the reference's form)."""
    directory.mkdir()
    samples = []
    for n in range(count):
        doc = {"url": f"https://example.org/doc{n}", "text_list": [f"first sentence {n}", f"second sentence {n}"],
               "image_info": [{"image_name": "img0.jpg", "matched_text_index": 1, "matched_sim": 0.3}]}
        samples.append((f"d{n:08d}", {"json": json.dumps(doc).encode(), "img0.jpg": jpeg((n * 40, 10, 10))}))
    write_shard(directory / "docs_shard_1_v2.tar", samples)


def write_obelics(directory, count=4):
    """OBELICS documents as `lcl prepare obelics` writes them (items with named images)."""
    directory.mkdir()
    samples = []
    for n in range(count):
        doc = {"items": [{"image": "img0.png"}, {"text": f"a caption for document {n}"}]}
        png = io.BytesIO()
        PILImage.new("RGB", (12, 10), (10, n * 40, 10)).save(png, format="PNG")
        samples.append((f"r{n:08d}", {"json": json.dumps(doc).encode(), "img0.png": png.getvalue()}))
    write_shard(directory / "part-0.tar", samples)


def test_laion_mmc4_and_obelics_shards_train_as_their_tools_write_them(tmp_path):
    write_laion(tmp_path / "laion")
    write_mmc4(tmp_path / "mmc4")
    write_obelics(tmp_path / "obelics")
    paths = f"data.path=[{tmp_path / 'laion'},{tmp_path / 'mmc4'},{tmp_path / 'obelics'}]"
    run_lcl(train_args(tmp_path / "run", paths, "train.steps=2", "data.heldout=", "data.shuffle_buffer=4"))
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(not m["data_skipped"] for m in metrics), metrics


# ---------------------------------------------------------------- bad data must be visible


def test_skipped_input_is_reported_per_reason(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    samples = [(f"{n:09d}", {"jpg": jpeg((n * 30, 0, 0)) if n % 4 == 0 else b"not a jpeg", "txt": b"a caption"})
               for n in range(16)]  # 75% corrupt images
    write_shard(data / "a.tar", samples)
    write_shard(data / "b.tar", [(f"b{n:08d}", {"jpg": jpeg((0, n * 30, 0)), "txt": b"x"}) for n in range(8)])
    (data / "b.tar").write_bytes((data / "b.tar").read_bytes()[:5000])  # truncated
    proc = run_lcl(train_args(tmp_path / "run", f"data.path={data}", "train.steps=2", "data.heldout=",
                              "logging.tensorboard=true", "logging.progress=true"))
    skipped = read_metrics(tmp_path / "run")[-1]["data_skipped"]
    assert skipped["images_corrupt"] >= 12 and skipped["skipped_no_image"] >= 12 and skipped["shards_unreadable"] >= 1
    assert proc.stderr.count("damaged shard") == 1 and "b.tar" in proc.stderr
    assert "images_corrupt=" in proc.stderr  # the progress line
    events = next((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")).read_bytes()
    assert b"data/images_corrupt" in events and b"data/shards_unreadable" in events


def _garbage_tar(path):
    with tarfile.open(path, "w") as tar:
        for name, data in [("k1.jpg", b"\x00garbage"), ("k1.txt", b"\xff\xfe"), ("k2.bin", os.urandom(100))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("layout", ["empty", "not_tars", "random_bytes", "garbage_members"])
def test_data_without_a_readable_sample_is_refused_before_the_model_is_built(tmp_path, layout):
    data = tmp_path / "data"
    data.mkdir()
    if layout == "not_tars":
        (data / "captions.txt").write_text("a cat\n")
    elif layout == "random_bytes":
        (data / "00000.tar").write_bytes(os.urandom(4096))
    elif layout == "garbage_members":
        _garbage_tar(data / "00000.tar")
    before = snapshot(tmp_path)
    proc = run_lcl(train_args(tmp_path / "run", f"data.path={data}", "train.steps=1", "data.heldout="), check=False)
    refused(proc, "data.path", str(data))
    assert snapshot(tmp_path) == before  # not even the run directory was made


# ---------------------------------------------------------------- one line where a traceback was


def test_config_that_is_not_utf8_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"run:\n  name: caf\xe9\n")
    proc = run_lcl(["train", "--config", str(config), f"run.dir={tmp_path / 'run'}"], check=False)
    refused(proc, "UTF-8", str(config))


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_run_dir_that_cannot_be_a_directory_is_refused(tmp_path, where):
    (tmp_path / "notes.txt").write_text("mine")
    run_dir = tmp_path / "notes.txt" if where == "a_file" else tmp_path / "notes.txt" / "run"
    before = snapshot(tmp_path)
    refused(run_lcl(train_args(run_dir, "train.steps=1", "data.heldout="), check=False), "run.dir", "file")
    assert snapshot(tmp_path) == before


@pytest.fixture
def small_disk(tmp_path):
    """An 80 MB file system: room for one checkpoint of the tiny model (52 MB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small file system needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_stays(small_disk):
    from lcl_megatron.checkpoint.format import verify_checkpoint

    run_dir = small_disk / "run"
    proc = run_lcl(train_args(run_dir, "train.steps=2", "checkpoint.every=1", "data.heldout="), check=False)
    refused(proc, "the disk is full", f"{STEP1} is intact", "--resume")
    assert [c.name for c in complete_checkpoints(run_dir / "checkpoints")] == [STEP1]
    verify_checkpoint(run_dir / "checkpoints" / STEP1)  # every file matches its manifest


def test_resume_with_another_model_config_is_refused_before_anything_is_written(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    before = snapshot(run_dir)
    proc = run_lcl(train_args(run_dir, "model.text.layers=3", "train.steps=3", "data.heldout=", "--resume"), check=False)
    refused(proc, "model.text.layers=3", "checkpoint: 2")
    assert snapshot(run_dir) == before  # config.yaml included


def test_eval_loss_refuses_a_batch_that_is_not_weights_only(run, tmp_path):
    import argparse

    batch = tmp_path / "batch.pt"
    torch.save({"images": torch.zeros(1, 3, 24, 24), "input_ids": torch.zeros(1, 8, dtype=torch.long),
                "extra": argparse.Namespace(code="runs on load")}, batch)
    proc = run_lcl(["eval", "loss", "--checkpoint", str(run), "--batch", str(batch)], check=False)
    line = refused(proc, str(batch), "could run code")
    assert "weights_only=False" not in proc.stderr and line


def test_checkpoint_files_that_are_not_weights_only_are_refused(run, tmp_path):
    import datetime

    from lcl_megatron.checkpoint.format import read_manifest, write_manifest

    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / STEP2, ckpt)
    torch.save({"module": {}, "when": datetime.date(2026, 1, 1)}, ckpt / "mp_rank_00_model_states.pt")
    write_manifest(ckpt, {k: v for k, v in read_manifest(ckpt).items() if k != "files"})  # vouches for it
    before = snapshot(tmp_path)
    proc = run_lcl(["convert", "inspect", "--checkpoint", str(ckpt)], check=False)
    refused(proc, "mp_rank_00_model_states.pt", "could run code")
    assert "weights_only=False" not in proc.stderr
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- overrides and messages


def test_overrides_given_twice_are_refused_naming_the_key(tmp_path):
    proc = run_lcl(train_args(tmp_path / "run", "train.steps=3", "train.steps=4"), check=False)
    refused(proc, "train.steps", "twice")
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: 3\n  seed: 1\n  steps: 4\n")
    refused(run_lcl(["train", "--config", str(config), f"run.dir={tmp_path / 'run'}"], check=False), "steps", "twice")


def test_a_section_override_sets_only_the_keys_it_names():
    cfg = load_config("configs/demo.yaml", ["train.steps=3", "train={micro_batch_size: 4}"])
    assert (cfg.train.steps, cfg.train.micro_batch_size) == (3, 4)
    cfg = load_config("configs/demo.yaml", ["train={micro_batch_size: 4}", "train.steps=3"])
    assert (cfg.train.steps, cfg.train.micro_batch_size) == (3, 4)


@pytest.mark.parametrize("override,words", [
    ("model.text.context_length=19", ("at least 20", "got 19")),
    ("optim.lr=.inf", ("optim.lr", "finite")),
    ("optim.lr=.nan", ("optim.lr", "finite")),
])
def test_bad_values_are_refused_in_words_that_hold(tmp_path, override, words):
    proc = run_lcl(["train", "--config", "configs/demo.yaml", override, f"run.dir={tmp_path / 'run'}"], check=False)
    refused(proc, *words)
    assert not (tmp_path / "run").exists()
