"""`lcl convert to-hf`: the export loads in transformers and computes our ViT's patch features."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from transformers import CLIPImageProcessor, CLIPVisionModel

from lcl_megatron.config import Config, ModelConfig, TextConfig, VisionConfig, load_config
from lcl_megatron.convert.native import model_tensors
from lcl_megatron.convert.writer import write_checkpoint
from lcl_megatron.data.images import preprocess_image
from lcl_megatron.eval.model_from_checkpoint import load_for_eval
from lcl_megatron.model.build import build_model
from tests.paths import REPO
from tests.test_convert_openclip import run_cli


def demo_model_config() -> ModelConfig:
    return load_config(REPO / "configs" / "demo.yaml").model


def b16_model_config() -> ModelConfig:
    """ViT-B/16 exactly (224 px, patch 16, width 768, 12 layers, 12 heads); a small LM beside it."""
    return ModelConfig(embed_dim=64, vision=VisionConfig(image_size=224, patch_size=16, width=768, layers=12,
                                                         head_width=64),
                       text=TextConfig(context_length=200, width=64, heads=2, layers=1), pool_heads=4)


def random_checkpoint(model_cfg: ModelConfig, out, seed: int = 0):
    """A checkpoint whose every tensor is random (biases and norms too, so no layout error hides)."""
    torch.manual_seed(seed)
    cfg = Config(model=model_cfg)
    cfg.data.path = ["embedded:digits"]
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return write_checkpoint(out, cfg, model_tensors(model.state_dict()), meta={"step": 1234, "source": "test"},
                            written_by="tests: random_checkpoint")


def images_for(size: int) -> list[Image.Image]:
    """Two RGB photos-to-be of other sizes, whose centre crop margins are even (see the model card)."""
    rng = np.random.default_rng(0)
    shapes = [(size * 3 // 2, size * 2), (size * 2, size)]  # (height, width): landscape, portrait
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def load_loader_module(hfdir, name: str = "lcl_pool_project.py"):
    """A module the export ships, imported from the export's own copy."""
    spec = importlib.util.spec_from_file_location(f"{name[:-3]}_{abs(hash(str(hfdir)))}", hfdir / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    loader = load_loader_module(hfdir)
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
    from lcl_megatron.training.checkpoint import read_manifest, write_manifest

    write_manifest(ckpt, {k: v for k, v in read_manifest(ckpt).items() if k != "files"})
    # --force, so that the checkpoint is what gets refused, not the folder of another export.
    code, _, err = run_cli(capsys, "convert", "to-hf", "--checkpoint", ckpt, "--out", tmp_path / "hf", "--force")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "visual.layers.3" in err, err
    (ckpt / "config.yaml").write_text(config)  # now its checksum no longer matches COMPLETE
    code, _, err = run_cli(capsys, "convert", "to-hf", "--checkpoint", ckpt, "--out", tmp_path / "hf", "--force")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "config.yaml" in err and "SHA-256" in err, err
    # A failed export leaves what was there.
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]
