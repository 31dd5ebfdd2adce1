"""The cross-entropy kernels in other processes: compiled for sm_90 without the interpreter, and the
vocab-parallel variant over two gloo ranks."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (via kernels)

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import kernels  # noqa: E402
from tests.support.kernels import (  # noqa: E402
    CHUNK, IGNORE, V, assert_close_rel, linear_ce_inputs, loss_and_grads, poisoned_empty)


def test_kernels_compile_for_h200():
    """The interpreter forgives what the compiler does not (globals, types): compile for sm_90.
    In a fresh process, as interpreted runs leave triton.language patched."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H200], capture_output=True, text=True, env=env,
                          cwd=Path(kernels.__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_vocab_parallel_over_two_gloo_ranks_equals_unsplit():
    mp.spawn(_vocab_parallel_worker, args=(2, _free_port()), nprocs=2)


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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vocab_parallel_worker(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.empty = poisoned_empty
    try:
        hidden, weight, targets = linear_ce_inputs(seed=8, dtype=torch.float32)
        combos = [(impl, reduction) for impl in ("triton", "torch") for reduction in ("mean", "sum")]
        unsplit = {(impl, reduction): loss_and_grads(kernels.fused_linear_cross_entropy, hidden, weight, targets,
                                                      IGNORE, reduction, impl=impl, chunk_rows=CHUNK)
                   for impl, reduction in combos}
        # an uneven split, and one where rank 1 holds no vocabulary at all
        for split in ([0, 20, V], [0, V, V]):
            start, stop = split[rank], split[rank + 1]
            for impl, reduction in combos:
                full = unsplit[impl, reduction]
                loss, grad_hidden, grad_shard = loss_and_grads(
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
