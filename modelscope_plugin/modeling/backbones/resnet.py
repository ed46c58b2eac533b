"""ResNet-50/101 backbone from torchvision, returning res2..res5.

torchvision's parameter names (``conv1``, ``bn1``, ``layer1.0.conv1`` ...) are also mmdet's and EasyCV's, so
their checkpoints load without renaming; ``checkpoint.py`` maps detectron2's (``stem.conv1``, ``res2.0``).
The stride sits in the 3×3 convolution ("pytorch" style, detectron2's ``STRIDE_IN_1X1: False``), as in every
Mask2Former and FastInst release. Batch norm is frozen in training (statistics and affine), as the references do. Weights and activations are kept
channels-last, which oneDNN's CPU convolutions run about a fifth faster (benchmarks/README.md); the numbers are
the same up to float rounding.
"""
from typing import Dict

import torch
from torch import nn
from torchvision.models import resnet

RESNET_BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


class ResNet(resnet.ResNet):
    """torchvision ResNet without the classifier; ``forward`` returns {"res2": stride 4, ..., "res5": stride 32}."""

    def __init__(self, depth: int = 50, freeze_batch_norm: bool = True):
        if depth not in RESNET_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_BLOCKS)}, got {depth}")
        super().__init__(resnet.Bottleneck, RESNET_BLOCKS[depth])
        del self.fc, self.avgpool
        self.freeze_batch_norm = freeze_batch_norm
        self.out_channels: Dict[str, int] = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
        self.out_strides: Dict[str, int] = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
        if freeze_batch_norm:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.requires_grad_(False)
                    module.bias.requires_grad_(False)
        # loading a checkpoint copies into these parameters and keeps their layout
        self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        if self.freeze_batch_norm:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """images: (B, 3, H, W) -> {"res2": (B, 256, H/4, W/4), ..., "res5": (B, 2048, H/32, W/32)}, channels-last."""
        images = images.contiguous(memory_format=torch.channels_last)
        features = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outputs = {}
        for name, layer in zip(("res2", "res3", "res4", "res5"), (self.layer1, self.layer2, self.layer3, self.layer4)):
            features = layer(features)
            outputs[name] = features
        return outputs
