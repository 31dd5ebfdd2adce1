"""The objectives as config: Emu-like regression against a plain formula, and terms of weight 0 skipped cleanly."""

import pytest
import torch
import torch.nn.functional as F

from lcl_megatron import tokens
from lcl_megatron.model.build import build_model
from lcl_megatron.model.lcl import context_positions
from tests.support.model_inputs import IMAGE, batch, tiny

# Two images with context (rows 0 and 2), one at the start of a row (no context: no pair).
ROWS = [[tokens.SOT_ID, 320, 1125] + IMAGE + [500, tokens.EOT_ID],
        IMAGE + [700, 800, tokens.EOT_ID],
        [tokens.SOT_ID, 40] + IMAGE + IMAGE + [tokens.EOT_ID]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny())


def set_weights(model, impl="torch", **weights):
    model.loss_impl = model.text.lm_head.impl = impl
    model.loss_weights = {"generation_weight": 1.0, "contrastive_weight": 0.0, "regression_weight": 0.0, **weights}


def plain_regression(model, images, ids, mask):
    """Mean over image/context pairs of ||context feature - normalised latent||^2, in plain torch."""
    latents, image_tokens = model.encode_images(images)
    hidden = model.text(model.text.embedding(ids, image_tokens))
    ctx = context_positions(ids, mask)
    context = model.text.context_head(hidden[ctx])
    latent = F.normalize(latents[ctx[ids == tokens.SOI_ID]].float(), dim=-1)
    assert latent.shape[0] == 3
    return ((context - latent) ** 2).sum(-1).mean()


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_regression_term_equals_plain_formula(model, impl):
    torch.manual_seed(1)
    images, ids, mask = batch(ROWS)
    set_weights(model, impl, generation_weight=0.5, regression_weight=2.0)
    out = model(images, ids, mask)
    expected = plain_regression(model, images, ids, mask)
    torch.testing.assert_close(out["regression_loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], 0.5 * out["generation_loss"] + 2.0 * expected, rtol=1e-5, atol=1e-6)
    assert out["contrastive_loss"] == 0


@pytest.mark.parametrize("impl", ["torch", "fused"])
@pytest.mark.parametrize("weights", [dict(generation_weight=0.0, contrastive_weight=1.0),
                                     dict(generation_weight=1.0, contrastive_weight=0.0),
                                     dict(generation_weight=0.0, contrastive_weight=0.0, regression_weight=1.0)])
def test_zero_weight_terms_are_skipped_and_every_parameter_gets_a_finite_gradient(model, impl, weights):
    torch.manual_seed(2)
    images, ids, mask = batch(ROWS)
    set_weights(model, impl, **weights)
    model.zero_grad()
    out = model(images, ids, mask)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    for name, key in (("generation", "generation_loss"), ("contrastive", "contrastive_loss"),
                      ("regression", "regression_loss")):
        assert (out[key] == 0) == (model.loss_weights[f"{name}_weight"] == 0), key
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The skipped generation head still receives its (zero) gradient, so reductions see every parameter.
    if weights["generation_weight"] == 0:
        assert model.text.lm_head.output_layer.weight.grad.abs().max() == 0


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_batch_without_pairs_gives_no_nan(model, impl):
    torch.manual_seed(3)
    images, ids, mask = batch([IMAGE + [700, 800, tokens.EOT_ID]])  # the one image has no context
    set_weights(model, impl, contrastive_weight=1.0, regression_weight=1.0)
    out = model(images, ids, mask)
    out["loss"].backward()
    assert out["num_pairs"] == 0 and out["regression_loss"] == 0 and out["contrastive_loss"] == 0
    torch.testing.assert_close(out["loss"], out["generation_loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_config_refuses_a_loss_with_every_weight_zero():
    from lcl_megatron.config import ConfigError, load_config

    load_config(None, ["loss.generation_weight=0", "loss.regression_weight=0.5"])
    with pytest.raises(ConfigError, match="nothing to train"):
        load_config(None, ["loss.generation_weight=0", "loss.contrastive_weight=0"])
