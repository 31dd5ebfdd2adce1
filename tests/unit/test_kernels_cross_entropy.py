import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (via kernels)


import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from kernels.chunked_linear_ce import default_chunk_rows  # noqa: E402
from kernels.cross_entropy_rows import _kernel, _row_stats_kernel, row_softmax  # noqa: E402
from kernels.fused_linear_cross_entropy import linear_cross_entropy_reference  # noqa: E402
from tests.support.kernels import (  # noqa: E402
    CHUNK, IGNORE, N, assert_close_rel, linear_ce_inputs, loss_and_grads, max_error)

def test_triton_path_runs_in_the_interpreter():
    from triton.runtime.interpreter import InterpretedFunction

    hidden, weight, targets = linear_ce_inputs(seed=0, dtype=torch.float32)
    kernels.fused_linear_cross_entropy(hidden, weight, targets, impl="triton")
    assert isinstance(_kernel(_row_stats_kernel), InterpretedFunction)


@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_softmax_passes_match_float64(poison, with_scale, with_mask, dtype):
    gen = torch.Generator().manual_seed(3)
    rows, cols = 9, 45
    z = (torch.randn(rows, cols, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, cols, (rows,), generator=gen)
    targets[[1, 5]] = torch.tensor([-1, cols + 4])  # not owned here: no target column
    scale = torch.tensor(2.5) if with_scale else None
    valid = torch.rand(cols, generator=gen) > 0.3 if with_mask else None
    if with_mask:
        valid[targets.clamp(0, cols - 1)] = True

    logits = z.double() * (2.5 if with_scale else 1.0)
    if with_mask:
        logits = logits.masked_fill(~valid, float("-inf"))
    owned = (targets >= 0) & (targets < cols)
    expected_target = torch.where(owned, logits.gather(1, targets.clamp(0, cols - 1)[:, None]).squeeze(1), 0.0)
    lse64 = torch.logsumexp(logits, 1)

    coef = torch.rand(rows, generator=gen)
    # the gradient pass normalises by the lse it is given: under vocabulary parallelism a global
    # one that also counts other ranks' columns (here as if they added exp(0.7) - 1 of the mass)
    given_lse = lse64 + 0.7
    softmax = (logits - given_lse[:, None]).exp()
    onehot = torch.zeros(rows, cols, dtype=torch.float64)
    onehot[owned.nonzero()[:, 0], targets[owned]] = 1.0
    grad_logits = coef.double()[:, None] * (softmax - onehot)
    expected_grad = grad_logits * (2.5 if with_scale else 1.0)
    expected_scale_grad = (grad_logits * z.double()).sum(1)
    for impl in ("triton", "torch"):
        rows_softmax = row_softmax(impl, scale, valid, want_scale_grad=True)
        buffer = z.clone()
        row_max, sumexp, target_logit = rows_softmax.stats(buffer, targets)
        assert_close_rel(row_max + sumexp.log(), lse64, 1e-5, f"{impl} lse")
        assert_close_rel(target_logit, expected_target, 1e-5, f"{impl} target logit")
        grad, scale_grad = rows_softmax.grad(buffer, targets, given_lse.float(), coef)
        rel = 1e-5 if grad.dtype == torch.float32 else 1e-2  # bf16 output rounding
        assert_close_rel(grad, expected_grad, rel, f"{impl} grad")
        assert_close_rel(scale_grad, expected_scale_grad, 1e-5, f"{impl} scale grad")


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_linear_cross_entropy_fp32_matches_float64(poison, impl, reduction):
    hidden, weight, targets = linear_ce_inputs(seed=11, dtype=torch.float32)
    loss, grad_hidden, grad_weight = loss_and_grads(
        kernels.fused_linear_cross_entropy, hidden, weight, targets, IGNORE, reduction, impl=impl, chunk_rows=CHUNK)
    ref_loss, ref_hidden, ref_weight = loss_and_grads(
        linear_cross_entropy_reference, hidden.double(), weight.double(), targets, IGNORE, reduction)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad_hidden, ref_hidden, 1e-5, "grad hidden")
    assert_close_rel(grad_weight, ref_weight, 1e-5, "grad weight")
    assert grad_hidden[targets == IGNORE].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_linear_cross_entropy_bf16_within_torch_bf16_error(poison, impl):
    hidden, weight, targets = linear_ce_inputs(seed=5, dtype=torch.bfloat16)
    ours = loss_and_grads(kernels.fused_linear_cross_entropy, hidden, weight, targets, impl=impl, chunk_rows=CHUNK)
    eager = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
    exact = loss_and_grads(linear_cross_entropy_reference, hidden.double(), weight.double(), targets)
    for name, mine, torch_bf16, truth in zip(("loss", "grad hidden", "grad weight"), ours, eager, exact):
        assert mine.dtype == torch_bf16.dtype
        allowed = 2 * max_error(torch_bf16, truth) + 1e-3 * truth.abs().max().item()
        assert max_error(mine, truth) <= allowed, f"{name}: {max_error(mine, truth):.3e} > {allowed:.3e}"


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_all_ignored_targets_give_zero_loss_and_gradients(impl):
    hidden, weight, _ = linear_ce_inputs(seed=2, dtype=torch.float32)
    targets = torch.full((N,), IGNORE)
    loss, grad_hidden, grad_weight = loss_and_grads(
        kernels.fused_linear_cross_entropy, hidden, weight, targets, impl=impl, chunk_rows=CHUNK)
    assert loss.item() == 0 and grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0


def test_only_requested_gradients_and_no_grad_mode():
    hidden, weight, targets = linear_ce_inputs(seed=4, dtype=torch.float32)
    expected = linear_cross_entropy_reference(hidden.double(), weight.double(), targets)
    with torch.no_grad():
        assert_close_rel(kernels.fused_linear_cross_entropy(hidden, weight, targets), expected, 1e-5, "no-grad loss")
    hidden = hidden.clone().requires_grad_()
    kernels.fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=CHUNK).backward()
    assert hidden.grad is not None and weight.grad is None


def test_default_chunk_is_a_bounded_number_of_whole_tiles():
    rows = default_chunk_rows(8192, 49411, 4, torch.device("cpu"))
    assert rows % 128 == 0 and 0 < rows * 49411 * 4 <= 128 << 20
    assert default_chunk_rows(37, 53, 4, torch.device("cpu")) == 37
    assert default_chunk_rows(16384, 151936, 2, torch.device("cuda")) * 151936 * 2 <= 1 << 30


def test_bad_shapes_are_clear_errors():
    hidden, weight, targets = linear_ce_inputs(seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="weight"):
        kernels.fused_linear_cross_entropy(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="reduction"):
        kernels.fused_linear_cross_entropy(hidden, weight, targets, reduction="none")


