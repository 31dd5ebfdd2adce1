"""The LCL model on megatron-core, in one process: masks, empty batches, recomputation, architectures."""

import pytest
import torch

from lcl_megatron import tokens
from lcl_megatron.model.build import build_model
from lcl_megatron.model.lcl import context_positions, generation_targets
from tests.support.model_inputs import IMAGE, P, batch, tiny

ROWS = [[tokens.SOT_ID, 320, 0, 1125] + IMAGE + [500, tokens.EOT_ID], IMAGE + [700, 800, tokens.EOT_ID]]


def test_targets_and_context_follow_the_reference_rules():
    _, ids, mask = batch(ROWS)
    gen_mask, targets = generation_targets(ids, mask)
    # Row 0: 320, the real "!" (id 0), 1125, <soi>, 500, eot; row 1: 700, 800, eot. Never placeholders or <eoi>.
    assert targets.tolist() == [320, 0, 1125, tokens.SOI_ID, 500, tokens.EOT_ID, 700, 800, tokens.EOT_ID]
    ctx = context_positions(ids, mask)
    assert ctx.sum() == 1 and ctx[0, 4]  # the image at position 0 of row 1 has no context


def test_packed_rows_do_not_predict_across_documents():
    _, ids, mask = batch([[tokens.SOT_ID, 320, tokens.EOT_ID, tokens.SOT_ID, 400] + IMAGE + [tokens.EOT_ID]])
    positions = torch.tensor([[0, 1, 2, 0, 1] + list(range(2, 2 + P + 2)) + [13] + [0] * 23])
    _, targets = generation_targets(ids, mask, positions)
    assert targets.tolist() == [320, tokens.EOT_ID, 400, tokens.SOI_ID, tokens.EOT_ID]
    assert context_positions(ids, mask, positions).sum() == 1


def _grads(model, *args):
    model.zero_grad()
    out = model(*args)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_batch_without_images_gives_zero_vision_gradients():
    torch.manual_seed(0)
    model = build_model(tiny())
    images, ids, mask = batch([[tokens.SOT_ID, 320, 400, tokens.EOT_ID]])
    assert images.shape[0] == 0
    out, grads = _grads(model, images, ids, mask)
    assert torch.isfinite(out["loss"]) and out["contrastive_loss"] == 0
    vision = [g for n, g in grads.items() if n.startswith(("visual.", "pool_project."))]
    assert vision and all(g is not None and not g.any() for g in vision)


@pytest.mark.parametrize("arch", ["clip", "llama"])
def test_activation_checkpointing_changes_nothing(arch):
    torch.manual_seed(0)
    cfg = tiny(arch, **({"num_query_groups": 2} if arch == "llama" else {}))
    plain = build_model(cfg)
    recompute = build_model(cfg)
    recompute.load_state_dict(plain.state_dict())
    recompute.visual.checkpoint_layers = recompute.text.checkpoint_layers = True
    args = batch(ROWS)
    out_a, grads_a = _grads(plain, *args)
    out_b, grads_b = _grads(recompute, *args)
    assert out_a["loss"] == out_b["loss"]
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_llama_decoder_uses_gqa_swiglu_rmsnorm():
    torch.manual_seed(0)
    model = build_model(tiny("llama", num_query_groups=2))
    names = dict(model.named_parameters())
    layer = "text.layers.0."
    assert names[layer + "self_attention.linear_qkv.weight"].shape[0] == 32 + 2 * 2 * 8  # q + (k, v) per group
    assert names[layer + "mlp.linear_fc1.weight"].shape[0] == 2 * model.text.layers[0].mlp.config.ffn_hidden_size
    assert isinstance(model.text.layers[0].input_layernorm, torch.nn.RMSNorm)
    assert "text.embedding.positional_embedding" not in names  # rotary positions
    out = model(*batch(ROWS))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
