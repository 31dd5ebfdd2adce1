"""The plain LCL model cut into DeepSpeed pipeline stages.

    first stage:  ViT + attentive pool-project + text embedding (images spliced in)
    middle:       one megatron-core LM layer per pipeline layer
    last stage:   context head + LM head + logit_scale -> the loss

Between stages flows a tuple of fixed shapes (DeepSpeed's pipeline sends the
shapes once): LM hidden states in megatron's [s, b, h] layout (sliced over
the sequence under sequence parallelism), the image latents padded to
`parallel.max_images` rows, the image count, the token ids and the padding
mask. The last stage needs the latents for the contrastive term, so every
stage carries them along.
"""

from __future__ import annotations

import torch
from torch import nn

from lcl_megatron.layout import lm_layers_per_stage
from lcl_megatron.loss import Accumulation
from lcl_megatron.model import names
from lcl_megatron.model.dims import exp_logit_scale
from lcl_megatron.model.layers import run_layers
from lcl_megatron.model.lcl import LCLModel, contrastive_features, encode_images_always, lcl_losses, loss_counts
from lcl_megatron.model.sequence_parallel import gather_from_sequence, scatter_to_sequence


class PipelineInputError(ValueError):
    """A micro-batch that does not fit the pipeline's static shapes."""


class FirstStage(nn.Module):
    CANONICAL = names.FIRST_BLOCK  # canonical name prefix of each submodule, for checkpoints

    def __init__(self, model: LCLModel, max_images: int):
        super().__init__()
        self.visual, self.pool_project, self.embedding = model.visual, model.pool_project, model.text.embedding
        self.image_size = model.cfg.vision.image_size
        self.sequence_parallel = model.text.sequence_parallel
        self.max_images = max_images

    def forward(self, inputs):
        images, num_images, input_ids, attention_mask = inputs
        n = int(num_images.item())
        latents, image_tokens = encode_images_always(self.visual, self.pool_project, images[:n], self.image_size)
        padded = torch.cat([latents, latents.new_zeros(self.max_images - n, latents.shape[1])])
        hidden = self.embedding(input_ids, image_tokens).transpose(0, 1).contiguous()  # sent as is
        if self.sequence_parallel:
            hidden = scatter_to_sequence(hidden)
        return hidden, padded, num_images, input_ids, attention_mask


class LMLayerStage(nn.Module):
    def __init__(self, model: LCLModel, index: int):
        super().__init__()
        self.layer = model.text.layers[index]
        self.CANONICAL = names.lm_layer_block(index)
        self._rotary = [model.text.rotary]  # a list: shared, not registered as a submodule here
        self.checkpoint_layers = model.text.checkpoint_layers

    def forward(self, inputs):
        hidden, latents, num_images, input_ids, attention_mask = inputs
        kwargs = {}
        if self._rotary[0] is not None:
            kwargs["rotary_pos_emb"] = self._rotary[0](input_ids.shape[1], hidden.device)
        hidden = run_layers([self.layer], hidden, checkpoint=self.checkpoint_layers, **kwargs).contiguous()
        return hidden, latents, num_images, input_ids, attention_mask


# What the loss stage reports, in the order of its metrics tensor (`reported_loss`: see `combine_losses`).
METRICS = ("reported_loss", "generation_loss", "contrastive_loss", "regression_loss", "logit_scale")


