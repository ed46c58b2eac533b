"""Mask2Former (Cheng et al., CVPR 2022): backbone, pixel decoder, masked-attention transformer decoder."""
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from modelscope_plugin.modeling.mask2former.pixel_decoder import MSDeformAttnPixelDecoder
from modelscope_plugin.modeling.mask2former.transformer_decoder import MultiScaleMaskedTransformerDecoder


@dataclass
class Mask2FormerOutput:
    class_logits: torch.Tensor
    """(B, Q, num_classes + 1) of the last decoder layer; the last class is "no object"."""
    mask_logits: torch.Tensor
    """(B, Q, H/4, W/4) of the last decoder layer, at the padded input's stride-4 resolution."""
    auxiliary_class_logits: List[torch.Tensor]
    """Earlier stages (before the first layer, then after each but the last), for deep supervision; empty unless
    the network is training or ``return_auxiliary`` is set."""
    auxiliary_mask_logits: List[torch.Tensor]


class Mask2Former(nn.Module):
    def __init__(self, backbone: nn.Module, pixel_decoder: MSDeformAttnPixelDecoder,
                 transformer_decoder: MultiScaleMaskedTransformerDecoder):
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder

    def forward(self, images: torch.Tensor, return_auxiliary: Optional[bool] = None) -> Mask2FormerOutput:
        """images: (B, 3, H, W) normalised and padded to a multiple of 32; returns raw logits (the earlier decoder
        stages' too when ``return_auxiliary``, by default in training)."""
        features = self.backbone(images)
        mask_features, multi_scale_features = self.pixel_decoder(features)
        predictions = self.transformer_decoder(multi_scale_features, mask_features, return_auxiliary)
        return Mask2FormerOutput(
            class_logits=predictions.class_logits[-1],
            mask_logits=predictions.mask_logits[-1],
            auxiliary_class_logits=predictions.class_logits[:-1],
            auxiliary_mask_logits=predictions.mask_logits[:-1],
        )
