"""Mask2Former's multi-scale deformable-attention pixel decoder.

A deformable-attention encoder over the three coarsest backbone levels, then an FPN step that adds the
finest level. Parameter names follow detectron2's ``MSDeformAttnPixelDecoder`` (EasyCV's is identical).
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from modelscope_plugin.modeling.layers.cpu_bf16 import channels_last_in_bf16, cpu_bf16_inference
from modelscope_plugin.modeling.layers.ms_deform_attn import (
    MultiScaleDeformableAttention,
    upcast_dtype,
    upcast_half,
)
from modelscope_plugin.modeling.layers.position_encoding import SinePositionEncoding
from modelscope_plugin.modeling.layers.row_groups import map_row_groups


class ConvNormActivation(nn.Conv2d):
    """detectron2's ``Conv2d`` with ``norm`` (and an optional ReLU) after it: keys ``weight``, ``norm.weight``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_groups: int, relu: bool):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(num_groups, out_channels)
        self.relu = relu

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.norm(super().forward(features))
        return F.relu(features, inplace=True) if self.relu else features


def half_for_autocast(feature: torch.Tensor) -> torch.Tensor:
    """A backbone map for a projection: float32 where it is half precision, except in CPU bf16 inference, where
    autocast casts the projection's input to bf16 again (the same values without the round trip)."""
    return feature if cpu_bf16_inference(feature) else upcast_half(feature)


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention then a ReLU feed-forward block."""

    def __init__(self, embed_dim: int, num_heads: int, feedforward_dim: int, num_levels: int, num_points: int,
                 dropout: float):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dim, num_levels, num_heads, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.linear1 = nn.Linear(embed_dim, feedforward_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(feedforward_dim, embed_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(self, tokens, position, reference_points, spatial_shapes):
        attended = self.self_attn(tokens + position, reference_points, tokens, spatial_shapes)
        tokens = self.norm1(tokens + self.dropout1(attended))

        def feedforward(rows: torch.Tensor) -> torch.Tensor:
            transformed = self.linear2(self.dropout2(F.relu(self.linear1(rows), inplace=True)))
            return self.norm2(rows + self.dropout3(transformed))

        # in inference over groups of tokens, into ``tokens`` (a new tensor): the hidden layer is 43 MB at 800x1333
        return map_row_groups(feedforward, tokens, self.linear1.out_features, out=tokens)


class DeformableEncoder(nn.Module):
    def __init__(self, layers: List[DeformableEncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class DeformableTransformer(nn.Module):
    """Holds the encoder and the per-level embedding (detectron2's ``MSDeformAttnTransformerEncoderOnly``)."""

    def __init__(self, embed_dim: int, num_heads: int, feedforward_dim: int, num_layers: int, num_levels: int,
                 num_points: int = 4, dropout: float = 0.0):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(num_levels, embed_dim))
        nn.init.normal_(self.level_embed)
        self.encoder = DeformableEncoder(
            [DeformableEncoderLayer(embed_dim, num_heads, feedforward_dim, num_levels, num_points, dropout)
             for _ in range(num_layers)]
        )
        for parameter in self.encoder.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        for layer in self.encoder.layers:
            layer.self_attn.reset_parameters()

    @staticmethod
    def reference_points(spatial_shapes: Sequence[Tuple[int, int]], batch_size: int, num_levels: int,
                         device) -> torch.Tensor:
        """Pixel centres of every level, normalised to [0, 1]: (batch, sum H*W, num_levels, 2)."""
        points = []
        for height, width in spatial_shapes:
            y, x = torch.meshgrid(
                torch.linspace(0.5, height - 0.5, height, dtype=torch.float32, device=device) / height,
                torch.linspace(0.5, width - 0.5, width, dtype=torch.float32, device=device) / width,
                indexing="ij",
            )
            points.append(torch.stack((x.reshape(-1), y.reshape(-1)), -1))
        # every image is unpadded inside its own tensor, so valid ratios are 1 and each query uses the same point on
        # all levels
        return torch.cat(points, 0)[None, :, None, :].expand(batch_size, -1, num_levels, -1)

    def forward(self, sources: List[torch.Tensor], positions: List[torch.Tensor]) -> torch.Tensor:
        """sources/positions: per level (B, C, H, W), coarsest first. Returns (B, sum H*W, C)."""
        spatial_shapes = [tuple(source.shape[-2:]) for source in sources]
        # (B, C, H, W) -> (B, H*W, C), level embedding added to the position
        tokens = torch.cat([source.flatten(2).transpose(1, 2) for source in sources], 1)
        position = torch.cat(
            [position.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
             for level, position in enumerate(positions)], 1
        )
        reference_points = self.reference_points(spatial_shapes, tokens.shape[0], len(sources), tokens.device)
        for layer in self.encoder.layers:
            tokens = layer(tokens, position, reference_points, spatial_shapes)
        return tokens


