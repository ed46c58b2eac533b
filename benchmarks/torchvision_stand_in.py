"""The few torchvision pieces the networks use, for a machine whose Python has torch but not torchvision.

``modelscope_plugin.modeling`` takes ResNet's ``BasicBlock`` / ``Bottleneck`` (their constructors: the same
modules, created in the same order, so seeded weights are the same) from ``torchvision.models.resnet`` and
``StochasticDepth`` from ``torchvision.ops``. ``installed_if_missing()`` registers these as ``torchvision`` modules
while the networks' modules are imported, when torchvision itself cannot be; with torchvision installed it does
nothing. Used by gpu_check.py only.
"""
import contextlib
import importlib.util
import sys
import types
from typing import Optional

import torch
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups, bias=False,
                     dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride


class StochasticDepth(nn.Module):
    """Drops whole residual branches per row in training (torchvision.ops.StochasticDepth, mode "row"/"batch")."""

    def __init__(self, p: float, mode: str):
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return features
        survival_rate = 1.0 - self.p
        size = [features.shape[0]] + [1] * (features.ndim - 1) if self.mode == "row" else [1] * features.ndim
        noise = torch.empty(size, dtype=features.dtype, device=features.device).bernoulli_(survival_rate)
        if survival_rate > 0.0:
            noise.div_(survival_rate)
        return features * noise


@contextlib.contextmanager
def installed_if_missing():
    """Within the block, ``torchvision`` is this stand-in when torchvision is not importable (yields whether it is).
    Afterwards the entries are removed again, so that libraries probing for torchvision (transformers) find none;
    modules imported within the block keep the classes they took."""
    if sys.modules.get("torchvision") is not None or importlib.util.find_spec("torchvision") is not None:
        yield False
        return
    package = types.ModuleType("torchvision")
    package.__path__ = []
    models = types.ModuleType("torchvision.models")
    models.__path__ = []
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.conv1x1, resnet.conv3x3, resnet.BasicBlock, resnet.Bottleneck = conv1x1, conv3x3, BasicBlock, Bottleneck
    ops = types.ModuleType("torchvision.ops")
    ops.StochasticDepth = StochasticDepth
    package.models, package.ops, models.resnet = models, ops, resnet
    entries = {"torchvision": package, "torchvision.models": models, "torchvision.models.resnet": resnet,
               "torchvision.ops": ops}
    sys.modules.update(entries)
    try:
        yield True
    finally:
        for name in entries:
            sys.modules.pop(name, None)
