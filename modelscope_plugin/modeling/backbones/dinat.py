"""DiNAT backbone (Dilated Neighborhood Attention Transformer, Hassani & Shi, 2022) returning res2..res5 maps.

Neighbourhood attention lets every pixel attend to a ``kernel_size`` x ``kernel_size`` window of keys spaced
``dilation`` apart, with a learned relative position bias. Near the borders the window is not cut but shifted
inwards, so every pixel sees exactly ``kernel_size``² keys: along each axis, the pixels sharing a remainder modulo
the dilation form a sub-grid, and the window is clamped inside that sub-grid (NATTEN's definition). Here it is a
gather over those clamped windows in pure PyTorch, one kernel offset at a time (memory of one key map per step,
not ``kernel_size``² of them); no compiled kernel is used.

Blocks are pre-norm (attention, then an MLP, optional layer scales); maps smaller than ``kernel_size * dilation``
are zero-padded bottom/right for the attention and cropped back. The stem is two 3x3 stride-2 convolutions, each
stage but the last ends in a 3x3 stride-2 convolution doubling the channels, and every stage's output passes a
LayerNorm before it is returned.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from modelscope_plugin.modeling.backbones.swin import Mlp


def neighbourhood_windows(length: int, kernel_size: int, dilation: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Along one axis of ``length`` pixels: (length, kernel_size) key positions of each pixel's window, and
    (length, kernel_size) indices into the bias table's ``2 * kernel_size - 1`` relative offsets.

    Pixel i belongs to the sub-grid of positions with remainder i % dilation; on that sub-grid its window of
    ``kernel_size`` neighbours is centred on it and clamped to the sub-grid's ends."""
    if length < kernel_size * dilation:
        raise ValueError(f"{length} pixels are fewer than kernel_size * dilation = {kernel_size * dilation}")
    positions = torch.arange(length)
    remainder = positions % dilation
    sub_grid_position = positions // dilation
    # pixels on each sub-grid: ceil((length - remainder) / dilation)
    sub_grid_length = (length - remainder + dilation - 1) // dilation
    start = torch.minimum((sub_grid_position - kernel_size // 2).clamp(min=0), sub_grid_length - kernel_size)
    # (length, kernel_size) positions on the sub-grid
    neighbours = start[:, None] + torch.arange(kernel_size)[None, :]
    keys = neighbours * dilation + remainder[:, None]
    bias_index = neighbours - sub_grid_position[:, None] + kernel_size - 1
    return keys, bias_index


def neighbourhood_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            relative_position_bias: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """query, key, value: (B, heads, H, W, head_dim), the query already scaled; relative_position_bias: (heads,
    2K - 1, 2K - 1). Returns (B, heads, H, W, head_dim): softmax over each pixel's K x K window of query · key +
    bias, applied to the window's values."""
    height, width = query.shape[2:4]
    row_keys, row_bias = neighbourhood_windows(height, kernel_size, dilation)
    column_keys, column_bias = neighbourhood_windows(width, kernel_size, dilation)
    row_keys, row_bias = row_keys.to(query.device), row_bias.to(query.device)
    column_keys, column_bias = column_keys.to(query.device), column_bias.to(query.device)
    offsets = [(row, column) for row in range(kernel_size) for column in range(kernel_size)]
    scores = []
    for row, column in offsets:
        # (B, heads, H, W, head_dim): the key at this offset of every pixel's window
        window_key = key.index_select(2, row_keys[:, row]).index_select(3, column_keys[:, column])
        # (heads, H, W): the bias of that offset for every pixel
        bias = relative_position_bias[:, row_bias[:, row][:, None], column_bias[:, column][None, :]]
        scores.append((query * window_key).sum(-1) + bias)
    # (B, heads, H, W, K*K)
    probabilities = torch.stack(scores, dim=-1).softmax(dim=-1)
    attended = torch.zeros_like(query)
    for index, (row, column) in enumerate(offsets):
        window_value = value.index_select(2, row_keys[:, row]).index_select(3, column_keys[:, column])
        attended = attended + probabilities[..., index, None] * window_value
    return attended


class NeighbourhoodAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.relative_position_bias = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, H, W, C) -> (B, H, W, C)."""
        batch_size, height, width, channels = features.shape
        head_dim = channels // self.num_heads
        # (B, H, W, 3C) -> (3, B, heads, H, W, head_dim)
        qkv = self.qkv(features).view(batch_size, height, width, 3, self.num_heads, head_dim).permute(3, 0, 4, 1, 2, 5)
        query, key, value = qkv.unbind(0)
        attended = neighbourhood_attention(query * head_dim ** -0.5, key, value, self.relative_position_bias,
                                           self.kernel_size, self.dilation)
        # (B, heads, H, W, head_dim) -> (B, H, W, C)
        return self.proj(attended.permute(0, 2, 3, 1, 4).reshape(batch_size, height, width, channels))


class DinatBlock(nn.Module):
    """Pre-norm block: neighbourhood attention then MLP, each residual branch optionally scaled per channel."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int, mlp_ratio: float,
                 drop_path: float = 0.0, layer_scale_init: float = 0.0):
        super().__init__()
        self.window_size = kernel_size * dilation
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighbourhoodAttention(dim, num_heads, kernel_size, dilation)
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # (2, C): the attention branch's scale, then the MLP's; None without layer scales
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(2, dim)) if layer_scale_init > 0 else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, H, W, C)."""
        height, width = features.shape[1:3]
        normed = self.norm1(features)
        # zero-pad bottom/right up to one window where the map is smaller
        normed = F.pad(normed, (0, 0, 0, max(0, self.window_size - width), 0, max(0, self.window_size - height)))
        attended = self.attn(normed)[:, :height, :width]
        if self.layer_scale is not None:
            attended = self.layer_scale[0] * attended
        features = features + self.drop_path(attended)
        transformed = self.mlp(self.norm2(features))
        if self.layer_scale is not None:
            transformed = self.layer_scale[1] * transformed
        return features + self.drop_path(transformed)


class ConvDownsample(nn.Module):
    """3x3 stride-2 convolution (no bias) doubling the channels, then LayerNorm: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(features.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class DinatStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, kernel_size: int, dilations: Sequence[int],
                 mlp_ratio: float, drop_paths: Sequence[float], layer_scale_init: float, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            DinatBlock(dim, num_heads, kernel_size, dilations[index], mlp_ratio, drop_paths[index], layer_scale_init)
            for index in range(depth))
        self.downsample = ConvDownsample(dim) if downsample else None


