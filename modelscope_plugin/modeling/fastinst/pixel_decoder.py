"""FastInst's pixel decoder: a pyramid pooling module on the coarsest level, then a top-down FPN.

Backbone res3..res5 -> three features of width ``conv_dim`` at strides 32, 16 and 8 (coarsest first). There is
no stride-4 mask feature: FastInst predicts masks from the stride-8 level. Parameter names follow detectron2's
``PyramidPoolingModuleFPN`` (``adapter_1`` / ``layer_1`` are the finest level, ``ppm.stages.*``, ``ppm.bottleneck``).
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modelscope_plugin.modeling.mask2former.pixel_decoder import ConvNormActivation


def adaptive_pooling_matrix(length, bins: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """(bins, length) averaging weights of ``adaptive_avg_pool`` along one axis: bin i covers
    [floor(i * length / bins), ceil((i + 1) * length / bins)), PyTorch's rule.

    Hand-written because the ONNX exporter turns adaptive pooling into a fixed-kernel AveragePool (or refuses it)
    when the input size is dynamic; this form is arithmetic on the (traced) size, so it exports for any size."""
    index = torch.arange(bins, device=device)
    start = torch.div(index * length, bins, rounding_mode="floor")
    end = -torch.div(-(index + 1) * length, bins, rounding_mode="floor")
    positions = torch.arange(length, device=device)
    inside = (positions[None, :] >= start[:, None]) & (positions[None, :] < end[:, None])
    return inside.to(dtype) / (end - start)[:, None].to(dtype)


def adaptive_average_pool(features: torch.Tensor, bins: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(features, bins)`` as two matrix products (exportable with dynamic sizes)."""
    rows = adaptive_pooling_matrix(features.shape[-2], bins, features.dtype, features.device)
    columns = adaptive_pooling_matrix(features.shape[-1], bins, features.dtype, features.device)
    # (B, C, H, W) -> (B, C, bins, bins)
    return rows @ features @ columns.transpose(0, 1)


class PyramidPoolingModule(nn.Module):
    """PSPNet's pooling module: average-pool to 1, 2, 3 and 6 cells, project, upsample, concatenate, fuse."""

    def __init__(self, in_channels: int, channels: int, bin_sizes: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.bin_sizes = tuple(bin_sizes)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(output_size=(size, size)),
                          nn.Conv2d(in_channels, channels, kernel_size=1))
            for size in bin_sizes
        )
        self.bottleneck = nn.Conv2d(in_channels + len(bin_sizes) * channels, in_channels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        size = features.shape[-2:]
        pooled = []
        for bins, (pool, projection) in zip(self.bin_sizes, self.stages):
            # ONNX export: the same average as two matrix products, so height and width may stay dynamic
            averaged = adaptive_average_pool(features, bins) if torch.onnx.is_in_onnx_export() else pool(features)
            pooled.append(F.interpolate(F.relu(projection(averaged)), size=size, mode="bilinear", align_corners=False))
        return F.relu(self.bottleneck(torch.cat(pooled + [features], dim=1)))


class PyramidPoolingModuleFPN(nn.Module):
    """Backbone features -> [stride 32, stride 16, stride 8] features of width ``conv_dim``."""

    def __init__(self, in_channels: Dict[str, int], in_strides: Dict[str, int], conv_dim: int = 256,
                 num_groups: int = 32, in_features: Sequence[str] = ("res3", "res4", "res5")):
        super().__init__()
        # fine to coarse, as detectron2 numbers the adapters
        self.in_features = sorted(in_features, key=lambda name: in_strides[name])
        for index, name in enumerate(self.in_features):
            self.add_module(f"adapter_{index + 1}",
                            ConvNormActivation(in_channels[name], conv_dim, 1, num_groups, relu=False))
            self.add_module(f"layer_{index + 1}", ConvNormActivation(conv_dim, conv_dim, 3, num_groups, relu=True))
        self.ppm = PyramidPoolingModule(conv_dim, conv_dim // 4)
        for module in self.modules():
            if isinstance(module, (ConvNormActivation, nn.Conv2d)):
                # detectron2's c2_xavier_fill
                nn.init.kaiming_uniform_(module.weight, a=1)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

    def forward(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        outputs: List[torch.Tensor] = []
        for index in reversed(range(len(self.in_features))):
            lateral = getattr(self, f"adapter_{index + 1}")(features[self.in_features[index]])
            if not outputs:
                merged = self.ppm(lateral)
            else:
                merged = lateral + F.interpolate(outputs[-1], size=lateral.shape[-2:], mode="bilinear",
                                                 align_corners=False)
            outputs.append(getattr(self, f"layer_{index + 1}")(merged))
        return outputs
