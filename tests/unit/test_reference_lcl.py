"""The plain-torch reference oracle: layouts of the reference configs and hand-checkable behaviour."""

import json
import math

import pytest
import torch

from lcl_megatron.data.sequences import image_run as sequence_image_run
from lcl_megatron.tokens import EOT_ID, PAD_ID, SOI_ID, SOT_ID, VOCAB_SIZE
from tests.support.paths import LAYOUTS_JSON
from tests.support.reference_lcl import SMALL_MODEL_CONFIG, SMALL_MODEL_PATCHES, ReferenceLCL, contrastive_loss, reference_losses

LAYOUTS = json.loads(LAYOUTS_JSON.read_text())


def image_run() -> list[int]:
    return sequence_image_run(SMALL_MODEL_PATCHES)


def padded(rows: list[list[int]]) -> torch.Tensor:
    length = max(map(len, rows))
    return torch.tensor([row + [PAD_ID] * (length - len(row)) for row in rows])


# Image first (no context: no contrastive pair), text first, and text-image-text.
ROWS = [
    image_run() + [320, 1929, EOT_ID],
    [SOT_ID, 320, 2368, 539] + image_run(),
    [SOT_ID, 1237] + image_run() + [3306, EOT_ID],
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ReferenceLCL(SMALL_MODEL_CONFIG).eval()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_state_dict_layout_equals_reference(name):
    with torch.device("meta"):
        model = ReferenceLCL(LAYOUTS[name]["model_config"])
    ours = [(key, list(t.shape)) for key, t in model.state_dict().items()]
    assert ours == list(LAYOUTS[name]["state_dict"].items())
    assert sum(p.numel() for p in model.parameters()) == LAYOUTS[name]["num_parameters"]


def test_omitted_keys_take_openclip_defaults():
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "layers": 1, "width": 128},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
              "pool_project_cfg": {"input_dim": 128, "output_dim": 16, "attn_num_heads": 2}}
    with torch.device("meta"):
        model = ReferenceLCL(config)
    block = model.visual.transformer.resblocks[0]
    assert block.attn.num_heads == 2  # width 128 / head_width 64
    assert block.mlp.c_fc.weight.shape == (512, 128)  # mlp_ratio 4
    assert model.text.transformer.resblocks[0].mlp.c_fc.weight.shape == (64, 16)
    with pytest.raises(ValueError, match="ls_init_value"):
        ReferenceLCL({**config, "vision_cfg": {**config["vision_cfg"], "ls_init_value": 0.1}})


def test_forward_and_loss(tiny):
    ids = padded(ROWS)
    out = tiny(torch.randn(3, 3, 32, 32), ids)
    # Only images whose <start_of_img> is not at position 0 have a context feature.
    assert out["image_features"].shape == out["text_features"].shape == (2, 32)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(2))
    # Targets kept: row 0: 320 1929 eot; row 1: 320 2368 539 soi; row 2: 1237 soi 3306 eot.
    assert out["labels"].tolist() == [320, 1929, EOT_ID, 320, 2368, 539, SOI_ID, 1237, SOI_ID, 3306, EOT_ID]
    assert out["logits"].shape == (11, VOCAB_SIZE)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    losses = reference_losses(out)
    assert all(torch.isfinite(v) for v in losses.values())
    expected = losses["generation_loss"] + 0.1 * losses["contrastive_loss"]
    assert losses["loss"].item() == pytest.approx(expected.item())
    # Untrained: generation near log(vocab), contrastive near log(2).
    assert abs(losses["generation_loss"].item() - math.log(VOCAB_SIZE)) < 1.0


def test_image_tokens_only_affect_later_positions(tiny):
    ids = padded([[SOT_ID, 320, 2368, 539] + image_run() + [1929, EOT_ID]])
    with torch.no_grad():
        first = tiny(torch.randn(1, 3, 32, 32), ids)
        second = tiny(torch.randn(1, 3, 32, 32), ids)
    # Targets 320, 2368, 539, soi are predicted before the image, and the <start_of_img> feature sees none of it.
    assert torch.allclose(first["logits"][:4], second["logits"][:4], atol=1e-6)
    assert torch.allclose(first["text_features"], second["text_features"], atol=1e-6)
    # The first token after the image (1929, predicted at <end_of_img>) depends on the image tokens.
    assert not torch.allclose(first["logits"][4], second["logits"][4], atol=1e-4)
    assert not torch.allclose(first["image_features"], second["image_features"], atol=1e-4)


def test_encode_text_matches_context_feature(tiny):
    caption = [SOT_ID, 320, 2368, 539]
    ids = padded([caption + [EOT_ID]])
    before = ids.clone()
    with torch.no_grad():
        zero_shot = tiny.encode_text(ids)
        in_sequence = tiny(torch.randn(1, 3, 32, 32), padded([caption + image_run()]))["text_features"]
    assert torch.equal(ids, before)
    assert torch.allclose(zero_shot, in_sequence, atol=1e-5)
    # A row cut before its <end_of_text> reads the feature at the last kept position.
    with torch.no_grad():
        cut = tiny.encode_text(padded([[SOT_ID] + [320] * 40 + [EOT_ID]]), context_length=10)
        direct = tiny.encode_text(padded([[SOT_ID] + [320] * 8 + [EOT_ID]]))
    assert torch.allclose(cut, direct, atol=1e-5)


def test_contrastive_loss_by_hand():
    features = torch.nn.functional.normalize(torch.eye(4, 8) + 0.01, dim=-1)
    assert contrastive_loss(features, features, torch.tensor(100.0)).item() < 1e-6
    same = torch.nn.functional.normalize(torch.ones(5, 8), dim=-1)
    assert contrastive_loss(same, same, torch.tensor(10.0)).item() == pytest.approx(math.log(5), rel=1e-5)


def test_generation_loss_by_hand_and_zero_contrastive_weight():
    labels = torch.tensor([3, 1, 2])
    logits = torch.full((3, 5), -30.0).scatter(1, labels[:, None], 30.0)
    out = {"image_features": torch.zeros(0, 4), "text_features": torch.zeros(0, 4),
           "logits": logits, "labels": labels, "logit_scale": torch.tensor(10.0)}
    losses = reference_losses(out, contrastive_weight=0.0)
    assert losses["generation_loss"].item() < 1e-6
    assert losses["contrastive_loss"].item() == 0.0 and losses["loss"].item() < 1e-6
    # The reference's pad id 0 is ignored even as a real label.
    out["labels"] = torch.tensor([3, 0, 2])
    assert reference_losses(out, contrastive_weight=0.0)["generation_loss"].item() < 1e-6
