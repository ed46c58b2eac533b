"""ResNet backbone from torchvision's blocks, returning res2..res5: ResNet-50/101 (bottlenecks) as every release,
ResNet-18/34 (basic blocks) and other widths for networks trained from scratch (the demo models).

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

from modelscope_plugin.modeling.layers.cpu_bf16 import contiguous_map

RESNET_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def convolution_and_norm(convolution: nn.Conv2d, norm: nn.BatchNorm2d, features: torch.Tensor) -> torch.Tensor:
    """``norm(convolution(features))``; in eval mode without autograd as one convolution with the norm folded in.
    Under ``torch.compile`` the plain form, which the compiler folds itself (the cache below, keyed on data pointers,
    would make it recompile for every norm)."""
    if norm.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
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


class BasicBlock(resnet.BasicBlock):
    """torchvision's basic block (ResNet-18/34), its convolutions and norms run through ``convolution_and_norm``."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        identity = features
        out = self.relu(convolution_and_norm(self.conv1, self.bn1, features))
        out = convolution_and_norm(self.conv2, self.bn2, out)
        if self.downsample is not None:
            identity = convolution_and_norm(self.downsample[0], self.downsample[1], features)
        return self.relu(out + identity)


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


class ResNet(nn.Module):
    """torchvision's ResNet layout (``conv1``, ``bn1``, ``layer1``..``layer4``) without the classifier; ``forward``
    returns {"res2": stride 4, ..., "res5": stride 32}. ``width`` is the stem's channels (torchvision: 64)."""

    def __init__(self, depth: int = 50, width: int = 64, freeze_batch_norm: bool = True):
        super().__init__()
        if depth not in RESNET_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_BLOCKS)}, got {depth}")
        block = BasicBlock if depth < 50 else Bottleneck
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = width
        for index, num_blocks in enumerate(RESNET_BLOCKS[depth]):
            planes, stride = width * 2 ** index, 1 if index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                downsample = None
                if block_index == 0 and (stride != 1 or in_channels != planes * block.expansion):
                    downsample = nn.Sequential(
                        nn.Conv2d(in_channels, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                        nn.BatchNorm2d(planes * block.expansion))
                blocks.append(block(in_channels, planes, stride if block_index == 0 else 1, downsample))
                in_channels = planes * block.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        # torchvision builds its 1000-class classifier here; drawing its random numbers too keeps a seeded ResNet
        # equal to torchvision's under the same seed (and every seeded network built on it as it was)
        nn.Linear(in_channels, 1000)
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        names = ("res2", "res3", "res4", "res5")
        self.out_channels: Dict[str, int] = {name: width * 2 ** index * block.expansion
                                             for index, name in enumerate(names)}
        self.out_strides: Dict[str, int] = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
        self.set_batch_norm_frozen(freeze_batch_norm)
        # loading a checkpoint copies into these parameters and keeps their layout
        self.to(memory_format=torch.channels_last)

    def set_batch_norm_frozen(self, frozen: bool) -> None:
        """Frozen: batch norm keeps its statistics and affine parameters in training (the references' setting for
        pretrained backbones); unfrozen: ordinary batch norm (training from scratch)."""
        self.freeze_batch_norm = frozen
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.requires_grad_(not frozen)
                module.bias.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        if self.freeze_batch_norm:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """images: (B, 3, H, W) -> {"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)} (``out_channels``;
        R50: 256 ... 2048), contiguous (``contiguous_map``: channels-last in CPU bf16 inference, NCHW otherwise)."""
        images = images.contiguous(memory_format=torch.channels_last)
        features = self.maxpool(self.relu(convolution_and_norm(self.conv1, self.bn1, images)))
        outputs = {}
        for name, layer in zip(("res2", "res3", "res4", "res5"), (self.layer1, self.layer2, self.layer3, self.layer4)):
            features = layer(features)
            outputs[name] = contiguous_map(features)
        return outputs
