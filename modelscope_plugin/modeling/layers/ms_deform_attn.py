"""Multi-scale deformable attention (Deformable DETR), pure PyTorch.

The sampling is ``torch.nn.functional.grid_sample`` per level, numerically equal to the CUDA
kernels of detectron2 / mmcv / EasyCV up to float rounding; no compiled extension is needed.
Parameter names follow Deformable DETR (``sampling_offsets``, ``attention_weights``,
``value_proj``, ``output_proj``), which mmcv, EasyCV and detectron2 all share.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: List[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinearly samples every level at the given locations and sums with attention weights.

    Args:
        value: (batch, sum of H*W over levels, num_heads, head_dim)
        spatial_shapes: (height, width) of each level, in the order of ``value``.
        sampling_locations: (batch, num_queries, num_heads, num_levels, num_points, 2), x/y in [0, 1].
        attention_weights: (batch, num_queries, num_heads, num_levels, num_points), softmaxed.
    Returns:
        (batch, num_queries, num_heads * head_dim)
    """
    batch_size, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    value_per_level = value.split([height * width for height, width in spatial_shapes], dim=1)
    # grid_sample takes coordinates in [-1, 1]
    sampling_grids = 2 * sampling_locations - 1
    sampled_per_level = []
    for level, (height, width) in enumerate(spatial_shapes):
        # (batch, H*W, heads, head_dim) -> (batch * heads, head_dim, H, W)
        level_value = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch_size * num_heads, head_dim, height, width)
        # (batch, queries, heads, points, 2) -> (batch * heads, queries, points, 2)
        level_grid = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (batch * heads, head_dim, queries, points)
        sampled_per_level.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (batch, queries, heads, levels, points) -> (batch * heads, 1, queries, levels * points)
    attention_weights = attention_weights.transpose(1, 2).reshape(batch_size * num_heads, 1, num_queries, num_levels * num_points)
    # (batch * heads, head_dim, queries, levels * points) -> (batch, heads * head_dim, queries)
    output = (torch.stack(sampled_per_level, dim=-2).flatten(-2) * attention_weights).sum(-1)
    output = output.view(batch_size, num_heads * head_dim, num_queries)
    return output.transpose(1, 2).contiguous()


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over ``num_levels`` feature maps with ``num_points`` samples per head and level."""

    def __init__(self, embed_dim: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: offsets start on a ring of directions, growing with the point index."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        directions = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * torch.pi / self.num_heads)
        grid = torch.stack([directions.cos(), directions.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        for point in range(self.num_points):
            grid[:, :, point, :] *= point + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: List[Tuple[int, int]],
    ) -> torch.Tensor:
        """
        Args:
            query: (batch, num_queries, embed_dim), position encoding already added.
            reference_points: (batch, num_queries, num_levels, 2), normalised x/y in [0, 1].
            value_input: (batch, sum of H*W, embed_dim), the flattened feature maps.
            spatial_shapes: (height, width) per level.
        Returns:
            (batch, num_queries, embed_dim)
        """
        batch_size, num_queries, _ = query.shape
        value = self.value_proj(value_input)
        # (batch, sum H*W, heads, head_dim)
        value = value.view(batch_size, value.shape[1], self.num_heads, self.embed_dim // self.num_heads)
        # (batch, queries, heads, levels, points, 2)
        sampling_offsets = self.sampling_offsets(query).view(
            batch_size, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        # (batch, queries, heads, levels * points), softmax over all levels and points of a head
        attention_weights = self.attention_weights(query).view(
            batch_size, num_queries, self.num_heads, self.num_levels * self.num_points
        )
        attention_weights = attention_weights.softmax(-1).view(
            batch_size, num_queries, self.num_heads, self.num_levels, self.num_points
        )
        # offsets are in pixels of each level: divide by (width, height)
        offset_normalizer = torch.tensor(
            [[width, height] for height, width in spatial_shapes], dtype=query.dtype, device=query.device
        )
        sampling_locations = (
            reference_points[:, :, None, :, None, :]
            + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        )
        output = multi_scale_deformable_attention(value, spatial_shapes, sampling_locations, attention_weights)
        return self.output_proj(output)
