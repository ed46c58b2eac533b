"""Multi-scale deformable attention (Deformable DETR), pure PyTorch.

The bilinear sampling equals ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` and the
CUDA kernels of detectron2 / mmcv / EasyCV up to float rounding, with no compiled extension. It is written as one
``embedding_bag`` (a weighted sum of gathered rows) instead of a ``grid_sample`` per level: the values are laid
out (token, head) -> row of head_dim contiguous channels, so every bilinear corner is one contiguous read and the
attention weights are folded into the bilinear weights, with no (queries × levels × points × channels)
intermediate. On CPU its forward is several times faster than ``grid_sample`` (benchmarks/README.md); its backward
(a scatter into the value table) is about 4x slower than ``grid_sample``'s, so when gradients are recorded the layer
uses the one-``grid_sample``-per-level formulation (``multi_scale_deformable_attention_grid_sample``, the same
function and gradients to float rounding). Parameter names follow Deformable DETR (``sampling_offsets``,
``attention_weights``, ``value_proj``, ``output_proj``), which mmcv, EasyCV and detectron2 all share.
"""
from typing import List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from modelscope_plugin.modeling.layers.row_groups import in_inference

# Zero border around each level's value map: one row/column before and two after. Sampling positions are clamped
# to [-1, size] in pixel units, which changes no result (beyond that every corner falls outside the map and
# contributes zero), so all four corners of every clamped position land inside the bordered map.
BORDER_BEFORE, BORDER_AFTER = 1, 2

# Sampling points (batch x queries x heads x levels x points) the layer computes at once in inference: about 2 MiB of
# corner rows and weights at a time.
SAMPLES_PER_QUERY_GROUP = 2 ** 17


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 / bfloat16 -> float32; other dtypes unchanged."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def upcast_half(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in ``upcast_dtype`` (itself where that is its dtype)."""
    return tensor.to(upcast_dtype(tensor.dtype))