class ConvPatchEmbed(nn.Module):
    """Two 3x3 stride-2 convolutions (to embed_dim / 2, then embed_dim), then LayerNorm: stride 4, (B, H/4, W/4, C)."""

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, embed_dim // 2, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.conv1(images)).permute(0, 2, 3, 1))


class Dinat(nn.Module):
    """DiNAT backbone. ``forward`` returns {"res2": (B, C, H/4, W/4), ..., "res5": (B, 8C, H/32, W/32)} (sizes
    rounded up at each stride-2 step)."""

    def __init__(self, embed_dim: int = 64, depths: Sequence[int] = (3, 4, 6, 5),
                 num_heads: Sequence[int] = (2, 4, 8, 16), kernel_size: int = 7,
                 dilations: Optional[Sequence[Sequence[int]]] = None, mlp_ratio: float = 3.0,
                 drop_path_rate: float = 0.0, layer_scale_init: float = 0.0, in_channels: int = 3):
        super().__init__()
        dilations = dilations or [[1] * depth for depth in depths]
        self.patch_embed = ConvPatchEmbed(in_channels, embed_dim)
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for stage_index, depth in enumerate(depths):
            first_block = sum(depths[:stage_index])
            self.layers.append(DinatStage(
                dim=embed_dim * 2 ** stage_index, depth=depth, num_heads=num_heads[stage_index],
                kernel_size=kernel_size, dilations=dilations[stage_index], mlp_ratio=mlp_ratio,
                drop_paths=drop_paths[first_block:first_block + depth], layer_scale_init=layer_scale_init,
                downsample=stage_index < len(depths) - 1,
            ))
        self.out_channels: Dict[str, int] = {f"res{index + 2}": embed_dim * 2 ** index for index in range(len(depths))}
        self.out_strides: Dict[str, int] = {f"res{index + 2}": 4 * 2 ** index for index in range(len(depths))}
        for index in range(len(depths)):
            self.add_module(f"norm{index}", nn.LayerNorm(embed_dim * 2 ** index))

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.patch_embed(images)
        outputs: Dict[str, torch.Tensor] = {}
        stages: List[DinatStage] = list(self.layers)
        for stage_index, stage in enumerate(stages):
            for block in stage.blocks:
                features = block(features)
            # (B, H, W, C) -> (B, C, H, W)
            outputs[f"res{stage_index + 2}"] = getattr(self, f"norm{stage_index}")(features).permute(
                0, 3, 1, 2).contiguous()
            if stage.downsample is not None:
                features = stage.downsample(features)
        return outputs
