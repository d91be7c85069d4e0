"""Classifiers with a shared interface: ``forward_feature_map``/``feature_map_channels``, ``pool_features``,
``forward_features``/``feature_dim``, ``fc``."""

from __future__ import annotations

from typing import Any

from rayoodkd.models.classifiers.base import Classifier
from rayoodkd.models.classifiers.external import (
    TIMM_PREFIX,
    ModuleClassifier,
    TimmClassifier,
    build_module_classifier,
    build_timm_classifier,
)
from rayoodkd.models.classifiers.resnet import CifarResNet, resnet8, resnet18, resnet34
from rayoodkd.models.classifiers.small import (
    LeNet5,
    SmallCNN,
    cnn_small,
    cnn_tiny,
    lenet5,
    lenet5_bn,
    lenet5_half,
)
from rayoodkd.models.classifiers.torchvision_adapter import (
    TorchvisionClassifier,
    build_torchvision_classifier,
)
from rayoodkd.models.classifiers.vgg import VGG, vgg11_bn
from rayoodkd.models.classifiers.wrn import WideResNet, wrn
from rayoodkd.models.registry import CLASSIFIERS

TORCHVISION_PREFIX = "torchvision:"


def build_classifier(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs: Any
) -> Classifier:
    """Build a registered classifier, ``torchvision:<name>`` (kwargs: ``weights_path``, model options),
    ``timm:<name>`` (kwargs: ``timm.create_model`` options) or a user's ``module.path:ClassName`` (kwargs:
    its constructor's; ``num_classes``/``in_channels``/``image_size`` where it names them)."""
    if name.startswith(TORCHVISION_PREFIX):
        tv_name = name[len(TORCHVISION_PREFIX) :]
        return build_torchvision_classifier(tv_name, num_classes, in_channels, **kwargs)
    if name.startswith(TIMM_PREFIX):
        return build_timm_classifier(name[len(TIMM_PREFIX) :], num_classes, in_channels, **kwargs)
    if ":" in name:
        return build_module_classifier(name, num_classes, in_channels, image_size, **kwargs)
    model = CLASSIFIERS.build(
        name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs
    )
    if not isinstance(model, Classifier):
        raise TypeError(f"classifier '{name}' built a {type(model).__name__}, not a Classifier")
    return model


__all__ = [
    "TIMM_PREFIX",
    "TORCHVISION_PREFIX",
    "VGG",
    "CifarResNet",
    "Classifier",
    "LeNet5",
    "ModuleClassifier",
    "SmallCNN",
    "TimmClassifier",
    "TorchvisionClassifier",
    "WideResNet",
    "build_classifier",
    "build_module_classifier",
    "build_timm_classifier",
    "build_torchvision_classifier",
    "cnn_small",
    "cnn_tiny",
    "lenet5",
    "lenet5_bn",
    "lenet5_half",
    "resnet8",
    "resnet18",
    "resnet34",
    "vgg11_bn",
    "wrn",
]
