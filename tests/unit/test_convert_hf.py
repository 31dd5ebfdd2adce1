"""`lcl convert to-hf`: the export loads in transformers and computes our ViT's patch features."""

import json

import pytest
import torch

from transformers import CLIPImageProcessor, CLIPVisionModel

from lcl_megatron.config import ModelConfig, TextConfig, VisionConfig
from lcl_megatron.data.images import preprocess_image
from lcl_megatron.eval.model_from_checkpoint import load_for_eval
from tests.support.checkpoints import demo_model_config, images_for, load_export_module, random_checkpoint
from tests.support.cli import run_cli


def b16_model_config() -> ModelConfig:
    """ViT-B/16 exactly (224 px, patch 16, width 768, 12 layers, 12 heads); a small LM beside it."""
    return ModelConfig(embed_dim=64, vision=VisionConfig(image_size=224, patch_size=16, width=768, layers=12,
                                                         head_width=64),
                       text=TextConfig(context_length=200, width=64, heads=2, layers=1), pool_heads=4)


@pytest.mark.parametrize("which", ["demo", "vit_b16"])
def test_transformers_computes_our_patch_features(capsys, tmp_path, which):
    model_cfg = demo_model_config() if which == "demo" else b16_model_config()
    ckpt = random_checkpoint(model_cfg, tmp_path / "ckpt")
    code, _, err = run_cli(capsys, "convert", "to-hf", "--checkpoint", ckpt, "--out", tmp_path / "hf")
    assert code == 0, err
    hfdir = tmp_path / "hf"

    processor = CLIPImageProcessor.from_pretrained(hfdir)
    vit = CLIPVisionModel.from_pretrained(hfdir).eval()
    size = model_cfg.vision.image_size
    pil = images_for(size)
    pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, size, size)
    # The processor's preprocessing is ours (OpenCLIP's eval transform).
    ours = torch.stack([preprocess_image(image, size) for image in pil])
    torch.testing.assert_close(pixels, ours, atol=1e-5, rtol=0)

    _, model = load_for_eval(ckpt)
    loader = load_export_module(hfdir)
    with torch.no_grad():
        expected = model.visual(pixels)
        got = loader.patch_features(vit, pixels)
        # LLaVA-style towers read hidden states straight from the model: the same blocks' outputs.
        assert vit(pixel_values=pixels, output_hidden_states=True).hidden_states[-1].shape[1] == expected.shape[1] + 1
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        pool = loader.AttentivePoolProject.from_pretrained(hfdir)
        for theirs, ours_out in zip(pool(got), model.pool_project(expected)):
            torch.testing.assert_close(theirs, ours_out, atol=1e-5, rtol=0)

    card = (hfdir / "README.md").read_text()
    assert "embedded:digits" in card and "1234" in card and f"width: {model_cfg.vision.width}" in card
    config = json.loads((hfdir / "config.json").read_text())
    assert config["hidden_act"] == "gelu" and config["layer_norm_eps"] == 1e-5


def test_refuses_checkpoints_that_do_not_check_out(capsys, tmp_path):
    ckpt = random_checkpoint(demo_model_config(), tmp_path / "ckpt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("an earlier export")

    # A config that does not match the tensors (the manifest is rewritten so only the config is wrong).
    config = (ckpt / "config.yaml").read_text()
    (ckpt / "config.yaml").write_text(config.replace("layers: 3", "layers: 4", 1))
    from lcl_megatron.checkpoint.format import read_manifest, write_manifest

    write_manifest(ckpt, {k: v for k, v in read_manifest(ckpt).items() if k != "files"})
    # --force, so that the checkpoint is what gets refused, not the folder of another export.
    code, _, err = run_cli(capsys, "convert", "to-hf", "--checkpoint", ckpt, "--out", tmp_path / "hf", "--force")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "visual.layers.3" in err, err
    (ckpt / "config.yaml").write_text(config)  # now its checksum no longer matches COMPLETE
    code, _, err = run_cli(capsys, "convert", "to-hf", "--checkpoint", ckpt, "--out", tmp_path / "hf", "--force")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "config.yaml" in err and "SHA-256" in err, err
    # A failed export leaves what was there.
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]
