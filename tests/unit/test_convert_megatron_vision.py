"""`lcl convert to-megatron-vision`: megatron-core's own CLIPViTModel loads the export and computes our features.

The model is built as Megatron-LM's multimodal example builds its vision
encoder: `CLIPViTModel(model_subtype="clip")` from megatron-core's ViT layer
spec, its weights loaded strictly from the checkpoint file the export wrote.
"""

import json

import pytest
import torch
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.vit_layer_specs import LNImpl, get_vit_layer_with_local_spec
from megatron.core.transformer.enums import AttnMaskType
from safetensors.torch import load_file

from lcl_megatron.eval.model_from_checkpoint import load_for_eval
from lcl_megatron.model.core_attention import CoreAttention
from lcl_megatron.model.layers import transformer_config
from tests.support.checkpoints import demo_model_config, random_checkpoint
from tests.support.cli import run_cli


def megatron_clip_vit(settings: dict, monkeypatch) -> CLIPViTModel:
    tc = settings["TransformerConfig"]
    assert tc["activation_func"] == "gelu" and tc["normalization"] == "LayerNorm"
    config = transformer_config(width=tc["hidden_size"], heads=tc["num_attention_heads"], layers=tc["num_layers"],
                                ffn_hidden_size=tc["ffn_hidden_size"], arch="clip")
    spec = get_vit_layer_with_local_spec()
    # The local spec marks attention causal; the TE spec Megatron-LM's example trains with (and a ViT) has none.
    spec.submodules.self_attention.params["attn_mask_type"] = getattr(AttnMaskType, settings["attn_mask_type"])
    if not torch.cuda.is_available():  # megatron's DotProductAttention allocates CUDA buffers: SDPA on CPU
        spec.submodules.self_attention.submodules.core_attention = CoreAttention
    # CLIPViTModel puts its position ids on the GPU at construction; this CPU-only torch keeps them here.
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    return CLIPViTModel(config, spec, ln_pre_impl=LNImpl, **settings["CLIPViTModel"]).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The demo ViT (4 heads, so it splits over 2 tensor-parallel ranks), every tensor random."""
    return random_checkpoint(demo_model_config(), tmp_path_factory.mktemp("megatron") / "ckpt")


def test_megatron_core_clip_vit_loads_the_export_and_computes_our_features(capsys, tmp_path, monkeypatch, ckpt):
    out = tmp_path / "megatron"
    code, _, err = run_cli(capsys, "convert", "to-megatron-vision", "--checkpoint", ckpt, "--out", out)
    assert code == 0, err
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    record = json.loads((out / "lcl_export.json").read_text())
    vit = megatron_clip_vit(record["megatron_core"], monkeypatch)
    shard = torch.load(out / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    expected = {k for k, v in vit.state_dict().items() if not k.endswith("_extra_state")}
    assert set(shard["model"]) == expected
    vit.load_state_dict(shard["model"], strict=False)  # strict on every tensor (checked above); _extra_state is None

    _, model = load_for_eval(ckpt)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    last_layer = []
    hook = model.visual.ln_post.register_forward_pre_hook(lambda _, args: last_layer.append(args[0]))
    with torch.no_grad():
        ours = model.visual(images)
        theirs = vit(images)
        hook.remove()
        # Megatron's CLIP reads the last layer without a final LayerNorm: the same tensor as ours before ln_post.
        torch.testing.assert_close(theirs, last_layer[0], atol=1e-5, rtol=0)
        # With the exported ln_post set on it, its patch tokens are LCL's image features.
        ln_post = torch.nn.LayerNorm(vit.visual_hidden_size, eps=1e-5)
        ln_post.load_state_dict(load_file(str(out / "lcl_ln_post.safetensors")))
        vit.ln_post = ln_post
        torch.testing.assert_close(vit(images)[:, 1:], ours, atol=1e-5, rtol=0)


def test_tensor_parallel_shards_are_the_whole_split_as_megatron_splits_it(capsys, tmp_path, ckpt):
    for tp in (1, 2):
        code, _, err = run_cli(capsys, "convert", "to-megatron-vision", "--checkpoint", ckpt, "--out", tmp_path / f"tp{tp}",
                               "--tensor-parallel-size", tp)
        assert code == 0, err
    load = lambda tp, rank: torch.load(tmp_path / f"tp{tp}" / "iter_0000001" / f"mp_rank_{rank:02d}" /
                                       "model_optim_rng.pt", weights_only=True)["model"]
    whole, shards = load(1, 0), [load(2, 0), load(2, 1)]
    split = {"linear_qkv.weight": 0, "linear_qkv.bias": 0, "linear_fc1.weight": 0, "linear_fc1.bias": 0,
             "linear_proj.weight": 1, "linear_fc2.weight": 1}
    for name, t in whole.items():
        dim = next((d for s, d in split.items() if name.endswith(s)), None)
        if dim is None:
            assert all(torch.equal(s[name], t) for s in shards), name
        else:
            assert shards[0][name].shape[dim] * 2 == t.shape[dim]
            torch.testing.assert_close(torch.cat([s[name] for s in shards], dim=dim), t, atol=0, rtol=0)
    code, _, err = run_cli(capsys, "convert", "to-megatron-vision", "--checkpoint", ckpt, "--out", tmp_path / "tp3",
                           "--tensor-parallel-size", 3)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "heads" in err