class LossStage(nn.Module):
    """The heads and the losses.

    Gradient accumulation with the reference's feature cache (`Accumulation`)
    takes two passes over a step's micro-batches: after `record_features()` a
    forward pass without gradient keeps each micro-batch's contrastive features
    and counts (and returns zero losses); after `train_on_recorded()` the
    training pass gives micro-batch j the losses of slot j of the whole step.
    DeepSpeed's schedules run a stage's forwards in micro-batch order, which the
    slot count relies on.
    """

    CANONICAL = names.LOSS_BLOCK

    def __init__(self, model: LCLModel):
        super().__init__()
        self.context_head, self.lm_head, self.logit_scale = model.text.context_head, model.text.lm_head, model.logit_scale
        self.sequence_parallel = model.text.sequence_parallel
        self.loss_impl, self.loss_weights = model.loss_impl, model.loss_weights
        self._recorded: list | None = None  # per micro-batch: (counts, image features, context features)
        self._accumulation: Accumulation | None = None
        self._slot = 0

    def record_features(self) -> None:
        self._recorded, self._accumulation = [], None

    def train_on_recorded(self) -> None:
        counts = torch.stack([counts for counts, _, _ in self._recorded]).sum(0)
        contrastive = self.loss_weights["contrastive_weight"] > 0  # else no negatives to cache
        self._accumulation = Accumulation(counts[0], counts[1],
                                          [image for _, image, _ in self._recorded] if contrastive else [],
                                          [context for _, _, context in self._recorded] if contrastive else [])
        self._recorded, self._slot = None, 0

    def stop_accumulating(self) -> None:
        self._recorded, self._accumulation = None, None

    @property
    def accumulating(self) -> bool:
        """Whether the losses are the whole step's shares (see `Accumulation`)."""
        return self._accumulation is not None

    def forward(self, inputs):
        """(loss, the METRICS of this micro-batch stacked in one tensor)."""
        hidden, latents, num_images, input_ids, attention_mask = inputs
        if self.sequence_parallel:
            hidden = gather_from_sequence(hidden)
        latents, hidden, attention_mask = latents[: int(num_images.item())], hidden.transpose(0, 1), attention_mask.bool()
        if self._recorded is not None:
            features = contrastive_features(latents, hidden, input_ids, attention_mask, None, self.context_head)
            self._recorded.append((torch.stack(loss_counts(input_ids, attention_mask)), *features))
            return hidden.new_zeros((), dtype=torch.float32), torch.zeros(len(METRICS), device=hidden.device)
        accumulation = None
        if self._accumulation is not None:
            accumulation, self._slot = self._accumulation.at(self._slot), self._slot + 1
        out = lcl_losses(latents, hidden, input_ids, attention_mask, context_head=self.context_head,
                         lm_head=self.lm_head, scale=exp_logit_scale(self.logit_scale), impl=self.loss_impl,
                         accumulation=accumulation, **self.loss_weights)
        return out["loss"], torch.stack([out[name].float() for name in METRICS])


def pipeline_layers(model: LCLModel, max_images: int) -> list[nn.Module]:
    return ([FirstStage(model, max_images)] + [LMLayerStage(model, i) for i in range(len(model.text.layers))]
            + [LossStage(model)])


def stage_boundaries(num_lm_layers: int, num_stages: int, first_stage_lm_layers: int) -> list[int]:
    """DeepSpeed `parts`: layer index where each stage starts (+ the end).

    Layer 0 is FirstStage, 1..n the LM layers, n+1 the LossStage; the LM layers
    are cut as `layout.lm_layers_per_stage` says (the first stage holds the ViT,
    so it may take fewer).
    """
    parts, end = [0], 1  # FirstStage
    for count in lm_layers_per_stage(num_lm_layers, num_stages, first_stage_lm_layers):
        end += count
        parts.append(end)
    parts[-1] += 1  # the loss stage goes with the last LM layers
    return parts


def to_pipeline_batch(batch: dict, max_images: int):
    """Loader batch -> ((images padded to max_images, count, ids, mask), dummy label)."""
    if "cu_seqlens" in batch:
        raise PipelineInputError("packed batches are not supported with pipeline parallelism yet; "
                                 "turn packing off or set parallel.pp=1")
    images, n = batch["images"], batch["images"].shape[0]
    if n > max_images:
        raise PipelineInputError(f"a micro-batch holds {n} images but parallel.max_images is {max_images}; "
                                 f"raise parallel.max_images")
    padded = torch.cat([images, images.new_zeros(max_images - n, *images.shape[1:])])
    inputs = (padded, torch.tensor([n]), batch["input_ids"], batch["attention_mask"].long())
    return inputs, torch.zeros(1)


def canonical_name(module_name: str, stage_layers: dict) -> str:
    """'3.layer.mlp.linear_fc1.weight' -> 'text.layers.2.mlp.linear_fc1.weight' via each layer's CANONICAL map."""
    index, local = module_name.split(".", 1)
    layer = stage_layers[int(index)]
    head, _, tail = local.partition(".")
    prefix = layer.CANONICAL[head]
    return f"{prefix}.{tail}" if tail else prefix
