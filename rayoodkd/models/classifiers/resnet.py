"""CIFAR ResNets (3×3 stride-1 stem, no max-pool).

ResNet-18/34 follow DAFL ``resnet.py`` as vendored by MosaicKD (``engine/models/classifiers/resnet.py``);
module names match it, and its ``linear.*`` head keys load into ``fc``. ResNet-8 is the tiny RepDistiller
ResNet-8 (stem 16, one BasicBlock per stage, widths 16/32/64) built from the same blocks.
Global average pooling is adaptive, so 28 px inputs work. ``image_size`` is accepted by the builders for a
uniform interface only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from rayoodkd.models.classifiers.base import Classifier
from rayoodkd.models.registry import CLASSIFIERS


class BasicBlock(nn.Module):
    """Post-activation 3×3/3×3 residual block with a 1×1 projection shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Classifier):
    """ResNet with a CIFAR stem; stage ``i`` has ``depths[i]`` BasicBlocks of width ``widths[i]``.

    The stem width is ``widths[0]``; the first stage has stride 1, the others stride 2.
    """

    legacy_prefixes: ClassVar[dict[str, str]] = {"linear.": "fc."}

    def __init__(
        self, depths: Sequence[int], widths: Sequence[int], num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(in_planes, width, stride=2 if i > 0 and j == 0 else 1))
                in_planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(depths)
        self.feature_map_channels = self.feature_dim = in_planes
        self.fc = nn.Linear(in_planes, num_classes)

    def forward_feature_map(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = self.get_submodule(f"layer{i + 1}")(out)
        return out


@CLASSIFIERS.register("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
    """CIFAR ResNet-18: BasicBlock depths [2,2,2,2], widths [64,128,256,512]."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels)


@CLASSIFIERS.register("resnet34")
def resnet34(num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
    """CIFAR ResNet-34: BasicBlock depths [3,4,6,3], widths [64,128,256,512]."""
    return CifarResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes, in_channels)


@CLASSIFIERS.register("resnet8")
def resnet8(num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
    """Tiny ResNet-8 (RepDistiller ``resnet8``): one BasicBlock per stage, widths [16,32,64]."""
    return CifarResNet((1, 1, 1), (16, 32, 64), num_classes, in_channels)
