"""Point-sampled mask losses (PointRend, Kirillov et al. 2020; used by Mask2Former §3.3 and FastInst).

Masks are compared at K points in normalised [0, 1]^2 image coordinates instead of at every pixel, so predictions
(stride 4) and targets (full resolution) need no resizing. Random points come from a ``PointSampler`` that draws
each image's points from that image's own ``torch.Generator``: the points can be fixed (tests inject them), and
they do not depend on how a global batch is split over ranks (each image keeps its generator wherever it runs).
"""
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

# (count, num_points) -> (count, num_points, 2) uniform coordinates in [0, 1)
UniformDraw = Callable[[int, int], torch.Tensor]


def point_sample(features: torch.Tensor, coordinates: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Bilinear samples of ``features`` (N, C, H, W) at ``coordinates`` (N, P, 2), (x, y) in [0, 1] -> (N, C, P).

    detectron2's ``point_sample``: ``grid_sample`` of 2 * coordinates - 1, zero outside the map.
    """
    # (N, P, 2) -> (N, P, 1, 2): grid_sample wants a 2-D grid
    grid = 2.0 * coordinates[:, :, None, :] - 1.0
    # (N, C, P, 1) -> (N, C, P)
    return F.grid_sample(features, grid, align_corners=align_corners)[..., 0]


class PointSampler:
    """Uniform points per image, each image from its own generator (CPU draws, moved to the tensors' device)."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int]) -> "PointSampler":
        return cls([torch.Generator().manual_seed(int(seed)) for seed in seeds])

    def uniform(self, image_index: int, count: int, num_points: int,
                device: Optional[torch.device] = None) -> torch.Tensor:
        """(count, num_points, 2) uniform in [0, 1) from image ``image_index``'s generator."""
        if not 0 <= image_index < len(self.generators):
            raise IndexError(f"point sampler has {len(self.generators)} image generators; image {image_index} asked")
        points = torch.rand((count, num_points, 2), generator=self.generators[image_index])
        return points.to(device) if device is not None else points

    def for_image(self, image_index: int, device: Optional[torch.device] = None) -> UniformDraw:
        return lambda count, num_points: self.uniform(image_index, count, num_points, device)


def uncertainty(mask_logits: torch.Tensor) -> torch.Tensor:
    """Mask2Former's point uncertainty: -|logit| (highest at the decision boundary)."""
    return -mask_logits.abs()


def uncertain_point_coordinates(mask_logits: torch.Tensor, num_points: int, oversample_ratio: float,
                                importance_sample_ratio: float, draw: UniformDraw) -> torch.Tensor:
    """PointRend's ``get_uncertain_point_coords_with_randomness``: (N, 1, H, W) logits -> (N, num_points, 2).

    Draws num_points * oversample_ratio uniform candidates, keeps the int(importance_sample_ratio * num_points)
    most uncertain of them and fills the rest with fresh uniform points (candidates first, then fresh ones).
    """
    count = mask_logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    candidates = draw(count, num_candidates)
    # (N, 1, num_candidates) -> (N, num_candidates)
    candidate_uncertainty = uncertainty(point_sample(mask_logits, candidates))[:, 0]
    num_uncertain = int(importance_sample_ratio * num_points)
    chosen = candidate_uncertainty.topk(num_uncertain, dim=1).indices
    # (N, num_uncertain) -> (N, num_uncertain, 2) indices into the candidates' coordinates
    coordinates = torch.gather(candidates, 1, chosen[:, :, None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        coordinates = torch.cat([coordinates, draw(count, num_random)], dim=1)
    return coordinates