class MSDeformAttnPixelDecoder(nn.Module):
    """Backbone features -> (mask features at stride 4, three multi-scale features coarsest first)."""

    def __init__(self, in_channels: Dict[str, int], in_strides: Dict[str, int], conv_dim: int = 256,
                 mask_dim: int = 256, num_heads: int = 8, feedforward_dim: int = 1024, num_encoder_layers: int = 6,
                 num_points: int = 4, transformer_in_features: Sequence[str] = ("res3", "res4", "res5"),
                 common_stride: int = 4, num_groups: int = 32, dropout: float = 0.0):
        super().__init__()
        # feature names sorted from fine to coarse
        self.in_features = sorted(in_channels, key=lambda name: in_strides[name])
        self.transformer_in_features = sorted(transformer_in_features, key=lambda name: in_strides[name])
        # coarsest level first, as the encoder orders them
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[name], conv_dim, kernel_size=1), nn.GroupNorm(num_groups, conv_dim))
            for name in self.transformer_in_features[::-1]
        )
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.constant_(projection[0].bias, 0)
        self.transformer = DeformableTransformer(
            conv_dim, num_heads, feedforward_dim, num_encoder_layers, len(self.transformer_in_features), num_points,
            dropout
        )
        self.position_encoding = SinePositionEncoding(conv_dim // 2)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.constant_(self.mask_features.bias, 0)
        self.num_multi_scale_features = 3
        # FPN levels finer than the encoder's finest, down to common_stride
        finest_encoder_stride = min(in_strides[name] for name in self.transformer_in_features)
        self.fpn_features = [name for name in self.in_features
                             if common_stride <= in_strides[name] < finest_encoder_stride]
        for index, name in enumerate(self.fpn_features):
            self.add_module(f"adapter_{index + 1}",
                            ConvNormActivation(in_channels[name], conv_dim, 1, num_groups, relu=False))
            self.add_module(f"layer_{index + 1}", ConvNormActivation(conv_dim, conv_dim, 3, num_groups, relu=True))
        for module in self.modules():
            if isinstance(module, ConvNormActivation):
                nn.init.kaiming_uniform_(module.weight, a=1)

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        sources, positions = [], []
        for level, name in enumerate(self.transformer_in_features[::-1]):
            feature = features[name]
            sources.append(self.input_proj[level](half_for_autocast(feature)))
            positions.append(self.position_encoding(feature, dtype=upcast_dtype(feature.dtype)))
        spatial_shapes = [tuple(source.shape[-2:]) for source in sources]
        encoded = self.transformer(sources, positions)
        batch_size = encoded.shape[0]
        # (B, sum H*W, C) -> per level (B, C, H, W), coarsest first
        outputs = [
            tokens.transpose(1, 2).reshape(batch_size, -1, height, width)
            for tokens, (height, width) in zip(encoded.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes)
        ]
        for index in reversed(range(len(self.fpn_features))):
            # channels-last under CPU bf16 inference: the adapter's and the layer's convolutions and group norms
            # then run about twice as fast at this resolution; the sum, and all after it, stay channels-last
            lateral = getattr(self, f"adapter_{index + 1}")(
                half_for_autocast(channels_last_in_bf16(features[self.fpn_features[index]])))
            merged = lateral + F.interpolate(channels_last_in_bf16(outputs[-1]), size=lateral.shape[-2:],
                                             mode="bilinear", align_corners=False)
            outputs.append(getattr(self, f"layer_{index + 1}")(merged))
        return self.mask_features(outputs[-1]), outputs[: self.num_multi_scale_features]
