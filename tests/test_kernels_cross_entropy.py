import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (via kernels)

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import kernels  # noqa: E402
from kernels.chunked_linear_ce import default_chunk_rows  # noqa: E402
from kernels.cross_entropy_rows import _kernel, _row_stats_kernel, row_softmax  # noqa: E402
from kernels.fused_linear_cross_entropy import linear_cross_entropy_reference  # noqa: E402
from tests.test_kernels_support import (  # noqa: E402,F401
    assert_close_rel, max_error, poison, poisoned_empty)

# Odd sizes: V and D are not multiples of the interpreter's 16-column tile, N not of the chunk.
N, D, V, CHUNK = 37, 11, 53, 8
IGNORE = -100


def _inputs(seed, dtype, n=N, d=D, v=V):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (torch.randn(v, d, generator=gen) * 0.7).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < 0.25] = IGNORE
    return hidden, weight, targets


def _loss_and_grads(fn, hidden, weight, *args, upstream=1.7, **kwargs):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, *args, **kwargs)
    (loss * upstream).backward()  # a non-unit upstream gradient must scale both gradients
    return loss.detach(), hidden.grad, weight.grad


def test_triton_path_runs_in_the_interpreter():
    from triton.runtime.interpreter import InterpretedFunction

    hidden, weight, targets = _inputs(seed=0, dtype=torch.float32)
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
    hidden, weight, targets = _inputs(seed=11, dtype=torch.float32)
    loss, grad_hidden, grad_weight = _loss_and_grads(
        kernels.fused_linear_cross_entropy, hidden, weight, targets, IGNORE, reduction, impl=impl, chunk_rows=CHUNK)
    ref_loss, ref_hidden, ref_weight = _loss_and_grads(
        linear_cross_entropy_reference, hidden.double(), weight.double(), targets, IGNORE, reduction)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad_hidden, ref_hidden, 1e-5, "grad hidden")
    assert_close_rel(grad_weight, ref_weight, 1e-5, "grad weight")
    assert grad_hidden[targets == IGNORE].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_linear_cross_entropy_bf16_within_torch_bf16_error(poison, impl):
    hidden, weight, targets = _inputs(seed=5, dtype=torch.bfloat16)
    ours = _loss_and_grads(kernels.fused_linear_cross_entropy, hidden, weight, targets, impl=impl, chunk_rows=CHUNK)
    eager = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
    exact = _loss_and_grads(linear_cross_entropy_reference, hidden.double(), weight.double(), targets)
    for name, mine, torch_bf16, truth in zip(("loss", "grad hidden", "grad weight"), ours, eager, exact):
        assert mine.dtype == torch_bf16.dtype
        allowed = 2 * max_error(torch_bf16, truth) + 1e-3 * truth.abs().max().item()
        assert max_error(mine, truth) <= allowed, f"{name}: {max_error(mine, truth):.3e} > {allowed:.3e}"


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_all_ignored_targets_give_zero_loss_and_gradients(impl):
    hidden, weight, _ = _inputs(seed=2, dtype=torch.float32)
    targets = torch.full((N,), IGNORE)
    loss, grad_hidden, grad_weight = _loss_and_grads(
        kernels.fused_linear_cross_entropy, hidden, weight, targets, impl=impl, chunk_rows=CHUNK)
    assert loss.item() == 0 and grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0


def test_only_requested_gradients_and_no_grad_mode():
    hidden, weight, targets = _inputs(seed=4, dtype=torch.float32)
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
    hidden, weight, targets = _inputs(seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="weight"):
        kernels.fused_linear_cross_entropy(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="reduction"):
        kernels.fused_linear_cross_entropy(hidden, weight, targets, reduction="none")


_COMPILE_FOR_H200 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from kernels.cross_entropy_rows import _row_grad_kernel, _row_stats_kernel

common = {"z_ptr": "*bf16", "stride_z": "i64", "target_ptr": "*i64", "scale_ptr": "*fp32", "valid_ptr": "*u8",
          "n_cols": "i32", "HAS_SCALE": "constexpr", "HAS_MASK": "constexpr", "BLOCK_V": "constexpr"}
for kernel, signature, extra in [
        (_row_stats_kernel, {**common, "max_ptr": "*fp32", "sumexp_ptr": "*fp32", "target_logit_ptr": "*fp32"}, {}),
        (_row_grad_kernel, {**common, "lse_ptr": "*fp32", "coef_ptr": "*fp32", "scale_grad_ptr": "*fp32",
                            "WANT_SCALE_GRAD": "constexpr"}, {"WANT_SCALE_GRAD": True})]:
    fn = JITFunction(kernel)
    source = ASTSource(fn, {name: signature[name] for name in fn.arg_names},
                       constexprs={"HAS_SCALE": True, "HAS_MASK": True, "BLOCK_V": 8192, **extra})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
    assert compiled.asm["cubin"], kernel.__name__
"""


def test_kernels_compile_for_h200():
    """The interpreter forgives what the compiler does not (globals, types): compile for sm_90.
    In a fresh process, as interpreted runs leave triton.language patched."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H200], capture_output=True, text=True, env=env,
                          cwd=Path(kernels.__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vocab_parallel_worker(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.empty = poisoned_empty
    try:
        hidden, weight, targets = _inputs(seed=8, dtype=torch.float32)
        combos = [(impl, reduction) for impl in ("triton", "torch") for reduction in ("mean", "sum")]
        unsplit = {(impl, reduction): _loss_and_grads(kernels.fused_linear_cross_entropy, hidden, weight, targets,
                                                      IGNORE, reduction, impl=impl, chunk_rows=CHUNK)
                   for impl, reduction in combos}
        # an uneven split, and one where rank 1 holds no vocabulary at all
        for split in ([0, 20, V], [0, V, V]):
            start, stop = split[rank], split[rank + 1]
            for impl, reduction in combos:
                full = unsplit[impl, reduction]
                loss, grad_hidden, grad_shard = _loss_and_grads(
                    kernels.vocab_parallel_fused_linear_cross_entropy, hidden, weight[start:stop], targets,
                    start, dist.group.WORLD, IGNORE, reduction, impl=impl, chunk_rows=CHUNK)
                dist.all_reduce(grad_hidden)  # the caller's duty, as for a column-parallel input
                what = f"rank {rank} split {split} {impl} {reduction}"
                assert_close_rel(loss, full[0], 1e-6, f"{what} loss")
                assert_close_rel(grad_hidden, full[1], 1e-5, f"{what} grad hidden")
                assert_close_rel(grad_shard, full[2][start:stop], 1e-5, f"{what} grad weight")
                losses = [torch.zeros(()) for _ in range(world)]
                dist.all_gather(losses, loss)
                assert losses[0] == losses[1], f"{what}: ranks disagree on the loss"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_vocab_parallel_over_two_gloo_ranks_equals_unsplit():
    mp.spawn(_vocab_parallel_worker, args=(2, _free_port()), nprocs=2)
