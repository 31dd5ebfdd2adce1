import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (via kernels)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from kernels.contrastive_loss import contrastive_loss_reference  # noqa: E402
from tests.support.kernels import assert_close_rel, max_error  # noqa: E402

# Three data-parallel "ranks" with 5, 3 and 4 pairs, padded to 5 columns each: M = 15
# gathered columns of which 3 are zero padding; this rank is the second (rows 5..7).
COUNTS, WIDTH, RANK, D, CHUNK = (5, 3, 4), 5, 1, 13, 2


def _inputs(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    blocks_img, blocks_txt = [], []
    for count in COUNTS:
        img = F.normalize(torch.randn(count, D, generator=gen), dim=-1)
        txt = F.normalize(img + 0.8 * torch.randn(count, D, generator=gen), dim=-1)
        pad = torch.zeros(WIDTH - count, D)
        blocks_img.append(torch.cat([img, pad]))
        blocks_txt.append(torch.cat([txt, pad]))
    all_img, all_txt = torch.cat(blocks_img).to(dtype), torch.cat(blocks_txt).to(dtype)
    n = COUNTS[RANK]
    rows = slice(RANK * WIDTH, RANK * WIDTH + n)
    column_valid = (torch.arange(WIDTH)[None, :] < torch.tensor(COUNTS)[:, None]).reshape(-1)
    targets = torch.arange(n) + RANK * WIDTH
    logit_scale = torch.tensor(14.3)
    return [all_img[rows].clone(), all_txt[rows].clone(), all_img, all_txt, logit_scale], targets, column_valid


def _loss_and_grads(fn, tensors, *args, upstream=0.6, **kwargs):
    leaves = [t.clone().requires_grad_() for t in tensors]
    loss = fn(*leaves, *args, **kwargs)
    (loss * upstream).backward()
    return [loss.detach()] + [t.grad for t in leaves]


NAMES = ("loss", "grad image", "grad text", "grad all image", "grad all text", "grad logit scale")


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("masked", [True, False])
def test_contrastive_fp32_matches_float64(poison, impl, reduction, masked):
    tensors, targets, column_valid = _inputs(seed=7, dtype=torch.float32)
    if not masked:  # no padding: every column is a real pair
        column_valid = None
    ours = _loss_and_grads(kernels.contrastive_loss, tensors, targets, column_valid, reduction, impl=impl,
                           chunk_rows=CHUNK)
    exact = _loss_and_grads(contrastive_loss_reference, [t.double() for t in tensors], targets, column_valid,
                            reduction)
    for name, mine, truth in zip(NAMES, ours, exact):
        assert_close_rel(mine, truth, 1e-5, name)
    if masked:  # padded columns are masked out, so they receive no gradient
        assert ours[3][~column_valid].abs().max() == 0 and ours[4][~column_valid].abs().max() == 0


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_contrastive_bf16_inputs_within_torch_bf16_error(poison, impl):
    tensors, targets, column_valid = _inputs(seed=9, dtype=torch.bfloat16)
    ours = _loss_and_grads(kernels.contrastive_loss, tensors, targets, column_valid, impl=impl, chunk_rows=CHUNK)
    eager = _loss_and_grads(contrastive_loss_reference, tensors, targets, column_valid)
    exact = _loss_and_grads(contrastive_loss_reference, [t.double() for t in tensors], targets, column_valid)
    for name, mine, torch_bf16, truth in zip(NAMES, ours, eager, exact):
        assert name == "loss" or mine.dtype == torch_bf16.dtype, name  # the loss itself is fp32
        allowed = 2 * max_error(torch_bf16, truth) + 1e-3 * truth.abs().max().item()
        assert max_error(mine, truth) <= allowed, f"{name}: {max_error(mine, truth):.3e} > {allowed:.3e}"


def test_contrastive_rejects_mismatched_shapes():
    tensors, targets, column_valid = _inputs(seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="column_valid"):
        kernels.contrastive_loss(*tensors, targets, column_valid[:-1])
    with pytest.raises(ValueError, match="features"):
        kernels.contrastive_loss(tensors[0], tensors[1][:, :-1], *tensors[2:], targets)
