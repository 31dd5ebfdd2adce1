"""Reference (OpenCLIP-format) checkpoints in and out: `lcl convert from-openclip` / `to-openclip`.

Random weights saved by the plain-torch oracle of the reference go through
`from-openclip`, then `lcl eval loss` must give the oracle's two losses; the
way back must give the very same tensors.
"""

import json
import pickle

import pytest
import torch

from lcl_megatron.checkpoint.consolidated import check_tensors
from lcl_megatron.convert.openclip import from_openclip_state_dict, model_config_from_openclip
from lcl_megatron.data.sequences import image_run as sequence_image_run
from lcl_megatron.model.build import expected_tensor_shapes
from lcl_megatron.tokens import EOT_ID, PAD_ID, SOI_ID, SOT_ID
from tests.support.cli import run_cli
from tests.support.paths import LAYOUTS_JSON
from tests.support.reference_lcl import SMALL_MODEL_CONFIG, SMALL_MODEL_PATCHES, ReferenceLCL, reference_losses


def image_run() -> list[int]:
    return sequence_image_run(SMALL_MODEL_PATCHES)


def reference_batch() -> dict:
    """Reference layout, right-padded with 0, no real id 0 token: an image at position 0
    (no contrastive pair), image-after-caption and caption-after-image pairs, a two-image row."""
    rows = [
        image_run() + [320, 1929, 2368, EOT_ID],
        [SOT_ID, 320, 2368, 539, 1237] + image_run(),
        [SOT_ID, 1237, 3306] + image_run() + [539, 4, 2368] + image_run() + [1929, EOT_ID],
        [SOT_ID, 7, 8] + image_run(),
    ]
    length = max(map(len, rows))
    ids = torch.tensor([row + [PAD_ID] * (length - len(row)) for row in rows])
    n_images = int((ids == SOI_ID).sum())
    return {"images": torch.randn(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(1)), "input_ids": ids}


