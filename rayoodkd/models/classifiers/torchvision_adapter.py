"""Any torchvision classifier (``torchvision:<name>``) behind the common classifier interface.

Nothing is ever downloaded: the architecture is built with ``weights=None`` and optional weights come from
a local state-dict file (``weights_path``, e.g. a saved torchvision/AuG-KD checkpoint). The first
``nn.Conv2d`` is adapted to ``in_channels`` and the last ``nn.Linear`` (the head, exposed as ``fc``) is
replaced when ``num_classes`` differs from the checkpoint's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from rayoodkd.models.classifiers.base import Classifier


class TorchvisionClassifier(Classifier):
    """Wraps a torchvision model: its final linear layer becomes ``fc`` and the rest ``backbone``.

    ``forward_features`` is the input of that final linear layer (e.g. the 512-d pooled ResNet-18
    features, or the 1024-d hidden layer of MobileNetV3-Small's classifier).
    """

    def __init__(self, model: nn.Module, head_name: str) -> None:
        super().__init__()
        head = model.get_submodule(head_name)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"'{head_name}' is a {type(head).__name__}, not nn.Linear")
        model.set_submodule(head_name, nn.Identity())
        self.backbone = model
        self.fc = head
        self.feature_dim = head.in_features

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)


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
