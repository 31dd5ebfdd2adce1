"""The exported vision tower drives a LLaVA model end to end, with LCL's own features.

A short real run is exported with `lcl convert to-hf`; transformers'
`LlavaForConditionalGeneration` is built from the export and a tiny random
language model, and `generate` runs on an image and a prompt. What reaches
the projector must be the image features LCL trained (last layer, after the
final LayerNorm, class token dropped) under the settings the model card gives,
and the pool-project of it LCL's image latent.
"""

import json

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from lcl_megatron.convert.feature_selection import CONSUMERS
from lcl_megatron.eval.model_from_checkpoint import load_for_eval
from tests.support.paths import REPO
from tests.support.checkpoints import images_for, load_export_module
from tests.support.configs import CHECKPOINTS
from tests.support.cli import run_cli

STEPS = 2


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A 2-step run of the tiny model with a zero-shot evaluation at the end, and its export."""
    from lcl_megatron import cli

    root = tmp_path_factory.mktemp("llava")
    run = root / "run"
    overrides = [o for o in CHECKPOINTS if not o.startswith(("data.heldout", "train.steps", "checkpoint.every"))]
    argv = ["train", "--config", REPO / "configs" / "demo.yaml", *overrides, f"train.steps={STEPS}",
            f"checkpoint.every={STEPS}", f"run.dir={run}"]
    assert cli.main(list(map(str, argv))) == 0
    assert cli.main(["convert", "to-hf", "--checkpoint", str(run), "--out", str(root / "hf"),
                     "--license", "apache-2.0"]) == 0
    return run, root / "hf"


def tiny_llava(vision_config, n_patches: int, **select) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    config = LlavaConfig(vision_config=vision_config, text_config=text, image_token_index=99,
                         image_seq_length=n_patches, **select)
    return LlavaForConditionalGeneration(config).eval()


def features_reaching_the_projector(llava, pixels: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Run `generate` on the images and a prompt; return what the projector was given."""
    seen = []
    hook = llava.model.multi_modal_projector.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    prompt = [1] + [99] * n_patches + [5, 17, 42]  # <s> <image>*P "describe this"
    ids = torch.tensor([prompt] * pixels.shape[0])
    try:
        out = llava.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert out.shape == (pixels.shape[0], len(prompt) + 3)
    assert len(seen) == 1  # the image is encoded once, at prefill
    return seen[0]


def test_llava_projector_receives_lcl_image_features(export):
    run, hfdir = export
    record = json.loads((hfdir / "lcl_export.json").read_text())
    settings = record["feature_selection"]["consumers"]["transformers_llava"]["settings"]
    assert settings == CONSUMERS["transformers_llava"]["settings"]
    _, model = load_for_eval(run)
    n_patches = model.cfg.vision.num_patches
    processor = CLIPImageProcessor.from_pretrained(hfdir)
    pixels = processor(images=images_for(model.cfg.vision.image_size), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = model.visual(pixels)  # LCL's image features: last layer, ln_post, no class token
        latent, _ = model.pool_project(ours)

    tower = load_export_module(hfdir, "lcl_vision_tower.py")
    llava = tiny_llava(tower.llava_vision_config(hfdir), n_patches, **settings)
    tower.load_vision_tower(llava, hfdir)
    with torch.no_grad():
        got = features_reaching_the_projector(llava, pixels, n_patches)
        torch.testing.assert_close(got, ours, atol=1e-5, rtol=0)
        # One vector per image: the pool-project of what the projector receives is LCL's latent.
        pool = load_export_module(hfdir).AttentivePoolProject.from_pretrained(hfdir)
        torch.testing.assert_close(pool(got)[0], latent, atol=1e-5, rtol=0)

    # The stock CLIPVisionModel under the same settings gives the same layer's tokens, but before the
    # final LayerNorm: the gap the card names, and why the variant exists.
    stock = tiny_llava(CLIPVisionModel.from_pretrained(hfdir).config, n_patches, **settings)
    tower.load_vision_tower(stock, hfdir)
    with torch.no_grad():
        raw = features_reaching_the_projector(stock, pixels, n_patches)
        assert (raw - ours).abs().max() > 0.1
        torch.testing.assert_close(stock.model.vision_tower.vision_model.post_layernorm(raw), ours,
                                   atol=1e-5, rtol=0)


def test_card_and_record_read_the_run(export, tmp_path):
    run, hfdir = export
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    top1 = [r["zeroshot_top1"] for r in evals if "zeroshot_top1" in r]
    assert top1, "the run logged no evaluation"
    record = json.loads((hfdir / "lcl_export.json").read_text())
    facts = record["training"]
    batch = dict(o.split("=", 1) for o in CHECKPOINTS)["train.micro_batch_size"]
    assert facts["steps"] == STEPS and facts["samples_seen"] == STEPS * int(batch)
    assert facts["evaluation"]["zeroshot_top1"]["value"] == top1[-1]
    assert facts["data"] == ["embedded:digits"] and record["license"] == "apache-2.0"
    card = (hfdir / "README.md").read_text()
    assert "license: apache-2.0" in card and f"**Samples seen:** {STEPS * int(batch)}" in card
    assert f"zeroshot_top1 = {top1[-1]:.4g}" in card and "vision_feature_layer=-1" in card
    assert "mm_vision_select_layer=-1" in card and "Megatron-LM" in card
    # The published layout: what from_pretrained reads, the loaders, nothing else but the marker.
    assert {p.name for p in hfdir.iterdir()} == {
        "config.json", "model.safetensors", "preprocessor_config.json", "lcl_pool_project.safetensors",
        "lcl_pool_project.json", "lcl_pool_project.py", "lcl_vision_tower.py", "lcl_export.json", "README.md",
        ".lcl-convert.json"}
    # The names save_pretrained itself writes, so the folder uploads as transformers would publish it.
    CLIPVisionModel.from_pretrained(hfdir).save_pretrained(tmp_path / "saved")
    CLIPImageProcessor.from_pretrained(hfdir).save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} <= {p.name for p in hfdir.iterdir()}


def test_push_to_hub_offline_says_what_to_run_later(capsys, export, tmp_path, monkeypatch):
    run, _ = export
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and no test ever reaches the network
    code, out, err = run_cli(capsys, "convert", "to-hf", "--checkpoint", run, "--out", tmp_path / "hf",
                             "--push-to-hub", "someone/lcl-vit")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-1].startswith("not pushed (HF_HUB_OFFLINE is set)")
    assert f"huggingface-cli upload someone/lcl-vit {tmp_path / 'hf'} ." in lines[-1]
