"""`lcl prepare mmc4` on the real MMC4 sample with generated images: clean, damaged, restarted, trained."""

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import sklearn
from PIL import Image as PILImage

from lcl_megatron.config import DataConfig
from lcl_megatron.data.loader import build_train_loader
from lcl_megatron.cli import main as lcl
from lcl_megatron.data.shards import read_shard
from lcl_megatron.tokens import SOI_ID
from tests.support.launch import read_metrics, run_lcl
from tests.support.paths import MMC4_DIR

DOCS = MMC4_DIR / "docs_no_face_shard_151_v3.sample40.jsonl"
PHOTOS = [Path(sklearn.__file__).parent / "datasets" / "images" / name for name in ("china.jpg", "flower.jpg")]


def real_docs():
    return [json.loads(line) for line in DOCS.read_text().splitlines()]


def photo_crop(n: int) -> bytes:
    """A small JPEG cut from scikit-learn's sample photos, different for every n."""
    photo = PILImage.open(PHOTOS[n % 2])
    rng = np.random.default_rng(n)
    w, h = int(rng.integers(24, 64)), int(rng.integers(24, 64))
    x, y = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h))
    out = io.BytesIO()
    photo.crop((x, y, x + w, y + h)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_zip(path: Path, docs) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(path.name[: -len(".zip")], "".join(json.dumps(d) + "\n" for d in docs))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Two zipped docs shards (20 real documents each) and a flat image folder."""
    root = tmp_path_factory.mktemp("mmc4src")
    docs = real_docs()
    (root / "images").mkdir()
    for n, name in enumerate(sorted({i["image_name"] for d in docs for i in d["image_info"]})):
        (root / "images" / name).write_bytes(photo_crop(n))
    (root / "docs").mkdir()
    write_zip(root / "docs" / "docs_shard_1_v2.jsonl.zip", docs[:20])
    write_zip(root / "docs" / "docs_shard_2_v2.jsonl.zip", docs[20:])
    return root


def prepare(src: Path, out: Path, *extra) -> dict:
    """`lcl prepare mmc4` in its own process, as users run it (its workers fork; forking the
    test process, with the thread pools earlier tests started, could deadlock)."""
    proc = subprocess.run([sys.executable, "-m", "lcl_megatron.cli", "prepare", "mmc4",
                           "--docs", str(src / "docs" / "*.jsonl*"), "--images", str(src / "images"),
                           "--out", str(out), "--workers", "2", "--no-progress", *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def samples(out: Path) -> dict:
    return {(shard.name, s["__key__"]): s for shard in sorted(out.glob("*.tar")) for s in read_shard(shard)}


def assert_balanced(counts):
    docs_dropped = sum(v for k, v in counts.items() if k.startswith("docs_dropped_"))
    images_dropped = sum(v for k, v in counts.items() if k.startswith("images_dropped_"))
    assert counts["docs_in"] == counts["docs_out"] + docs_dropped
    assert counts["images_in"] == counts["images_out"] + images_dropped


@pytest.fixture(scope="module")
def clean(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    return out, prepare(source, out)


def test_clean_conversion_keeps_every_document_and_image_above_the_threshold(clean):
    out, report = clean
    counts = report["counts"]
    docs = real_docs()
    above = sum(i["matched_sim"] >= 0.24 for d in docs for i in d["image_info"])
    assert counts["docs_in"] == counts["docs_out"] == 40 == report["samples"]
    assert counts["images_in"] == 149 and counts["images_out"] == above
    assert counts["images_dropped_below_similarity"] == 149 - above
    assert_balanced(counts)
    index = json.loads((out / "index.json").read_text())["shards"]
    assert index == {"docs_shard_1_v2.tar": {"samples": 20}, "docs_shard_2_v2.tar": {"samples": 20}}
    first = samples(out)[("docs_shard_1_v2.tar", "d00000000")]
    doc = json.loads(first["json"])
    assert doc["text_list"] == docs[0]["text_list"]
    assert all(info["image_name"] in first for info in doc["image_info"])


def test_damaged_inputs_change_only_the_counts(source, clean, tmp_path):
    clean_out, clean_report = clean
    src = tmp_path / "src"
    shutil.copytree(source, src)
    docs = real_docs()
    images = src / "images"
    # doc 1: an image of garbage, a truncated one, four in other modes (converted, kept);
    # doc 2: a missing image; doc 3: an image over the pixel limit
    above = [[i["image_name"] for i in d["image_info"] if i["matched_sim"] >= 0.24] for d in docs]
    (images / above[1][0]).write_bytes(b"not an image at all")
    (images / above[1][1]).write_bytes((images / above[1][1]).read_bytes()[:200])
    for name, mode in zip(above[1][2:6], ("L", "CMYK", "P", "RGBA")):
        converted = io.BytesIO()
        PILImage.open(images / name).convert(mode).save(converted, format="JPEG" if mode in ("L", "CMYK") else "PNG")
        (images / name).write_bytes(converted.getvalue())
    (images / above[2][0]).unlink()
    big = io.BytesIO()
    PILImage.new("RGB", (3000, 2000), (9, 9, 9)).save(big, format="PNG")
    (images / above[3][0]).write_bytes(big.getvalue())
    # shard 1: a malformed JSON line and a document without usable images; shard 2: truncated zip
    bad = dict(docs[4], image_info=[dict(i, image_name="nowhere.jpg") for i in docs[4]["image_info"]])
    with zipfile.ZipFile(src / "docs" / "docs_shard_1_v2.jsonl.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("docs_shard_1_v2.jsonl", "".join(
            [json.dumps(d) + "\n" for d in docs[:4]] + ['{"text_list": ["cut\n'] + [json.dumps(bad) + "\n"]
            + [json.dumps(d) + "\n" for d in docs[5:20]]))
    zipped = (src / "docs" / "docs_shard_2_v2.jsonl.zip").read_bytes()
    (src / "docs" / "docs_shard_2_v2.jsonl.zip").write_bytes(zipped[: len(zipped) * 2 // 3])

    out = tmp_path / "out"
    counts = prepare(src, out, "--max-pixels", "4000000")["counts"]
    assert_balanced(counts)
    assert counts["files_truncated"] == 1 and counts["docs_dropped_malformed_json"] >= 1
    assert counts["images_dropped_corrupt"] == 2 and counts["images_dropped_oversized"] == 1
    assert counts["images_dropped_missing"] == 1 + len(docs[4]["image_info"]) - sum(
        i["matched_sim"] < 0.24 for i in docs[4]["image_info"])
    assert counts["docs_dropped_no_usable_image"] == 1
    assert counts["images_converted_to_rgb"] == 4
    # every document the damage did not touch is stored byte for byte as before
    before, after = samples(clean_out), samples(out)
    shard = "docs_shard_1_v2.tar"
    for line, doc in [(0, 0)] + [(n + 1, n) for n in range(5, 20)]:  # the inserted bad line shifts the rest
        assert after[(shard, f"d{line:08d}")] == {**before[(shard, f"d{doc:08d}")], "__key__": f"d{line:08d}"}
    assert len([k for k in after if k[0] == shard]) == 19  # all but the document without usable images
    truncated = [k for k in after if k[0] == "docs_shard_2_v2.tar"]
    assert 0 < len(truncated) < 20
    for key in truncated:
        assert after[key] == before[key]


def test_rerun_skips_finished_shards_and_redoes_unfinished(source, tmp_path):
    out = tmp_path / "out"
    prepare(source, out)
    stamp = os.stat(out / "docs_shard_1_v2.tar").st_mtime_ns
    os.unlink(out / "reports" / "docs_shard_2_v2.json")  # as if killed before shard 2 finished
    report = prepare(source, out)
    assert report["counts"]["files_skipped_finished"] == 1 and report["samples"] == 40
    assert os.stat(out / "docs_shard_1_v2.tar").st_mtime_ns == stamp
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_items_form_applies_the_reference_rules_once(source, tmp_path):
    counts = prepare(source, tmp_path, "--form", "items", "--max-images", "2")["counts"]
    assert_balanced(counts)
    for sample in samples(tmp_path).values():
        items = json.loads(sample["json"])["items"]
        names = [x["image"] for x in items if "image" in x]
        assert 1 <= len(names) <= 2 and all(n in sample for n in names)


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert lcl(["prepare", "mmc4", "--docs", str(tmp_path / "*.jsonl"), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no MMC4 docs files" in capsys.readouterr().err


def test_loader_reads_prepared_shards(clean):
    out, _ = clean
    loader = build_train_loader(DataConfig(path=[str(out)], shuffle_buffer=8), image_size=16, num_image_tokens=4,
                                context_length=256, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0)
    it = iter(loader)
    for _ in range(10):
        batch = next(it)
        assert int((batch["input_ids"] == SOI_ID).sum()) == batch["images"].shape[0] > 0
    assert loader.stats["samples"] == 40 and loader.stats["images_corrupt"] == 0


def test_prepared_shards_train(clean, tmp_path):
    out, _ = clean
    run_lcl(["train", "--config", "configs/demo.yaml", f"data.path={out}", "data.heldout=", "train.steps=2",
             "train.micro_batch_size=2", "model.text.context_length=256", "logging.every=1", "logging.progress=false",
             "logging.tensorboard=false", f"run.dir={tmp_path / 'run'}"], timeout=300)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
