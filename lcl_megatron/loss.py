"""The LCL losses: next-token generation, image-latent / context contrastive, and
the Emu-like regression of each image latent from the context before it.

Both are computed as sums over this rank's rows and normalised by global
counts (all data-parallel ranks together), so that the data-parallel average
of the per-rank losses is exactly the single-process loss on the global batch.
With an `Accumulation` the batch is the whole optimizer step (every
accumulated micro-batch), as one process would see it in one micro-batch.
`impl="fused"` swaps in the chunked kernels of `kernels/` behind the same
interface.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from kernels.collectives import gather_rows_with_grad
from kernels.contrastive_loss import contrastive_loss, contrastive_loss_reference


def _kernel_impl(tensor) -> str | None:
    """Triton on GPUs; the chunked torch path on CPU (even when tests interpret Triton)."""
    return None if tensor.is_cuda else "torch"


def describe_losses(impl: str, device_type: str) -> str:
    """The loss kernels `impl` runs on this device type, for the start-up line."""
    if impl != "fused":
        return "plain torch"
    return "Triton fused" if device_type == "cuda" else "chunked torch"


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _all_reduce_sum(value: torch.Tensor, group) -> torch.Tensor:
    value = value.detach().clone()
    if _group_size(group) > 1:
        dist.all_reduce(value, group=group)
    return value


def gather_features(image_features, context_features, group):
    """Gather all ranks' pairs with gradient, padding ranks with fewer rows.

    Returns (all_image, all_context, targets [n] into the gathered columns, column_valid [M]).
    """
    n = image_features.shape[0]
    world = _group_size(group)
    targets = torch.arange(n, device=image_features.device)
    if world == 1:
        return image_features, context_features, targets, None
    counts = torch.zeros(world, dtype=torch.long, device=image_features.device)
    counts[dist.get_rank(group)] = n
    dist.all_reduce(counts, group=group)
    width = int(counts.max())
    pad = lambda t: torch.cat([t, t.new_zeros(width - n, t.shape[1])]) if width > n else t
    all_image = gather_rows_with_grad(pad(image_features), group)
    all_context = gather_rows_with_grad(pad(context_features), group)
    column_valid = (torch.arange(width, device=counts.device)[None, :] < counts[:, None]).reshape(-1)
    return all_image, all_context, targets + dist.get_rank(group) * width, column_valid


def contrastive_loss_sum(image_features, context_features, logit_scale, group=None, impl="torch"):
    """Sum over this rank's pairs of the symmetric InfoNCE term (i->t + t->i) / 2.

    Features are L2-normalised fp32 [n, D]; logit_scale is already exponentiated.
    """
    all_image, all_context, targets, column_valid = gather_features(image_features, context_features, group)
    if impl == "fused":
        return contrastive_loss(image_features, context_features, all_image, all_context, logit_scale,
                                targets, column_valid, reduction="sum", impl=_kernel_impl(image_features))
    return contrastive_loss_reference(image_features, context_features, all_image, all_context, logit_scale,
                                      targets, column_valid, reduction="sum")


def token_cross_entropy_sum(hidden, output_layer, targets, vocab_size: int, impl="torch"):
    """Sum of next-token cross-entropy over rows of `hidden` [T, D] (after the head's norm).

    `output_layer` is the column-parallel LM head; its rows beyond `vocab_size`
    (TP padding) take no part in the softmax.
    """
    tp_group = parallel_state.get_tensor_model_parallel_group() if parallel_state.model_parallel_is_initialized() else None
    tp = _group_size(tp_group)
    weight = output_layer.weight
    rows = weight.shape[0]
    vocab_start = (dist.get_rank(tp_group) if tp > 1 else 0) * rows
    real_rows = max(0, min(rows, vocab_size - vocab_start))
    if impl == "fused":
        import kernels

        if tp == 1:
            return kernels.fused_linear_cross_entropy(hidden, weight[:vocab_size], targets, reduction="sum",
                                                      impl=_kernel_impl(hidden))
        hidden = copy_to_tensor_model_parallel_region(hidden)
        return kernels.vocab_parallel_fused_linear_cross_entropy(
            hidden, weight[:real_rows], targets, vocab_start, tp_group, reduction="sum", impl=_kernel_impl(hidden))
    if tp == 1:
        logits = F.linear(hidden, weight[:vocab_size]).float()
        return F.cross_entropy(logits, targets, reduction="sum")
    logits = output_layer(hidden)[0].float()
    if real_rows < rows:
        logits = torch.cat([logits[:, :real_rows], logits.new_full((logits.shape[0], rows - real_rows), float("-inf"))], 1)
    return vocab_parallel_cross_entropy(logits, targets).sum()


def zero_keeping_graph(*tensors) -> torch.Tensor:
    """An exact zero that depends on `tensors` (empty ones included): a skipped term
    still hands every parameter behind them a (zero) gradient."""
    return sum(t.sum() for t in tensors) * 0.0


def with_gradient_scaled(value: torch.Tensor, factor: float) -> torch.Tensor:
    """`value` exactly, whose gradient is multiplied by `factor` on its way back."""
    return value.detach() + (value - value.detach()) * factor


def regression_loss_sum(image_features, context_features):
    """Sum over pairs of the squared L2 distance between each L2-normalised image latent
    and the context feature that precedes it (the Emu-like objective: predict the next
    image's latent by regression, in the space the contrastive term uses).

    Nothing keeps the latents apart, so the objective is minimised by latents that all
    coincide: this is the collapse the contrastive term prevents.
    """
    return (context_features - image_features).square().sum()


@dataclass
class Accumulation:
    """What one micro-batch's losses take from the other micro-batches of its optimizer step.

    The reference's `accum_freq` feature cache: the contrastive features of this
    rank's micro-batches, computed without gradient before the step (empty when
    the contrastive term is off), and the step's counts on this rank. The
    micro-batch `live` being trained puts its own features, with gradient, in its
    slot; its losses are normalised by the step's counts, so that the gradients
    of the step's micro-batches add up to the gradient of one batch of them all.
    """

    num_tokens: torch.Tensor  # predicted tokens in this rank's micro-batches of the step
    num_pairs: torch.Tensor  # image latent / context pairs likewise
    image_features: list[torch.Tensor]  # per micro-batch [n_j, D], detached
    context_features: list[torch.Tensor]
    live: int = 0

    def at(self, live: int) -> "Accumulation":
        return replace(self, live=live)

    def with_live(self, image_features, context_features):
        """Every micro-batch's features, in step order, the live one's in its slot."""
        def splice(cached, live):
            return torch.cat(cached[:self.live] + [live] + cached[self.live + 1:])

        return (splice(self.image_features, image_features), splice(self.context_features, context_features))


def weighted_loss(generation, contrastive, regression, *, generation_weight, contrastive_weight, regression_weight=0.0):
    return generation_weight * generation + contrastive_weight * contrastive + regression_weight * regression


def combine_losses(gen_sum, num_tokens, con_sum, num_pairs, reg_sum=None, *, generation_weight, contrastive_weight,
                   regression_weight=0.0, group=None, contrastive_micro_batches: int = 1):
    """Normalise the per-rank sums by global counts.

    Returns a dict whose tensors, averaged over the data-parallel group (as
    DeepSpeed averages gradients), equal the single-process losses.

    `contrastive_micro_batches` > 1: `con_sum` is over the pairs of that many
    micro-batches (an `Accumulation`), the same sum in each of them, with
    gradient to this one's features only. Each micro-batch reports its share of
    it (1/n), so that the step's reported terms add up over its micro-batches.
    `loss` is what to differentiate, `reported_loss` the weighted sum of the
    reported terms (the value of `loss` but for that share).
    """
    world = _group_size(group)
    counts = _all_reduce_sum(torch.stack([num_tokens, num_pairs]).float(), group)
    total_tokens, total_pairs = counts[0].clamp(min=1), counts[1]
    generation = gen_sum * (world / total_tokens)
    # Without any image pair in the global batch the sums are exact zeros that keep the graph whole;
    # the clamp keeps their gradients zero too (and no host read decides between the cases).
    per_pair = world / total_pairs.clamp(min=1)
    contrastive = con_sum * per_pair
    regression = (reg_sum if reg_sum is not None else con_sum.new_zeros(())) * per_pair
    weights = {"generation_weight": generation_weight, "contrastive_weight": contrastive_weight,
               "regression_weight": regression_weight}
    loss = weighted_loss(generation, contrastive, regression, **weights)
    contrastive_share = contrastive.detach() / contrastive_micro_batches
    return {"loss": loss, "generation_loss": generation.detach(), "contrastive_loss": contrastive_share,
            "regression_loss": regression.detach(), "num_tokens": total_tokens, "num_pairs": total_pairs,
            "reported_loss": weighted_loss(generation.detach(), contrastive_share, regression.detach(), **weights)}
