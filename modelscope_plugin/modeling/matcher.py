"""Hungarian matching of queries to ground-truth segments (Mask2Former's ``HungarianMatcher``).

Cost of query q for target t, per image: ``class_weight * -P_q(label_t) + mask_weight * BCE(q, t) + dice_weight *
dice(q, t)``, both mask terms on the same K uniform points for every prediction and target of the image. Further
terms (FastInst's location cost) come in as ``additional_costs``: one (Q, T) matrix per image, already weighted.
The assignment is scipy's ``linear_sum_assignment``.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from modelscope_plugin.modeling.point_sampling import PointSampler, point_sample


@dataclass
class SegmentationTarget:
    """Ground truth of one image, in the network input's frame (resized, augmented, padded)."""

    labels: torch.Tensor
    """(T,) int64 contiguous class indices."""
    masks: torch.Tensor
    """(T, H, W) 0/1 float masks over the padded input (H, W = the input tensor's size)."""


def pairwise_sigmoid_cross_entropy(point_logits: torch.Tensor, point_targets: torch.Tensor) -> torch.Tensor:
    """(Q, K) logits, (T, K) 0/1 targets -> (Q, T) mean over points of the binary cross-entropy."""
    num_points = point_logits.shape[1]
    positive = F.binary_cross_entropy_with_logits(point_logits, torch.ones_like(point_logits), reduction="none")
    negative = F.binary_cross_entropy_with_logits(point_logits, torch.zeros_like(point_logits), reduction="none")
    return (positive @ point_targets.T + negative @ (1 - point_targets).T) / num_points


def pairwise_dice(point_logits: torch.Tensor, point_targets: torch.Tensor) -> torch.Tensor:
    """(Q, K) logits, (T, K) 0/1 targets -> (Q, T) dice loss 1 - (2|p t| + 1) / (|p| + |t| + 1)."""
    probabilities = point_logits.sigmoid()
    numerator = 2 * probabilities @ point_targets.T
    denominator = probabilities.sum(-1)[:, None] + point_targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising the weighted class + mask BCE + dice cost (weights 2 / 5 / 5, K = 12544)."""

    def __init__(self, class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 num_points: int = 12544):
        super().__init__()
        if class_weight == 0 and mask_weight == 0 and dice_weight == 0:
            raise ValueError("at least one matching cost weight must be non-zero")
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, target: SegmentationTarget,
                    points: torch.Tensor) -> torch.Tensor:
        """One image: (Q, C + 1) logits, (Q, h, w) mask logits, (1, K, 2) points -> (Q, T) weighted cost."""
        class_cost = -class_logits.float().softmax(-1)[:, target.labels]
        masks = mask_logits.float()
        target_masks = target.masks.to(masks)
        # (Q, 1, K) -> (Q, K) and (T, 1, K) -> (T, K): the same points for predictions and targets
        point_logits = point_sample(masks[:, None], points.expand(masks.shape[0], -1, -1))[:, 0]
        point_targets = point_sample(target_masks[:, None], points.expand(target_masks.shape[0], -1, -1))[:, 0]
        return (self.mask_weight * pairwise_sigmoid_cross_entropy(point_logits, point_targets)
                + self.class_weight * class_cost + self.dice_weight * pairwise_dice(point_logits, point_targets))

    @torch.no_grad()
    def forward(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: Sequence[SegmentationTarget],
                sampler: PointSampler, additional_costs: Optional[Sequence[torch.Tensor]] = None
                ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """class_logits (B, Q, C + 1), mask_logits (B, Q, h, w) -> per image (query indices, target indices).

        Each image's K points come from ``sampler``'s generator of that image. A NaN / infinite cost becomes the
        largest float, so a broken prediction is only matched when nothing else can be.
        """
        if len(targets) != class_logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {class_logits.shape[0]} images")
        indices = []
        for image_index, target in enumerate(targets):
            points = sampler.uniform(image_index, 1, self.num_points, mask_logits.device)
            if target.labels.numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(class_logits[image_index], mask_logits[image_index], target, points)
            if additional_costs is not None:
                cost = cost + additional_costs[image_index].to(cost)
            largest = torch.finfo(cost.dtype).max
            cost = torch.nan_to_num(cost, nan=largest, posinf=largest, neginf=largest)
            query_indices, target_indices = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(query_indices, dtype=torch.int64),
                            torch.as_tensor(target_indices, dtype=torch.int64)))
        return indices
