"""FastInst's training-time extras for bipartite matching (official ``fastinst/modeling/matcher.py``, decoder).

- The location cost: a query (or a proposal pixel) may only be matched cheaply to an instance it lies inside.
  The matcher adds ``cost_location`` (1000 in the released configs) times these -1 / 0 matrices, so matches to
  instances a query does not sit in are effectively forbidden.
- The ground-truth attention mask of mask-guided learning: matched queries attend only inside their instance.
"""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F


def query_location_cost(query_locations: torch.Tensor, target_masks: torch.Tensor) -> torch.Tensor:
    """(Q, 2) normalised (x, y) query locations, (N, H, W) target masks -> (Q, N) cost: -1 where the bilinearly
    sampled mask at the query's location is > 0, else 0 (detectron2 ``point_sample``, align_corners=False)."""
    # (Q, 2) in [0, 1] -> (1, Q, 1, 2) grid in [-1, 1]
    grid = (2.0 * query_locations - 1.0)[None, :, None, :]
    # (N, H, W) -> (1, N, H, W) -> sampled (1, N, Q, 1)
    sampled = F.grid_sample(target_masks[None].to(query_locations.dtype), grid, mode="bilinear", align_corners=False)
    inside = (sampled[0, :, :, 0] > 0).to(query_locations.dtype)
    return -inside.transpose(0, 1)


def proposal_location_cost(proposal_size: Tuple[int, int], target_masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) target masks -> (h*w, N) cost for the auxiliary class head's pixels: -1 where the mask, average-
    pooled to the stride-16 proposal map, is > 0 (the pixel covers part of the instance), else 0."""
    height, width = proposal_size
    if target_masks.shape[0] == 0:
        return target_masks.new_zeros((height * width, 0), dtype=torch.float32)
    pooled = F.adaptive_avg_pool2d(target_masks[None].float(), output_size=(height, width))[0]
    # (N, h, w) -> (h*w, N)
    return -(pooled > 0).float().flatten(1).transpose(0, 1)


def ground_truth_attention_mask(target_masks: Sequence[torch.Tensor],
                                matches: Sequence[Tuple[torch.Tensor, torch.Tensor]], num_queries: int,
                                num_aux_queries: int, pixel_size: Tuple[int, int]) -> torch.Tensor:
    """Mask-guided learning's attention mask: (B, Q + aux, h*w) bool, True = not attended (by any head).

    target_masks: per image (N, H, W) masks padded like the input; matches: per image (query indices, target
    indices) from the last layer's matching. A matched query attends inside its instance (nearest-resized to the
    stride-8 map); unmatched and auxiliary queries, and matched ones whose resized instance is empty, attend everywhere.
    """
    batch_size = len(target_masks)
    blocked = torch.zeros((batch_size, num_queries + num_aux_queries, *pixel_size), dtype=torch.bool,
                          device=target_masks[0].device if batch_size else None)
    for image_index, (masks, (query_indices, target_indices)) in enumerate(zip(target_masks, matches)):
        if masks.shape[0] == 0 or len(query_indices) == 0:
            continue
        resized = F.interpolate(masks[None].float(), size=pixel_size, mode="nearest")[0].bool()
        blocked[image_index, query_indices] = ~resized[target_indices]
    # (B, Q + aux, h, w) -> (B, Q + aux, h*w)
    blocked = blocked.flatten(2)
    return blocked & ~blocked.all(-1, keepdim=True)
