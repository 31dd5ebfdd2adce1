"""Zero-shot, retrieval, evaluation during training, `lcl data sample`, and train.samples, end to end
on the embedded corpus and on sets laid out as users keep them (image folders, shards, captions.tsv)."""

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lcl_megatron.data.shards import read_shard, write_shard
from tests.support.launch import read_metrics, run_lcl, with_overrides
from tests.support.configs import TINY

BASE = [t for t in TINY if not t.startswith(("train.steps", "data.split"))]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def heldout_samples(limit=40):
    from lcl_megatron.data.embedded import HELDOUT_SHARD, ensure_corpus

    return list(read_shard(ensure_corpus("digits") / HELDOUT_SHARD))[:limit]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The same 40 held-out digits as an image folder, as shards with a class-names file, and as
    captioned sets (captions.tsv and shards of png + txt with two captions per image)."""
    root = tmp_path_factory.mktemp("sets")
    samples = heldout_samples()
    folder, shards, tsv, txt_shards = root / "folder", root / "shards", root / "tsv", root / "txt_shards"
    for d in (shards, tsv, txt_shards):
        d.mkdir()
    lines = []
    for s in samples:
        label = int(s["cls"].decode())
        (folder / f"{label}_{DIGITS[label]}").mkdir(parents=True, exist_ok=True)
        (folder / f"{label}_{DIGITS[label]}" / f"{s['__key__']}.png").write_bytes(s["png"])
        (tsv / f"{s['__key__']}.png").write_bytes(s["png"])
        lines += [f"{s['__key__']}.png\ta handwritten {DIGITS[label]}", f"{s['__key__']}.png\tthe digit {label}"]
    write_shard(shards / "val-00000.tar", ((s["__key__"], {"png": s["png"], "cls": s["cls"]}) for s in samples))
    (shards / "classnames.txt").write_text("\n".join(DIGITS) + "\n")
    (tsv / "captions.tsv").write_text("\n".join(lines) + "\n")
    write_shard(txt_shards / "pairs-00000.tar", (
        (s["__key__"], {"png": s["png"], "txt": f"a handwritten {DIGITS[int(s['cls'])]}\nthe digit {int(s['cls'])}".encode()})
        for s in samples))
    (folder / "classnames.json").write_text(json.dumps(DIGITS))
    return {"folder": folder, "shards": shards, "tsv": tsv, "txt_shards": txt_shards}


@pytest.fixture(scope="module")
def run(tmp_path_factory, sets):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    run_lcl(["train", "--config", "configs/demo.yaml",
             *with_overrides(BASE, "train.samples=10", "train.micro_batch_size=4", "eval.every=3",
                             f"eval.zeroshot=[embedded:digits, {sets['folder']}]", "eval.retrieval=[embedded:digits]",
                             "eval.batch_size=16"), f"run.dir={run_dir}"])
    return run_dir


def last_json(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_samples_set_the_steps_and_eval_every_logs(run):
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]  # ceil(10 samples / 4 per step)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if "zeroshot/embedded_digits/top1" in line]
    assert len(evals) == 1 and evals[0]["step"] == 3
    record = evals[0]
    assert record["zeroshot/embedded_digits/samples"] > 100
    assert 0 <= record["retrieval/embedded_digits/text_to_image_R@10"] <= 1
    folder_keys = [k for k in record if k.startswith("zeroshot/") and "folder" in k]
    assert {k.rsplit("/", 1)[1] for k in folder_keys} == {"top1", "top5", "samples"}


def test_zeroshot_classifier_is_the_references_template_average(run):
    """OpenCLIP's build_zero_shot_classifier: per class, encode every template's text, L2-normalise,
    average, L2-normalise again; here each text goes through the model alone."""
    from lcl_megatron.eval.model_from_checkpoint import load_for_eval
    from lcl_megatron.eval.zeroshot import zeroshot_classifier
    from lcl_megatron.model.lcl import zeroshot_text_ids
    from lcl_megatron.tokenizer import get_tokenizer

    cfg, model = load_for_eval(run / "checkpoints" / "step_00000003")
    templates = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]
    ours = zeroshot_classifier(model, DIGITS[:4], templates)
    rows = []
    with torch.no_grad():
        for name in DIGITS[:4]:
            feats = torch.cat([model.text_features(zeroshot_text_ids(get_tokenizer()([t.format(name)]),
                                                                     cfg.model.text.context_length))
                               for t in templates])
            feats = F.normalize(feats, dim=-1).mean(dim=0)
            rows.append(feats / feats.norm())
    torch.testing.assert_close(ours, torch.stack(rows), rtol=1e-5, atol=1e-6)


def test_builtin_imagenet_names_and_templates():
    from lcl_megatron.eval.datasets import BUILTIN_CLASSNAMES, BUILTIN_TEMPLATES, read_string_list

    names = read_string_list("imagenet", BUILTIN_CLASSNAMES, "class names")
    templates = read_string_list("openai_imagenet", BUILTIN_TEMPLATES, "templates")
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}." and all(t.count("{}") == 1 for t in templates)


def test_zeroshot_cli_same_on_image_folder_and_shards(run, sets):
    ckpt = str(run / "checkpoints" / "step_00000003")
    on_folder = last_json(run_lcl(["eval", "zeroshot", "--checkpoint", ckpt, "--data", str(sets["folder"]),
                                   "--batch-size", "7"]))
    on_shards = last_json(run_lcl(["eval", "zeroshot", "--checkpoint", ckpt, "--data", str(sets["shards"])]))
    assert on_folder["samples"] == on_shards["samples"] == 40
    assert on_folder["templates"] == on_shards["templates"] == 80  # OpenAI's, the default for directories
    for key in ("top1", "top5"):
        assert on_folder[key] == pytest.approx(on_shards[key])
    (sets["shards"] / "classnames.txt").rename(sets["shards"] / "names.txt")
    try:
        proc = run_lcl(["eval", "zeroshot", "--checkpoint", ckpt, "--data", str(sets["shards"])], check=False)
        assert proc.returncode == 2 and "--classnames" in proc.stderr and "Traceback" not in proc.stderr
        ok = last_json(run_lcl(["eval", "zeroshot", "--checkpoint", ckpt, "--data", str(sets["shards"]),
                                "--classnames", str(sets["shards"] / "names.txt"), "--templates", "openai_imagenet"]))
        assert ok["top1"] == pytest.approx(on_shards["top1"])
    finally:
        (sets["shards"] / "names.txt").rename(sets["shards"] / "classnames.txt")


def test_recall_counts_any_of_several_captions():
    from lcl_megatron.eval.retrieval import _recalls

    # 3 images; image 0 has captions 0 and 1, image 1 caption 2, image 2 caption 3.
    images = torch.eye(4)[:3]
    texts = torch.tensor([[0.0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0.5, 0.5]])
    got = _recalls(images, texts, [[0, 1], [2], [3]])
    # image 0 ranks its second caption (1) first: a hit; image 1 ranks caption 2 first: a hit;
    # image 2 ranks caption 0 (image 0's) above its own caption 3: a miss at 1, a hit at 5.
    assert got[1] == pytest.approx(2 / 3) and got[5] == got[10] == pytest.approx(1.0)
    t2i = _recalls(texts, images, [[0], [0], [1], [2]])
    # caption 0 ranks image 2 first: its only miss
    assert t2i[1] == pytest.approx(3 / 4) and t2i[5] == pytest.approx(1.0)


def test_retrieval_cli_same_on_captions_file_and_shards(run, sets):
    ckpt = str(run / "checkpoints" / "step_00000003")
    on_tsv = last_json(run_lcl(["eval", "retrieval", "--checkpoint", ckpt, "--data", str(sets["tsv"])]))
    on_shards = last_json(run_lcl(["eval", "retrieval", "--checkpoint", ckpt, "--data", str(sets["txt_shards"])]))
    assert on_tsv["images"] == 40 and on_tsv["captions"] == 20  # 10 classes x 2 distinct captions
    for k in (1, 5, 10):
        for way in ("image_to_text", "text_to_image"):
            assert on_tsv[f"{way}_R@{k}"] == pytest.approx(on_shards[f"{way}_R@{k}"])
    assert on_tsv["image_to_text_R@10"] >= on_tsv["image_to_text_R@5"] >= on_tsv["image_to_text_R@1"]
    proc = run_lcl(["eval", "retrieval", "--checkpoint", ckpt, "--data", str(sets["folder"])], check=False)
    assert proc.returncode == 2 and "captions.tsv" in proc.stderr and "Traceback" not in proc.stderr


def test_data_sample_writes_the_steps_batch_for_eval_loss(run, tmp_path):
    from lcl_megatron.config import load_config
    from lcl_megatron.data.global_batch import build_loader

    overrides = with_overrides(BASE, "train.micro_batch_size=4", "train.grad_accumulation=2")
    out, png = tmp_path / "b.pt", tmp_path / "b.png"
    result = last_json(run_lcl(["data", "sample", "--config", "configs/demo.yaml", "--step", "2", "--out", str(out),
                                "--png", str(png), *overrides]))
    batch = torch.load(out, weights_only=True)
    assert result["rows"] == 8 and batch["input_ids"].shape[0] == 8 and result["images"] == batch["images"].shape[0]
    batches = iter(build_loader(load_config("configs/demo.yaml", overrides), 0, 1))
    micro = [next(batches) for _ in range(4)][2:]  # step 2 = micro-batches 3 and 4
    assert torch.equal(batch["input_ids"], torch.cat([m["input_ids"] for m in micro]))
    assert torch.equal(batch["images"], torch.cat([m["images"] for m in micro]))
    from PIL import Image

    assert Image.open(io.BytesIO(png.read_bytes())).size[0] > 0
    losses = json.loads(run_lcl(["eval", "loss", "--checkpoint", str(run), "--batch", str(out)]).stdout.splitlines()[-1])
    assert math.isfinite(losses["loss"])
    again = run_lcl(["data", "sample", "--config", "configs/demo.yaml", "--out", str(out), *overrides], check=False)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def test_plan_prints_samples_seen():
    proc = run_lcl(["plan", "--config", "configs/lcl_vit_b32_laion.yaml", "--nodes", "16"])
    assert "390,625 steps x 32,768 samples/step = 12,800,000,000 samples seen" in proc.stdout


def test_eval_every_without_a_set_is_refused(tmp_path):
    proc = run_lcl(["train", "--config", "configs/demo.yaml", "eval.every=10", f"run.dir={tmp_path}"], check=False)
    assert proc.returncode == 2 and "eval.every" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("layout", [["parallel.zero_stage=3"], ["parallel.pp=2"]], ids=["zero3", "pp2"])
def test_eval_every_under_partitioned_layouts_sees_the_whole_model(tmp_path, layout):
    """ZeRO-3 partitions and pipeline stages hold parts of the model: the evaluation during training
    must score the same weights that `lcl eval` reads back from the step's consolidated checkpoint."""
    run_dir = tmp_path / "run"
    run_lcl(["train", "--config", "configs/demo.yaml",
             *with_overrides(BASE, "train.steps=2", "train.micro_batch_size=4", "checkpoint.every=2", "eval.every=2",
                             "eval.zeroshot=[embedded:digits]", "eval.retrieval=[embedded:digits]", *layout),
             f"run.dir={run_dir}"], nproc=2)
    during = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                  if "zeroshot/embedded_digits/top1" in line)
    ckpt = str(run_dir / "checkpoints" / "step_00000002")
    after = last_json(run_lcl(["eval", "zeroshot", "--checkpoint", ckpt, "--data", "embedded:digits"]))
    assert during["zeroshot/embedded_digits/top1"] == pytest.approx(after["top1"], abs=1 / 359)
    assert during["zeroshot/embedded_digits/top5"] == pytest.approx(after["top5"], abs=1 / 359)
    retrieval = last_json(run_lcl(["eval", "retrieval", "--checkpoint", ckpt, "--data", "embedded:digits"]))
    assert during["retrieval/embedded_digits/image_to_text_R@5"] == pytest.approx(retrieval["image_to_text_R@5"],
                                                                                  abs=1 / 359)
