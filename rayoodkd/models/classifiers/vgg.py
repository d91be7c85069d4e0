"""CIFAR VGG-11-BN (RepDistiller ``vgg.py`` as vendored by MosaicKD, configuration "A").

Module names match the source (``block0``..``block4``, pools); its ``classifier.*`` head keys load into
``fc``. The last pooling is adaptive, so 28 px inputs work. ``image_size`` is accepted for a uniform
interface only: as in the source, the fourth max-pool is applied only to 64 px inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from rayoodkd.models.classifiers.base import Classifier
from rayoodkd.models.registry import CLASSIFIERS

VGG11_CFG: tuple[tuple[int, ...], ...] = ((64,), (128,), (256, 256), (512, 512), (512, 512))


def _make_block(widths: Sequence[int], in_channels: int, batch_norm: bool) -> nn.Sequential:
    """conv3×3[-BN]-ReLU per width, without the block's last ReLU (applied in ``forward``)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Conv2d(in_channels, width, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(Classifier):
    """VGG with five conv blocks separated by 2×2 max-pools and a single linear head."""

    legacy_prefixes: ClassVar[dict[str, str]] = {"classifier.": "fc."}

    def __init__(
        self,
        cfg: Sequence[Sequence[int]],
        num_classes: int,
        in_channels: int = 3,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        prev = in_channels
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", _make_block(widths, prev, batch_norm))
            prev = widths[-1]
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        self.feature_map_channels = self.feature_dim = prev
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_feature_map(self, x: Tensor) -> Tensor:
        height = x.shape[-2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if height == 64:
            x = self.pool3(x)
        return F.relu(self.block4(x))

    def pool_features(self, feature_map: Tensor) -> Tensor:
        return self.pool4(feature_map).flatten(1)


@CLASSIFIERS.register("vgg11_bn")
def vgg11_bn(num_classes: int, in_channels: int = 3, image_size: int = 32) -> VGG:
    """CIFAR VGG-11 with batch norm (teacher of the vgg11 → resnet18 pair)."""
    return VGG(VGG11_CFG, num_classes, in_channels, batch_norm=True)
