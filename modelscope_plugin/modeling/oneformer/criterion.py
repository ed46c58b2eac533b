"""OneFormer's training loss (transformers' ``OneFormerLoss``, converted from SHI-Labs' ``SetCriterion``).

Mask2Former's class / mask / dice terms on every decoder stage, through this package's matcher, criterion and point
sampling (``modeling/criterion.py``), plus the query-text contrastive loss on the final stage only: each image's
queries (before the masked-attention decoder, flattened to one vector) and its text queries (the text mapper's
embeddings of its text list, flattened likewise) are L2-normalised; their (B, B) cosine similarities times a learned
logit scale (initialised to log(1 / temperature), its exponential clamped at 100) go through a symmetric
cross-entropy whose targets are the diagonal (image b with its own text). Under torch.distributed the batch is the
global one, as the reference gathers it across GPUs: every rank computes the loss of all ranks' images and texts
(``global_batch``), so that N ranks train as one process on the global batch, and the logit scale (outside the
data-parallel network) gets the same gradient on every rank. Returned terms are unweighted, the
cross-entropy named ``loss_ce`` as in ``Mask2FormerCriterion``; ``total`` weights class / mask / dice / contrastive
as transformers' ``OneFormerConfig`` (2 / 5 / 5 / 0.5).
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modelscope_plugin.modeling.criterion import Mask2FormerCriterion
from modelscope_plugin.modeling.mask2former.model import Mask2FormerOutput
from modelscope_plugin.modeling.matcher import HungarianMatcher, SegmentationTarget
from modelscope_plugin.modeling.point_sampling import PointSampler
from modelscope_plugin.ranks import rank_and_world_size


@dataclass
class OneFormerTrainingOutput:
    predictions: Mask2FormerOutput
    """Final and auxiliary class / mask logits, as at inference."""
    contrastive_queries: Optional[torch.Tensor]
    """(B, Q, C): the queries entering the masked-attention decoder (object queries, then the task query)."""
    text_queries: Optional[torch.Tensor]
    """(B, num_text + num_context, C): the text mapper's embeddings of each image's text list; None for a network
    without a text mapper, which trains without the contrastive term (as transformers with ``is_training`` false)."""


class ScaledGradient(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(context, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        context.factor = factor
        return tensor.clone()

    @staticmethod
    def backward(context, gradient: torch.Tensor):
        return gradient * context.factor, None


def global_batch(features: torch.Tensor) -> torch.Tensor:
    """(B, D) rows of this rank -> (N * B, D) rows of the N ranks in rank order (every rank holds B rows); ``features``
    itself without a process group.

    Each rank then computes the loss of the whole global batch. The other ranks' rows are constants here; this rank's
    rows pass back N times their gradient, so that the data-parallel average of the ranks' gradients is that loss's
    gradient (the sum over ranks of the gradient through each rank's own rows)."""
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return features
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, features.detach().contiguous())
    gathered[rank] = ScaledGradient.apply(features, float(world_size))
    return torch.cat(gathered)


def contrastive_loss(contrastive_queries: torch.Tensor, text_queries: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """(B, Q, C), (B, T, C) with Q * C == T * C, scalar log-scale -> image-to-text + text-to-image cross-entropy."""
    # (B, Q, C) -> (B, Q * C), unit length; then the global batch's rows (B_global, Q * C)
    image_features = global_batch(F.normalize(contrastive_queries.float().flatten(1), dim=-1))
    text_features = global_batch(F.normalize(text_queries.float().flatten(1), dim=-1))
    scale = torch.clamp(logit_scale.exp(), max=100)
    # (B_text, B_image)
    logits_per_text = text_features @ image_features.t() * scale
    diagonal = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return F.cross_entropy(logits_per_text.t(), diagonal) + F.cross_entropy(logits_per_text, diagonal)


class OneFormerCriterion(nn.Module):
    def __init__(self, num_classes: int, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, contrastive_weight: float = 0.5, no_object_weight: float = 0.1,
                 contrastive_temperature: float = 0.07, num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75):
        super().__init__()
        matcher = HungarianMatcher(class_weight=class_weight, mask_weight=mask_weight, dice_weight=dice_weight,
                                   num_points=num_points)
        self.mask2former = Mask2FormerCriterion(num_classes, matcher, class_weight, mask_weight, dice_weight,
                                                no_object_weight, num_points, oversample_ratio,
                                                importance_sample_ratio)
        self.contrastive_weight = contrastive_weight
        # learnable, as transformers' OneFormerLoss.logit_scale
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / contrastive_temperature)))

    def forward(self, output: OneFormerTrainingOutput, targets: Sequence[SegmentationTarget],
                sampler: PointSampler) -> Dict[str, torch.Tensor]:
        """Unweighted terms: ``loss_ce`` / ``loss_mask`` / ``loss_dice`` per stage (auxiliary i with ``_i``) and
        ``loss_contrastive`` (left out without text queries)."""
        losses = self.mask2former(output.predictions, targets, sampler)
        if output.text_queries is None:
            return losses
        losses["loss_contrastive"] = contrastive_loss(output.contrastive_queries, output.text_queries,
                                                      self.logit_scale)
        return losses

    def total(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        contrastive = losses.get("loss_contrastive")
        others = {name: value for name, value in losses.items() if name != "loss_contrastive"}
        total = self.mask2former.total(others)
        return total if contrastive is None else total + self.contrastive_weight * contrastive
