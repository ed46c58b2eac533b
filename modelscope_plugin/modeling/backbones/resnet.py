"""ResNet-50/101 backbone from torchvision, returning res2..res5.

torchvision's parameter names (``conv1``, ``bn1``, ``layer1.0.conv1`` ...) are also mmdet's and EasyCV's, so
their checkpoints load without renaming; ``checkpoint.py`` maps detectron2's (``stem.conv1``, ``res2.0``).
The stride sits in the 3×3 convolution ("pytorch" style, detectron2's ``STRIDE_IN_1X1: False``), as in every
Mask2Former and FastInst release. Batch norm is frozen in training (statistics and affine), as the references do.
Weights and activations are kept channels-last inside the backbone, which oneDNN's CPU convolutions run about a
fifth faster (benchmarks/README.md); the numbers are the same up to float rounding. The returned features are
contiguous (NCHW): torch's CPU group norm on channels-last float32 input is about ten times less accurate (the pixel
decoders' first group norms turned 1e-6 relative feature differences into 5e-5), and the copy costs little.
Without autograd each convolution runs with its frozen batch norm folded into its weights and bias (one pass over
the activations instead of two; the folded weights are cached until a tensor changes), and the state dict keeps
the published names.
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet

RESNET_BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def convolution_and_norm(convolution: nn.Conv2d, norm: nn.BatchNorm2d, features: torch.Tensor) -> torch.Tensor:
    """``norm(convolution(features))``; in eval mode without autograd as one convolution with the norm folded in."""
    if norm.training or torch.is_grad_enabled():
        return norm(convolution(features))
    weight, bias = folded_weights(convolution, norm)
    return F.conv2d(features, weight, bias, convolution.stride, convolution.padding, convolution.dilation,
                    convolution.groups)


def folded_weights(convolution: nn.Conv2d, norm: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the convolution followed by the eval-mode norm, cached on the norm until a tensor changes."""
    tensors = (convolution.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var)
    key = tuple((tensor.data_ptr(), tensor._version) for tensor in tensors)
    cached = getattr(norm, "_folded_weights", None)
    if cached is None or cached[0] != key:
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)  # (C_out,)
        weight = convolution.weight * scale[:, None, None, None]  # keeps the weight's channels-last layout
        bias = norm.bias - norm.running_mean * scale
        if convolution.bias is not None:
            bias = bias + convolution.bias * scale
        cached = (key, weight, bias)
        norm._folded_weights = cached
    return cached[1], cached[2]


class Bottleneck(resnet.Bottleneck):
    """torchvision's bottleneck block, its convolutions and norms run through ``convolution_and_norm``."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        identity = features
        out = self.relu(convolution_and_norm(self.conv1, self.bn1, features))
        out = self.relu(convolution_and_norm(self.conv2, self.bn2, out))
        out = convolution_and_norm(self.conv3, self.bn3, out)
        if self.downsample is not None:
            identity = convolution_and_norm(self.downsample[0], self.downsample[1], features)
        return self.relu(out + identity)


class ResNet(resnet.ResNet):
    """torchvision ResNet without the classifier; ``forward`` returns {"res2": stride 4, ..., "res5": stride 32}."""

    def __init__(self, depth: int = 50, freeze_batch_norm: bool = True):
        if depth not in RESNET_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_BLOCKS)}, got {depth}")
        super().__init__(Bottleneck, RESNET_BLOCKS[depth])
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
        """images: (B, 3, H, W) -> {"res2": (B, 256, H/4, W/4), ..., "res5": (B, 2048, H/32, W/32)}, contiguous."""
        images = images.contiguous(memory_format=torch.channels_last)
        features = self.maxpool(self.relu(convolution_and_norm(self.conv1, self.bn1, images)))
        outputs = {}
        for name, layer in zip(("res2", "res3", "res4", "res5"), (self.layer1, self.layer2, self.layer3, self.layer4)):
            features = layer(features)
            outputs[name] = features.contiguous()
        return outputs
