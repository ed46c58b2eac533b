"""Mask2Former's training loss (``SetCriterion`` of facebookresearch/Mask2Former, mmdet's ``Mask2FormerHead.loss``).

Per decoder stage (the final one and every auxiliary one, each matched on its own): cross-entropy over the
classes with the "no object" class weighted 0.1, and for matched queries the binary cross-entropy and dice loss
on K = 12544 points chosen by uncertainty (3x oversampling, 75 % importance-sampled). Mask terms are summed over
masks and divided by the number of target masks, averaged across ranks when torch.distributed is initialised and
clamped to at least 1; the cross-entropy's weight total is averaged across ranks the same way (a deliberate
difference from detectron2's per-GPU mean, identical on one process), so N ranks compute the loss of the global
batch. Returned terms are unweighted (names as detectron2: ``loss_ce``, ``loss_mask``,
``loss_dice``, auxiliary stage i with the suffix ``_i``); ``total`` applies the weights 2 / 5 / 5.
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as distributed
import torch.nn.functional as F
from torch import nn

from modelscope_plugin.modeling.mask2former.model import Mask2FormerOutput
from modelscope_plugin.modeling.matcher import HungarianMatcher, SegmentationTarget
from modelscope_plugin.modeling.point_sampling import PointSampler, point_sample, uncertain_point_coordinates

MatchIndices = List[Tuple[torch.Tensor, torch.Tensor]]


def sigmoid_cross_entropy_loss(point_logits: torch.Tensor, point_targets: torch.Tensor) -> torch.Tensor:
    """(N, K) -> sum over masks of the mean over points of the binary cross-entropy."""
    return F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none").mean(1).sum()


def dice_loss(point_logits: torch.Tensor, point_targets: torch.Tensor) -> torch.Tensor:
    """(N, K) -> sum over masks of 1 - (2|p t| + 1) / (|p| + |t| + 1)."""
    probabilities = point_logits.sigmoid()
    numerator = 2 * (probabilities * point_targets).sum(-1)
    denominator = probabilities.sum(-1) + point_targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum()


def global_normalisers(targets: Sequence[SegmentationTarget], num_queries: int, no_object_weight: float,
                       device: torch.device) -> Tuple[float, float]:
    """(number of target masks, total cross-entropy class weight) of the local batch, averaged over ranks with
    one all-reduce when torch.distributed is initialised; the mask count is clamped to at least 1.

    Every query is matched to a target or to "no object" (weight ``no_object_weight``), min(Q, T) of them to
    targets, so the class-weight total is known before matching and is the same for every decoder stage.
    """
    matched = [min(num_queries, int(target.labels.numel())) for target in targets]
    totals = torch.tensor([float(sum(int(target.labels.numel()) for target in targets)),
                           sum(count + (num_queries - count) * no_object_weight for count in matched)],
                          dtype=torch.float64, device=device)
    if distributed.is_available() and distributed.is_initialized():
        distributed.all_reduce(totals)
        totals /= distributed.get_world_size()
    num_masks, class_weight_total = totals.tolist()
    return max(num_masks, 1.0), class_weight_total


class Mask2FormerCriterion(nn.Module):
    def __init__(self, num_classes: int, matcher: HungarianMatcher, class_weight: float = 2.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, no_object_weight: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def class_loss(self, class_logits: torch.Tensor, targets: Sequence[SegmentationTarget], indices: MatchIndices,
                   class_weight_total: float) -> torch.Tensor:
        """Weighted-mean cross-entropy; unmatched queries are "no object" (index num_classes). The weighted sum is
        divided by the rank-averaged weight total: on one process that is ``F.cross_entropy``'s weighted mean, on
        N ranks the mean over ranks equals the weighted mean over the global batch."""
        batch_size, num_queries = class_logits.shape[:2]
        target_classes = torch.full((batch_size, num_queries), self.num_classes, dtype=torch.int64,
                                    device=class_logits.device)
        for image_index, ((query_indices, target_indices), target) in enumerate(zip(indices, targets)):
            target_classes[image_index, query_indices.to(class_logits.device)] = \
                target.labels.to(class_logits.device)[target_indices.to(target.labels.device)]
        # cross_entropy wants classes on dim 1: (B, Q, C + 1) -> (B, C + 1, Q)
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, self.class_weights,
                               reduction="sum") / class_weight_total

    def mask_losses(self, mask_logits: torch.Tensor, targets: Sequence[SegmentationTarget], indices: MatchIndices,
                    num_masks: float, sampler: PointSampler) -> Dict[str, torch.Tensor]:
        """Point-sampled BCE and dice of the matched (query, target) pairs, each image on its own points."""
        mask_total = mask_logits.new_zeros((), dtype=torch.float32)
        dice_total = mask_logits.new_zeros((), dtype=torch.float32)
        for image_index, ((query_indices, target_indices), target) in enumerate(zip(indices, targets)):
            draw = sampler.for_image(image_index, mask_logits.device)
            # (n, h, w) -> (n, 1, h, w)
            predicted = mask_logits[image_index, query_indices.to(mask_logits.device)].float()[:, None]
            matched_targets = target.masks[target_indices.to(target.masks.device)].to(predicted)[:, None]
            with torch.no_grad():
                points = uncertain_point_coordinates(predicted, self.num_points, self.oversample_ratio,
                                                     self.importance_sample_ratio, draw)
                point_targets = point_sample(matched_targets, points)[:, 0]
            point_logits = point_sample(predicted, points)[:, 0]
            mask_total = mask_total + sigmoid_cross_entropy_loss(point_logits, point_targets)
            dice_total = dice_total + dice_loss(point_logits, point_targets)
        return {"loss_mask": mask_total / num_masks, "loss_dice": dice_total / num_masks}

    def stage_losses(self, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                     targets: Sequence[SegmentationTarget], num_masks: float, class_weight_total: float,
                     sampler: PointSampler) -> Tuple[Dict[str, torch.Tensor], MatchIndices]:
        indices = self.matcher(class_logits, mask_logits, targets, sampler)
        losses = self.mask_losses(mask_logits, targets, indices, num_masks, sampler)
        losses["loss_ce"] = self.class_loss(class_logits, targets, indices, class_weight_total)
        return losses, indices

    def forward(self, output: Mask2FormerOutput, targets: Sequence[SegmentationTarget],
                sampler: PointSampler) -> Dict[str, torch.Tensor]:
        """Unweighted loss terms of the final stage and of every auxiliary stage (deep supervision)."""
        num_masks, class_weight_total = global_normalisers(targets, output.class_logits.shape[1],
                                                           float(self.class_weights[-1]), output.class_logits.device)
        stages = [(output.class_logits, output.mask_logits, "")] + [
            (class_logits, mask_logits, f"_{stage}") for stage, (class_logits, mask_logits)
            in enumerate(zip(output.auxiliary_class_logits, output.auxiliary_mask_logits))]
        losses: Dict[str, torch.Tensor] = {}
        for class_logits, mask_logits, suffix in stages:
            stage_losses, _ = self.stage_losses(class_logits, mask_logits, targets, num_masks, class_weight_total,
                                                sampler)
            losses.update({name + suffix: value for name, value in stage_losses.items()})
        return losses

    def total(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the terms ``forward`` returned (each stage weighted alike)."""
        return sum(self.weights[name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name] * value
                   for name, value in losses.items())
