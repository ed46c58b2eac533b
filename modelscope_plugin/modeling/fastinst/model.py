"""FastInst (He et al., CVPR 2023): ResNet backbone, pyramid-pooling FPN, query-proposal dual-path decoder."""
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from modelscope_plugin.modeling.fastinst.pixel_decoder import PyramidPoolingModuleFPN
from modelscope_plugin.modeling.fastinst.transformer_decoder import DecoderState, FastInstDecoder


@dataclass
class FastInstOutput:
    class_logits: torch.Tensor
    """(B, Q, num_classes + 1) of the last decoder layer; the last class is "no object"."""
    mask_logits: torch.Tensor
    """(B, Q, H/8, W/8) of the last decoder layer, at the padded input's stride-8 resolution."""
    proposal_class_logits: torch.Tensor
    """(B, num_classes + 1, H/16, W/16): the auxiliary class head that selects the queries (its own loss in
    training)."""
    query_indices: torch.Tensor
    """(B, Q) flat indices of the stride-16 pixels the queries were taken from."""
    auxiliary_class_logits: List[torch.Tensor] = field(default_factory=list)
    """Training only: earlier stages (before the first layer, then after each but the last), for deep supervision."""
    auxiliary_mask_logits: List[torch.Tensor] = field(default_factory=list)
    """Earlier stages' mask logits (every mode)."""
    query_locations: Optional[torch.Tensor] = None
    """Training only: (B, Q, 2) normalised (x, y) of the queries, for the matcher's location cost."""
    decoder_state: Optional[DecoderState] = field(default=None, repr=False)
    """Training only: input of ``FastInstDecoder.guided_forward`` (ground-truth mask-guided learning)."""


class FastInst(nn.Module):
    def __init__(self, backbone: nn.Module, pixel_decoder: PyramidPoolingModuleFPN,
                 transformer_decoder: FastInstDecoder):
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder

    def forward(self, images: torch.Tensor) -> FastInstOutput:
        """images: (B, 3, H, W) normalised and padded to a multiple of 32; returns raw logits."""
        features = self.backbone(images)
        multi_scale_features = self.pixel_decoder(features)
        predictions = self.transformer_decoder(multi_scale_features)
        return FastInstOutput(
            class_logits=predictions.class_logits[-1],
            mask_logits=predictions.mask_logits[-1],
            proposal_class_logits=predictions.proposal_class_logits,
            query_indices=predictions.query_indices,
            auxiliary_class_logits=[logits for logits in predictions.class_logits[:-1] if logits is not None],
            auxiliary_mask_logits=predictions.mask_logits[:-1],
            query_locations=predictions.query_locations,
            decoder_state=predictions.state,
        )
