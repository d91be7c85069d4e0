"""Pre-activation wide ResNets WRN-d-k (ZSKT ``wresnet.py`` by Wei Yang, as vendored by MosaicKD).

Channels [16, 16k, 32k, 64k], n = (d−4)/6 blocks per stage, dropout 0 by default, 3×3 stride-1 stem.
Module names match the source, so the authors' released WRN checkpoints load unchanged. The final
average pooling is adaptive, so 28 px inputs work. ``image_size`` is accepted for a uniform interface only.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from rayoodkd.models.classifiers.base import Classifier
from rayoodkd.models.registry import CLASSIFIERS


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3 with a 1×1 shortcut on width change.

    As in the source, when the width changes the pre-activation output (not the raw input) feeds the
    shortcut. ``convShortcut`` keeps the source's (non-PEP 8) name for checkpoint compatibility.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout_rate)
        self.convShortcut = (
            None
            if in_planes == out_planes
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(pre)))))
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A stage of ``nb_layers`` wide blocks; only the first one changes width/stride."""

    def __init__(
        self, nb_layers: int, in_planes: int, out_planes: int, stride: int, dropout_rate: float
    ) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride, dropout_rate)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1, dropout_rate) for _ in range(nb_layers - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(Classifier):
    """WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016) in the ZSKT/DFKD-benchmark variant."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        in_channels: int = 3,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, dropout_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, dropout_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, dropout_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        self.feature_map_channels = self.feature_dim = channels[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_feature_map(self, x: Tensor) -> Tensor:
        """The last stage's output after the final pre-activation BN-ReLU (``bn1``)."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.relu(self.bn1(out))


def wrn(
    depth: int,
    widen: int,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    dropout_rate: float = 0.0,
) -> WideResNet:
    """Generic WRN-``depth``-``widen`` builder (depth = 6n+4)."""
    return WideResNet(depth, widen, num_classes, in_channels, dropout_rate)


def _register_wrn(depth: int, widen: int) -> None:
    def builder(num_classes: int, in_channels: int = 3, image_size: int = 32) -> WideResNet:
        return wrn(depth, widen, num_classes, in_channels, image_size)

    builder.__doc__ = f"WRN-{depth}-{widen}."
    CLASSIFIERS.register(f"wrn{depth}_{widen}")(builder)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register_wrn(_depth, _widen)
