"""Small CPU-friendly classifiers for MNIST-sized data.

``lenet5``/``lenet5_half`` follow DAFL's LeNet-5 (huawei-noah Data-Efficient-Model-Compression, vendored
by DFAD ``network/lenet.py``): conv5×5(6)-ReLU-maxpool-conv5×5(16)-ReLU-maxpool-conv5×5(120)-ReLU-
FC(84)-ReLU-FC, and the half variant with 3/8/60 channels and FC(42). DAFL feeds 32 px images; for smaller
inputs conv1 is zero-padded by ``ceil((32 − image_size) / 2)`` (2 px for 28 px MNIST, the classic LeNet
padding), and an adaptive average pool after conv3 keeps any other size working (it is the identity when
conv3's output is 1×1). The DAFL ``fc2.*`` head keys load into ``fc``.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from rayoodkd.models.classifiers.base import Classifier
from rayoodkd.models.registry import CLASSIFIERS


class LeNet5(Classifier):
    """DAFL LeNet-5; ``forward_features`` returns the ReLU'd output of ``fc1`` (``hidden`` units).

    LeNet-5 feeds its last conv map into fully connected layers instead of pooling it for the head: the
    feature map is conv3's ReLU'd output (1×1 for 28 and 32 px inputs), and ``pool_features`` is the adaptive
    average pool, the flatten and the hidden layer ``fc1``.
    """

    legacy_prefixes: ClassVar[dict[str, str]] = {"fc2.": "fc."}

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 32,
        channels: tuple[int, int, int] = (6, 16, 120),
        hidden: int = 84,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=max(0, (33 - image_size) // 2))
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.conv3 = nn.Conv2d(c2, c3, 5)
        norm = nn.BatchNorm2d if batch_norm else (lambda _: nn.Identity())
        self.bn1, self.bn2, self.bn3 = norm(c1), norm(c2), norm(c3)
        self.fc1 = nn.Linear(c3, hidden)
        self.fc = nn.Linear(hidden, num_classes)
        self.feature_map_channels = c3
        self.feature_dim = hidden

    def forward_feature_map(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return F.relu(self.bn3(self.conv3(x)))

    def pool_features(self, feature_map: Tensor) -> Tensor:
        return F.relu(self.fc1(F.adaptive_avg_pool2d(feature_map, 1).flatten(1)))


class SmallCNN(Classifier):
    """Three conv3×3-BN-ReLU layers (32/64/128 ch, max-pool after the first two), global average pool."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        prev = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(prev, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            prev = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, num_classes)
        self.feature_map_channels = self.feature_dim = prev

    def forward_feature_map(self, x: Tensor) -> Tensor:
        return self.features(x)


@CLASSIFIERS.register("lenet5")
def lenet5(num_classes: int, in_channels: int = 3, image_size: int = 32) -> LeNet5:
    """DAFL LeNet-5 (teacher for MNIST): 6/16/120 conv channels, FC 84."""
    return LeNet5(num_classes, in_channels, image_size)


@CLASSIFIERS.register("lenet5_half")
def lenet5_half(num_classes: int, in_channels: int = 3, image_size: int = 32) -> LeNet5:
    """DAFL LeNet-5-Half (student for MNIST): 3/8/60 conv channels, FC 42."""
    return LeNet5(num_classes, in_channels, image_size, channels=(3, 8, 60), hidden=42)


@CLASSIFIERS.register("lenet5_bn")
def lenet5_bn(num_classes: int, in_channels: int = 3, image_size: int = 32) -> LeNet5:
    """LeNet-5 with BatchNorm after each conv: a BN teacher (for DFQ, DeepInversion, TA-DFKD) as cheap as
    LeNet-5 on CPU (cnn_small costs ~8× more per image)."""
    return LeNet5(num_classes, in_channels, image_size, batch_norm=True)


@CLASSIFIERS.register("cnn_tiny")
def cnn_tiny(num_classes: int, in_channels: int = 3, image_size: int = 32) -> SmallCNN:
    """``cnn_small`` at a quarter of the width (8/16/32 channels): another cheap BN architecture."""
    return SmallCNN(num_classes, in_channels, width=8)


@CLASSIFIERS.register("cnn_small")
def cnn_small(num_classes: int, in_channels: int = 3, image_size: int = 32) -> SmallCNN:
    """Small conv-BN net for MNIST-sized data (this toolkit's own, not from a paper)."""
    return SmallCNN(num_classes, in_channels)
