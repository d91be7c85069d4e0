"""Any torchvision classifier (``torchvision:<name>``) behind the common classifier interface.

Nothing is ever downloaded: the architecture is built with ``weights=None`` and optional weights come from
a local state-dict file (``weights_path``, e.g. a saved torchvision/AuG-KD checkpoint). The first
``nn.Conv2d`` is adapted to ``in_channels`` and the last ``nn.Linear`` (the head, exposed as ``fc``) is
replaced when ``num_classes`` differs from the checkpoint's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision import models as tvm

from rayoodkd.models.classifiers.base import Classifier
from rayoodkd.models.classifiers.external import accept_plain_state_dict


@dataclass(frozen=True)
class _FeatureMapSplit:
    """A torchvision family's ``forward`` cut at its last feature map, op for op (logits stay bit-identical).

    ``feature_map(model, x)`` runs the model up to that map; ``pool(model, map)`` runs the rest up to the
    head's input (the head itself is ``nn.Identity`` by then). ``map_channels(model)`` is the map's channel
    count, ``None`` where the map is pooled straight into the head (it then has ``feature_dim`` channels).
    """

    families: tuple[type[nn.Module], ...]
    feature_map: Callable[[Any, Tensor], Tensor]
    pool: Callable[[Any, Tensor], Tensor]
    map_channels: Callable[[Any], int] | None = None


def _chain(x: Tensor, modules: Iterable[nn.Module]) -> Tensor:
    for module in modules:
        x = module(x)
    return x


def _stages(model: nn.Module, names: Iterable[str]) -> Iterable[nn.Module]:
    return map(model.get_submodule, names)


def _last_conv_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


_RESNET_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_SHUFFLENET_STAGES = ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")
_GOOGLENET_STAGES = (
    *("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3"),
    *("inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4"),
    *("inception5a", "inception5b"),
)
_INCEPTION3_STAGES = (
    *("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    *("maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d"),
    *("Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"),
)

# Keyed by family name so that a TorchvisionClassifier holds only a string (it stays picklable).
# GoogLeNet/Inception-v3 skip their auxiliary heads, whose outputs their eval-mode forward discards.
_FEATURE_MAP_SPLITS: dict[str, _FeatureMapSplit] = {
    "resnet": _FeatureMapSplit(
        (tvm.ResNet,),
        lambda m, x: _chain(x, _stages(m, _RESNET_STAGES)),
        lambda m, f: torch.flatten(m.avgpool(f), 1),
    ),
    "regnet": _FeatureMapSplit(
        (tvm.RegNet,),
        lambda m, x: m.trunk_output(m.stem(x)),
        lambda m, f: m.avgpool(f).flatten(start_dim=1),
    ),
    "mobilenet_v2": _FeatureMapSplit(
        (tvm.MobileNetV2,),
        lambda m, x: m.features(x),
        lambda m, f: m.classifier(torch.flatten(F.adaptive_avg_pool2d(f, (1, 1)), 1)),
    ),
    "features_avgpool_classifier": _FeatureMapSplit(
        (tvm.MobileNetV3, tvm.EfficientNet, tvm.VGG, tvm.AlexNet),
        lambda m, x: m.features(x),
        lambda m, f: m.classifier(torch.flatten(m.avgpool(f), 1)),
        lambda m: _last_conv_channels(m.features),
    ),
    "densenet": _FeatureMapSplit(
        (tvm.DenseNet,),
        lambda m, x: F.relu(m.features(x), inplace=True),
        lambda m, f: torch.flatten(F.adaptive_avg_pool2d(f, (1, 1)), 1),
    ),
    "mnasnet": _FeatureMapSplit(
        (tvm.MNASNet,), lambda m, x: m.layers(x), lambda m, f: m.classifier(f.mean([2, 3]))
    ),
    "shufflenet_v2": _FeatureMapSplit(
        (tvm.ShuffleNetV2,),
        lambda m, x: _chain(x, _stages(m, _SHUFFLENET_STAGES)),
        lambda m, f: f.mean([2, 3]),
    ),
    "googlenet": _FeatureMapSplit(
        (tvm.GoogLeNet,),
        lambda m, x: _chain(m._transform_input(x), _stages(m, _GOOGLENET_STAGES)),
        lambda m, f: m.dropout(torch.flatten(m.avgpool(f), 1)),
    ),
    "inception_v3": _FeatureMapSplit(
        (tvm.Inception3,),
        lambda m, x: _chain(m._transform_input(x), _stages(m, _INCEPTION3_STAGES)),
        lambda m, f: torch.flatten(m.dropout(m.avgpool(f)), 1),
    ),
    "convnext": _FeatureMapSplit(
        (tvm.ConvNeXt,), lambda m, x: m.features(x), lambda m, f: m.classifier(m.avgpool(f))
    ),
    "swin": _FeatureMapSplit(
        (tvm.SwinTransformer,),
        lambda m, x: m.permute(m.norm(m.features(x))),
        lambda m, f: m.flatten(m.avgpool(f)),
    ),
    "maxvit": _FeatureMapSplit(
        (tvm.MaxVit,), lambda m, x: _chain(m.stem(x), m.blocks), lambda m, f: m.classifier(f)
    ),
}


class TorchvisionClassifier(Classifier):
    """Wraps a torchvision model: its final linear layer becomes ``fc`` and the rest ``backbone``.

    ``forward_features`` is the input of that final linear layer (e.g. the 512-d pooled ResNet-18
    features, or the 1024-d hidden layer of MobileNetV3-Small's classifier). ``forward_feature_map`` is the
    backbone's last feature map before its average pool (ResNet ``layer4``, MobileNet/EfficientNet/VGG
    ``features``, DenseNet's ReLU'd ``features``, Swin's norm output as NCHW, ...), and ``pool_features``
    the rest of the backbone: the pool and, where the head sits deeper, the layers before it (the hidden
    layer of MobileNetV3, the 7×7 pool and two hidden layers of VGG). ``family`` names the split used.
    The plain torchvision model's state dict (``conv1.weight``, ..., ``fc.weight``) loads too.
    Vision transformers (``vit_*``, ``family`` ``None``) have no feature map: their ``forward_features`` runs
    the whole backbone and the feature-map interface raises ``TypeError``.
    """

    def __init__(self, model: nn.Module, head_name: str) -> None:
        super().__init__()
        head = model.get_submodule(head_name)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"'{head_name}' is a {type(head).__name__}, not nn.Linear")
        model.set_submodule(head_name, nn.Identity())
        self.backbone = model
        self.fc = head
        self.head_name = head_name
        self.feature_dim = head.in_features
        self.family = next(
            (name for name, split in _FEATURE_MAP_SPLITS.items() if isinstance(model, split.families)), None
        )
        self.register_load_state_dict_pre_hook(accept_plain_state_dict)

    def wrapper_key(self, key: str) -> str:
        """This wrapper's key for a key of the plain torchvision model's state dict."""
        head = f"{self.head_name}."
        return f"fc.{key[len(head) :]}" if key.startswith(head) else f"backbone.{key}"

    def source_key(self, key: str) -> str:
        """The plain torchvision model's key for a key of this wrapper."""
        return f"{self.head_name}.{key[3:]}" if key.startswith("fc.") else key.removeprefix("backbone.")

    def _split(self) -> _FeatureMapSplit:
        if self.family is None:
            raise TypeError(f"torchvision {type(self.backbone).__name__} has no feature map (a transformer)")
        return _FEATURE_MAP_SPLITS[self.family]

    @property
    def feature_map_channels(self) -> int:
        map_channels = self._split().map_channels
        return self.feature_dim if map_channels is None else map_channels(self.backbone)

    def forward_feature_map(self, x: Tensor) -> Tensor:
        return self._split().feature_map(self.backbone, x)

    def pool_features(self, feature_map: Tensor) -> Tensor:
        return self._split().pool(self.backbone, feature_map)

    def forward_features(self, x: Tensor) -> Tensor:
        if self.family is None:
            return self.backbone(x)
        return super().forward_features(x)


def _find_layer(model: nn.Module, kind: type[nn.Module], last: bool = False) -> str:
    names = [name for name, m in model.named_modules() if isinstance(m, kind)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no {kind.__name__} layer to adapt")
    return names[-1] if last else names[0]


def _with_in_channels(conv: nn.Conv2d, in_channels: int, transfer: bool) -> nn.Conv2d:
    """Copy of ``conv`` taking ``in_channels`` inputs.

    With ``transfer`` the pretrained kernel is adapted as in timm's ``adapt_input_conv``: summed over the
    input channels for 1 channel, otherwise tiled and rescaled by ``old_in / in_channels``.
    """
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    if transfer:
        if conv.groups != 1:
            raise ValueError("cannot transfer the weights of a grouped first convolution")
        with torch.no_grad():
            old = conv.weight
            if in_channels == 1:
                new.weight.copy_(old.sum(dim=1, keepdim=True))
            else:
                reps = math.ceil(in_channels / old.shape[1])
                new.weight.copy_(old.repeat(1, reps, 1, 1)[:, :in_channels] * (old.shape[1] / in_channels))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    return new


def build_torchvision_classifier(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    weights_path: str | Path | None = None,
    **kwargs: Any,
) -> TorchvisionClassifier:
    """Build ``torchvision.models.get_model(name, weights=None, **kwargs)`` behind the common interface.

    ``weights_path``: a local state dict (loaded with ``weights_only=True``) for the unmodified torchvision
    architecture; its head size and first-conv input channels are read from the file. After loading, the
    first conv is adapted to ``in_channels`` (pretrained kernel transferred) and the head is re-initialised
    with ``num_classes`` outputs if the sizes differ. Model options (e.g. ViT's ``image_size``) go in kwargs.
    """
    if "weights" in kwargs:
        raise ValueError("torchvision weights are never downloaded; pass a local file as weights_path")
    state = None
    if weights_path is not None:
        state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
    else:
        kwargs.setdefault("num_classes", num_classes)
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    conv_name = _find_layer(model, nn.Conv2d)
    head_name = _find_layer(model, nn.Linear, last=True)
    conv: nn.Conv2d = model.get_submodule(conv_name)
    head: nn.Linear = model.get_submodule(head_name)
    if state is not None:
        missing = {f"{conv_name}.weight", f"{head_name}.weight"} - set(state)
        if missing:
            raise ValueError(
                f"{weights_path} is not a plain torchvision '{name}' state dict: no {sorted(missing)}"
            )
        ckpt_in = state[f"{conv_name}.weight"].shape[1] * conv.groups
        if ckpt_in != conv.in_channels:
            conv = _with_in_channels(conv, ckpt_in, transfer=False)
            model.set_submodule(conv_name, conv)
        ckpt_classes = state[f"{head_name}.weight"].shape[0]
        if ckpt_classes != head.out_features:
            head = nn.Linear(head.in_features, ckpt_classes, bias=head.bias is not None)
            model.set_submodule(head_name, head)
        model.load_state_dict(state)
    if conv.in_channels != in_channels:
        model.set_submodule(conv_name, _with_in_channels(conv, in_channels, transfer=state is not None))
    if head.out_features != num_classes:
        model.set_submodule(head_name, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))
    return TorchvisionClassifier(model, head_name)