@pytest.fixture(scope="module")
def oracle():
    """The reference model with every tensor randomised (so layout mistakes cannot hide behind
    ones, zeros or symmetric initialisation)."""
    torch.manual_seed(0)
    model = ReferenceLCL(SMALL_MODEL_CONFIG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(2.7)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory, oracle):
    root = tmp_path_factory.mktemp("openclip")
    (root / "model.json").write_text(json.dumps(SMALL_MODEL_CONFIG))
    sd = {k: v.clone() for k, v in oracle.state_dict().items()}
    torch.save(sd, root / "bare.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, root / "wrapped.pt")
    torch.save({"state_dict": sd}, root / "nested.pt")
    torch.save(reference_batch(), root / "batch.pt")
    return root


def convert(capsys, files, checkpoint, out):
    code, _, err = run_cli(capsys, "convert", "from-openclip", "--checkpoint", files / checkpoint,
                           "--model-config", files / "model.json", "--out", out)
    assert code == 0, err
    return out


@pytest.mark.parametrize("checkpoint", ["bare.pt", "wrapped.pt", "nested.pt"])
def test_losses_after_import_equal_reference(capsys, files, oracle, tmp_path, checkpoint):
    out = convert(capsys, files, checkpoint, tmp_path / "ckpt")
    code, stdout, err = run_cli(capsys, "eval", "loss", "--checkpoint", out, "--batch", files / "batch.pt")
    assert code == 0, err
    ours = json.loads(stdout.strip().splitlines()[-1])
    batch = torch.load(files / "batch.pt", weights_only=True)
    with torch.no_grad():
        expected = reference_losses(oracle(batch["images"], batch["input_ids"]))
    # Both terms are non-trivial: 3 contrastive pairs (the row-0 image has no context) and many targets.
    assert expected["contrastive_loss"].item() > 0.1
    for key in ("contrastive_loss", "generation_loss", "loss"):
        assert ours[key] == pytest.approx(expected[key].item(), rel=1e-4), key


def test_round_trip_is_bit_exact(capsys, files, oracle, tmp_path):
    ckpt = convert(capsys, files, "wrapped.pt", tmp_path / "ckpt")
    code, _, err = run_cli(capsys, "convert", "to-openclip", "--checkpoint", ckpt, "--out", tmp_path / "back.pt",
                           "--model-config-out", tmp_path / "back.json")
    assert code == 0, err
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    original = oracle.state_dict()
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key
    # The written model config builds the same reference model and loads the tensors strictly.
    with torch.device("meta"):
        rebuilt = ReferenceLCL(json.loads((tmp_path / "back.json").read_text()))
    rebuilt.load_state_dict(back, strict=True, assign=True)


@pytest.mark.parametrize("name", sorted(json.loads(LAYOUTS_JSON.read_text())))
def test_reference_layouts_map_onto_our_model(name):
    """Every tensor of the reference's real configs has a place of the right shape in ours."""
    layout = json.loads(LAYOUTS_JSON.read_text())[name]
    cfg = model_config_from_openclip(layout["model_config"])
    given = {k: torch.empty(v, device="meta") for k, v in layout["state_dict"].items()}
    check_tensors(expected_tensor_shapes(cfg), from_openclip_state_dict(given, cfg))


def _one_line_exit_2(code, err, *needles):
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_missing_and_unexpected_tensors_exit_2(capsys, files, oracle, tmp_path):
    sd = dict(oracle.state_dict())
    del sd["visual.ln_post.bias"]
    sd["visual.extra"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pt")
    code, _, err = run_cli(capsys, "convert", "from-openclip", "--checkpoint", tmp_path / "bad.pt",
                           "--model-config", files / "model.json", "--out", tmp_path / "out")
    _one_line_exit_2(code, err, "visual.extra")
    del sd["visual.extra"]
    torch.save(sd, tmp_path / "bad.pt")
    code, _, err = run_cli(capsys, "convert", "from-openclip", "--checkpoint", tmp_path / "bad.pt",
                           "--model-config", files / "model.json", "--out", tmp_path / "out")
    _one_line_exit_2(code, err, "missing", "visual.ln_post.bias")
    assert not (tmp_path / "out").exists()


def test_config_that_does_not_match_tensors_exits_2(capsys, files, tmp_path):
    wrong = json.loads(json.dumps(SMALL_MODEL_CONFIG))
    wrong["text_cfg"]["context_length"] = 64
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    code, _, err = run_cli(capsys, "convert", "from-openclip", "--checkpoint", files / "bare.pt",
                           "--model-config", tmp_path / "wrong.json", "--out", tmp_path / "out")
    _one_line_exit_2(code, err, "wrong shape", "text.embedding.positional_embedding")
    assert not (tmp_path / "out").exists()


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_that_runs_code_is_refused(capsys, files, tmp_path, protocol):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": {"visual.conv1.weight": _RunsCode(marker)}}, f, protocol=protocol)
    code, _, err = run_cli(capsys, "convert", "from-openclip", "--checkpoint", tmp_path / "evil.pt",
                           "--model-config", files / "model.json", "--out", tmp_path / "out")
    _one_line_exit_2(code, err, "evil.pt")
    assert not marker.exists()


def test_truncated_and_absent_files_exit_2(capsys, files, tmp_path):
    data = (files / "bare.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    for checkpoint in (tmp_path / "cut.pt", tmp_path / "absent.pt"):
        code, _, err = run_cli(capsys, "convert", "from-openclip", "--checkpoint", checkpoint,
                               "--model-config", files / "model.json", "--out", tmp_path / "out")
        _one_line_exit_2(code, err, checkpoint.name)
    code, _, err = run_cli(capsys, "convert", "to-openclip", "--checkpoint", tmp_path / "absent",
                           "--out", tmp_path / "x.pt")
    _one_line_exit_2(code, err)