def per_level(values: list, num_points: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-level numbers (or pairs) -> (levels, num_points) (or (levels, num_points, 2)), repeated over the points."""
    table = torch.tensor(values, dtype=dtype, device=device)
    return table[:, None].expand(table.shape[0], num_points, *table.shape[1:]).contiguous()


class BorderedValues(NamedTuple):
    """Every level's value map with a zero border, as the table ``sample_bordered_values`` gathers rows from."""

    table: torch.Tensor  # (batch * tokens_per_image * num_heads, head_dim): row (image, bordered token, head)
    tokens_per_image: int  # bordered tokens of all levels
    num_heads: int
    spatial_shapes: List[Tuple[int, int]]  # (height, width) of each level, unbordered


def bordered_values(value: torch.Tensor, spatial_shapes: List[Tuple[int, int]]) -> BorderedValues:
    """value: (batch, sum of H*W over levels, num_heads, head_dim), levels in the order of ``spatial_shapes``."""
    batch_size, _, num_heads, head_dim = value.shape
    # per level (batch, H*W, heads, head_dim) -> (batch, (H + 3) * (W + 3), heads * head_dim) with a zero border
    bordered_levels = [
        F.pad(level_value.reshape(batch_size, height, width, num_heads * head_dim),
              (0, 0, BORDER_BEFORE, BORDER_AFTER, BORDER_BEFORE, BORDER_AFTER)).flatten(1, 2)
        for level_value, (height, width) in zip(value.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes)
    ]
    table = torch.cat(bordered_levels, dim=1)
    return BorderedValues(table.view(-1, head_dim), table.shape[1], num_heads, list(spatial_shapes))


def sample_bordered_values(
    values: BorderedValues,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """``multi_scale_deformable_attention`` on values laid out by ``bordered_values``; arguments and result as there."""
    table, tokens_per_image, num_heads, spatial_shapes = values
    head_dim = table.shape[1]
    batch_size, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    device, dtype = table.device, sampling_locations.dtype
    border = BORDER_BEFORE + BORDER_AFTER
    index_dtype = torch.int32 if table.shape[0] < 2 ** 31 else torch.int64  # half the bytes of int64 indices

    # Per-level constants span every trailing dimension they meet, (levels, points[, 2]): torch's elementwise
    # kernels vectorise along the innermost dimension only, and a (levels, 1, 2) operand made these passes ~8x slower.
    sizes = per_level([[width, height] for height, width in spatial_shapes], num_points, dtype, device)
    bordered_widths = per_level([width + border for _, width in spatial_shapes], num_points, index_dtype, device)
    bordered_sizes = [(height + border) * (width + border) for height, width in spatial_shapes]
    level_starts = per_level([sum(bordered_sizes[:level]) for level in range(num_levels)], num_points, index_dtype,
                             device)
    # pixel x / y (align_corners=False: pixel centres at i + 0.5), clamped, then shifted into the bordered map;
    # (batch, queries, heads, levels, points, 2)
    position = (sampling_locations * sizes - 0.5).clamp(min=-1.0).minimum(sizes) + BORDER_BEFORE
    corner = position.floor()
    fraction = position - corner
    corner = corner.to(index_dtype)
    # (batch, queries, heads, levels, points): table row of each top-left corner
    top_left_rows = corner[..., 1] * bordered_widths
    top_left_rows.add_(corner[..., 0]).add_(level_starts)
    top_left_rows.add_(torch.arange(batch_size, dtype=index_dtype, device=device).view(batch_size, 1, 1, 1, 1)
                       * tokens_per_image)
    top_left_rows.mul_(num_heads).add_(
        torch.arange(num_heads, dtype=index_dtype, device=device).view(num_heads, 1, 1).expand(
            num_heads, num_levels, num_points))
    # (batch, queries, heads, levels, points, 4): rows of the corners top-left, top-right, bottom-left, bottom-right,
    # each written as one plane (faster than broadcasting against a trailing dimension of 4)
    corner_rows = torch.empty(top_left_rows.shape + (4,), dtype=index_dtype, device=device)
    corner_rows[..., 0] = top_left_rows
    torch.add(top_left_rows, num_heads, out=corner_rows[..., 1])
    bottom_left_rows = top_left_rows.add_(bordered_widths * num_heads)
    corner_rows[..., 2] = bottom_left_rows
    torch.add(bottom_left_rows, num_heads, out=corner_rows[..., 3])
    column_fraction, row_fraction = fraction[..., 0], fraction[..., 1]
    top_weights = attention_weights * (1 - row_fraction)
    bottom_weights = attention_weights * row_fraction
    left_weights = 1 - column_fraction
    corner_weights = torch.stack((top_weights * left_weights, top_weights * column_fraction,
                                  bottom_weights * left_weights, bottom_weights * column_fraction), dim=-1)
    # one bag per (image, query, head) of levels * points * 4 weighted rows
    output = F.embedding_bag(
        corner_rows.view(batch_size * num_queries * num_heads, -1), table,
        per_sample_weights=corner_weights.view(batch_size * num_queries * num_heads, -1).to(table.dtype), mode="sum",
    )
    # (batch * queries * heads, head_dim) -> (batch, queries, heads * head_dim)
    return output.view(batch_size, num_queries, num_heads * head_dim)


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
    return sample_bordered_values(bordered_values(value, spatial_shapes), sampling_locations, attention_weights)


def multi_scale_deformable_attention_grid_sample(
    value: torch.Tensor,
    spatial_shapes: List[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """``multi_scale_deformable_attention`` with one ``grid_sample`` per level (Deformable DETR's PyTorch
    formulation); arguments and result as there. Used for training, where its backward is the faster one."""
    batch_size, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # grid_sample's grid is in [-1, 1]
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # (batch * heads, queries, levels, points, 2)
    sampled_levels = []
    for level, (level_value, (height, width)) in enumerate(
            zip(value.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes)):
        # (batch, H*W, heads, head_dim) -> (batch * heads, head_dim, H, W)
        level_value = level_value.permute(0, 2, 3, 1).reshape(batch_size * num_heads, head_dim, height, width)
        # (batch * heads, head_dim, queries, points)
        sampled_levels.append(F.grid_sample(level_value, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                            align_corners=False))
    # (batch * heads, 1, queries, levels * points)
    weights = attention_weights.transpose(1, 2).reshape(batch_size * num_heads, 1, num_queries, num_levels * num_points)
    output = (torch.cat(sampled_levels, dim=-1) * weights).sum(-1)  # (batch * heads, head_dim, queries)
    return output.view(batch_size, num_heads * head_dim, num_queries).transpose(1, 2)


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

        Sampling positions and attention weights are computed in float32 (float64 stays float64) even under
        autocast, as detectron2 and mmcv do: in half precision they would be off by a fraction of a pixel. The rest
        runs in float32 too, except in inference under bfloat16 autocast, where the four projections run in
        bfloat16 (as in detectron2, whose float32 ends at the sampling kernel) and the value table is gathered in
        bfloat16 (products summed in float32).
        """
        device_type = query.device.type
        if (torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16
                and not torch.is_grad_enabled()):
            return self._forward(query, reference_points, value_input, spatial_shapes, position_dtype=torch.float32)
        with torch.autocast(device_type=device_type, enabled=False):
            query = upcast_half(query)
            return self._forward(query, reference_points, upcast_half(value_input), spatial_shapes,
                                 position_dtype=query.dtype)

    def _forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_input: torch.Tensor,
                 spatial_shapes: List[Tuple[int, int]], position_dtype: torch.dtype) -> torch.Tensor:
        """``position_dtype``: the dtype of the sampling offsets, positions and attention weights."""
        batch_size, num_queries, _ = query.shape
        value = self.value_proj(value_input)
        # (batch, sum H*W, heads, head_dim)
        value = value.view(batch_size, value.shape[1], self.num_heads, self.embed_dim // self.num_heads)
        if torch.is_grad_enabled() and value.requires_grad:
            sampling_locations, attention_weights = self._sampling(query, reference_points, spatial_shapes,
                                                                   position_dtype)
            output = multi_scale_deformable_attention_grid_sample(value, spatial_shapes, sampling_locations,
                                                                  attention_weights)
            return self.output_proj(output)
        # The queries in groups: a group's positions, corners and weights stay in the CPU's cache, and fresh
        # allocations stay small (large ones are page-faulted in again on every call). One group when traced or
        # exported, where the loop would be unrolled into the graph.
        values = bordered_values(value, spatial_shapes)
        samples_per_query = batch_size * self.num_heads * self.num_levels * self.num_points
        group_size = max(1, SAMPLES_PER_QUERY_GROUP // samples_per_query) if in_inference(value) else num_queries
        outputs = []
        for group_start in range(0, num_queries, group_size):
            group = slice(group_start, group_start + group_size)
            sampling_locations, attention_weights = self._sampling(query[:, group], reference_points[:, group],
                                                                   spatial_shapes, position_dtype)
            outputs.append(sample_bordered_values(values, sampling_locations, attention_weights))
        return self.output_proj(torch.cat(outputs, 1) if len(outputs) > 1 else outputs[0])

    def _sampling(self, query: torch.Tensor, reference_points: torch.Tensor, spatial_shapes: List[Tuple[int, int]],
                  position_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sampling locations (batch, queries, heads, levels, points, 2) and softmaxed attention weights (batch,
        queries, heads, levels, points), in ``position_dtype``."""
        batch_size, num_queries, _ = query.shape
        # (batch, queries, heads, levels, points, 2)
        sampling_offsets = self.sampling_offsets(query).to(position_dtype).view(
            batch_size, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        # (batch, queries, heads, levels * points), softmax over all levels and points of a head
        attention_weights = self.attention_weights(query).to(position_dtype).view(
            batch_size, num_queries, self.num_heads, self.num_levels * self.num_points
        )
        attention_weights = attention_weights.softmax(-1).view(
            batch_size, num_queries, self.num_heads, self.num_levels, self.num_points
        )
        # offsets are in pixels of each level: divide by (width, height); both operands span the trailing
        # (levels, points, 2) dimensions (see ``sample_bordered_values``)
        offset_normalizer = per_level([[width, height] for height, width in spatial_shapes], self.num_points,
                                      position_dtype, query.device)
        # (batch, queries, 1, levels, points, 2)
        reference_points = reference_points.to(position_dtype)[:, :, None, :, None, :].expand(
            -1, -1, 1, -1, self.num_points, -1).contiguous()
        return reference_points + sampling_offsets / offset_normalizer, attention_weights
