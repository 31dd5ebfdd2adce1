"""On a real GPU: Triton kernels compiled at real shapes, fused attention, one training step equal to the CPU's.

`make gpu-check` runs these (`pytest -m gpu`); without CUDA they are skipped.
"""

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" and torch.cuda.is_available(),
                                 reason="run without TRITON_INTERPRET so that Triton compiles for the GPU")]


def rel_err(mine: torch.Tensor, truth: torch.Tensor) -> float:
    return float((mine.double() - truth.double()).norm() / truth.double().norm().clamp(min=1e-30))


def _grads(fn, leaves, *extra):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves, *extra)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype, rows, vocab, width, tol", [
    (torch.float32, 4096, 32768, 1024, 1e-4),
    (torch.bfloat16, 16384, 151936, 2048, 2e-2),
])
def test_fused_linear_cross_entropy_compiles_and_matches_torch(dtype, rows, vocab, width, tol):
    from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(rows, width, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(vocab, width, device="cuda", generator=gen) * width ** -0.5).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    loss, grads = _grads(lambda h, w: fused_linear_cross_entropy(h, w, targets, impl="triton"), [hidden, weight])
    # the truth in fp32 from the same (rounded) inputs
    ref_loss, ref_grads = _grads(lambda h, w: linear_cross_entropy_reference(h, w, targets),
                                 [hidden.float(), weight.float()])
    assert rel_err(loss.float(), ref_loss) < tol
    for mine, truth in zip(grads, ref_grads):
        assert rel_err(mine.float(), truth) < tol


@pytest.mark.parametrize("rows, cols, width", [(2048, 16384, 768), (8192, 65536, 768)])
def test_fused_contrastive_loss_compiles_and_matches_torch(rows, cols, width):
    import torch.nn.functional as F

    from kernels.contrastive_loss import contrastive_loss, contrastive_loss_reference

    gen = torch.Generator(device="cuda").manual_seed(1)
    img = F.normalize(torch.randn(cols, width, device="cuda", generator=gen), dim=-1)
    txt = F.normalize(torch.randn(cols, width, device="cuda", generator=gen), dim=-1)
    targets = torch.arange(rows, device="cuda")
    scale = torch.tensor(50.0, device="cuda")

    def loss_of(fn, impl=None):
        extra = {"impl": impl} if impl else {}
        return lambda a, b, s: fn(a[:rows], b[:rows], a, b, s, targets, **extra)

    loss, grads = _grads(loss_of(contrastive_loss, "triton"), [img, txt, scale])
    ref_loss, ref_grads = _grads(loss_of(contrastive_loss_reference), [img, txt, scale])
    assert rel_err(loss, ref_loss) < 1e-4
    for mine, truth in zip(grads, ref_grads):
        assert rel_err(mine, truth) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_attention_matches_the_math_path(dtype, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import kernels
    from kernels.attention import attention_reference

    gen = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(2, 1024, 16, 64, device="cuda", generator=gen).to(dtype) for _ in range(3))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # fails if the unmasked dense path cannot take flash
        dense = kernels.attention(q, k, v, causal=causal)
    assert rel_err(dense.float(), attention_reference(q, k, v, causal=causal).float()) < 2e-2
    lengths = [100, 412, 512, 300, 700, 24]  # two rows of 1024 tokens
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    packed = kernels.attention(q, k, v, causal=causal, cu_seqlens=cu)
    truth = attention_reference(q, k, v, causal=causal, cu_seqlens=cu.cpu())
    assert rel_err(packed.float(), truth.float()) < 2e-2


def test_one_training_step_on_the_gpu_equals_the_cpu_step():
    """fp32 without TF32: losses and updated weights of one optimizer step agree with the CPU's."""
    from lcl_megatron.config import load_config
    from lcl_megatron.model.build import ensure_single_process_groups
    from lcl_megatron.model.lcl import LCLModel
    from lcl_megatron.training.optim import build_optimizer
    from lcl_megatron.data.global_batch import build_loader
    from tests.support.configs import TINY

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ensure_single_process_groups()
    cfg = load_config(None, TINY + ["train.micro_batch_size=8"])
    batch = next(iter(build_loader(cfg, 0, 1)))
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(cfg.train.seed)
        model = LCLModel.from_config(cfg).to(device)
        optimizer = build_optimizer(model, cfg)
        out = model(*(batch[k].to(device) for k in ("images", "input_ids", "attention_mask")))
        out["loss"].backward()
        optimizer.step()
        results[device] = (out["loss"].detach().cpu(), {n: p.detach().cpu() for n, p in model.named_parameters()})
    (cpu_loss, cpu_params), (gpu_loss, gpu_params) = results["cpu"], results["cuda"]
    assert rel_err(gpu_loss, cpu_loss) < 1e-5
    for name, value in cpu_params.items():
        assert rel_err(gpu_params[name], value) < 1e-4, name
