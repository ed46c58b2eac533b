"""Sine position encoding of DETR, as used by Mask2Former's pixel and transformer decoders."""
import math
from typing import Optional

import torch
from torch import nn


class SinePositionEncoding(nn.Module):
    """2-D sine/cosine encoding of (y, x) pixel positions, normalised to [0, 2π].

    Equal to detectron2's ``PositionEmbeddingSine(normalize=True)`` and mmdet's
    ``SinePositionalEncoding(normalize=True)``: no padding mask is used because every image in
    a batch here is padded alone (see ``preprocessing``), so positions span the padded map.
    """

    def __init__(self, num_position_features: int, temperature: float = 10000.0, epsilon: float = 1e-6):
        super().__init__()
        self.num_position_features = num_position_features
        self.temperature = temperature
        self.epsilon = epsilon
        self.scale = 2 * math.pi

    def forward(self, feature_map: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Returns a (batch, 2 * num_position_features, height, width) encoding for ``feature_map``, in ``dtype``
        (default: the map's)."""
        batch_size, _, height, width = feature_map.shape
        ones = torch.ones(batch_size, height, width, dtype=torch.float32, device=feature_map.device)
        y_position = ones.cumsum(1)
        x_position = ones.cumsum(2)
        y_position = y_position / (y_position[:, -1:, :] + self.epsilon) * self.scale
        x_position = x_position / (x_position[:, :, -1:] + self.epsilon) * self.scale

        feature_index = torch.arange(self.num_position_features, dtype=torch.float32, device=feature_map.device)
        frequencies = self.temperature ** (2 * torch.div(feature_index, 2, rounding_mode="floor")
                                           / self.num_position_features)
        # (batch, height, width, num_position_features), sin on even features and cos on odd ones, interleaved
        x_phase = x_position[:, :, :, None] / frequencies
        y_phase = y_position[:, :, :, None] / frequencies
        x_encoding = torch.stack((x_phase[..., 0::2].sin(), x_phase[..., 1::2].cos()), dim=4).flatten(3)
        y_encoding = torch.stack((y_phase[..., 0::2].sin(), y_phase[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((y_encoding, x_encoding), dim=3).permute(0, 3, 1, 2).to(dtype or feature_map.dtype)
