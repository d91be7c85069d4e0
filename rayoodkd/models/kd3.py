"""KD3's networks (spec/methods.md §5.2): the SimKD projector, the contrastive embedding heads, and the
deployable student that shares the frozen teacher's classifier."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayoodkd.models.classifiers.base import Classifier


class Projector(nn.Sequential):
    """SimKD's projector P (KD3 ``KDDD``): conv1×1(s→t/f) BN ReLU, conv3×3(t/f→t/f) BN ReLU,
    conv1×1(t/f→t) BN ReLU, with f the reduction ``factor`` (2)."""

    def __init__(self, student_channels: int, teacher_channels: int, factor: int = 2) -> None:
        hidden = max(teacher_channels // factor, 1)
        super().__init__(
            nn.Conv2d(student_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, teacher_channels, 1, bias=False),
            nn.BatchNorm2d(teacher_channels),
            nn.ReLU(inplace=True),
        )


class EmbedHead(nn.Module):
    """Linear(features → dim) then L2 normalisation: the contrastive embedding on pooled features."""

    def __init__(self, in_features: int, dim: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, dim)

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(self.linear(features), dim=1)


class SharedHead(nn.Module):
    """A frozen copy of what the teacher does after its last feature map (pooling, any hidden layers, its
    FC): the classifier KD3 shares with the student. Layers of the teacher that the head never calls are
    dropped from the copy, so the deployable student does not carry the teacher's backbone."""

    def __init__(self, teacher: Classifier, feature_map: Tensor) -> None:
        super().__init__()
        self.classifier = copy.deepcopy(teacher).eval().requires_grad_(False)
        with torch.no_grad():
            expected = self(feature_map)
            pruned = copy.deepcopy(self.classifier)
            for name in _uncalled_layers(pruned, lambda: pruned.fc(pruned.pool_features(feature_map))):
                pruned.set_submodule(name, nn.Identity())
            if torch.equal(pruned.fc(pruned.pool_features(feature_map)), expected):
                self.classifier = pruned

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.classifier.fc(self.classifier.pool_features(feature_map))

    def train(self, mode: bool = True) -> SharedHead:
        """Always in eval mode: the teacher's classifier is frozen, batch-norm statistics included."""
        return super().train(False)


def _uncalled_layers(module: nn.Module, run: Callable[[], object]) -> list[str]:
    """Names of the leaf layers holding weights that ``run()`` does not call."""
    called: set[int] = set()
    handles = [m.register_forward_hook(lambda m, *_: called.add(id(m))) for m in module.modules()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return [
        name
        for name, m in module.named_modules()
        if name
        and not list(m.children())
        and id(m) not in called
        and any(True for _ in [*m.parameters(recurse=False), *m.buffers(recurse=False)])
    ]


class SharedClassifierStudent(nn.Module):
    """KD3's deployable student: ``z_S = head_T(P(f_S))`` — the student's backbone up to its last feature map,
    the projector, then the teacher's frozen classifier. The backbone's own FC is never trained."""

    def __init__(self, backbone: Classifier, projector: nn.Module, head: SharedHead, map_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone.fc.requires_grad_(False)
        self.projector = projector
        self.head = head
        self.map_size = map_size

    def forward(
        self, x: Tensor, features: bool = False, pooled_only: bool = False
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Logits; with ``features``, also the student's pooled features and the projected feature map; with
        ``pooled_only``, only the pooled features, from the backbone alone (the MixDistribution view: in the
        official training loop the projector, and so its batch-norm statistics, sees clean images only)."""
        student_map = self.backbone.forward_feature_map(x)
        if pooled_only:
            return self.backbone.pool_features(student_map)
        aligned = student_map
        if student_map.shape[-1] > self.map_size:  # the larger map is pooled to the smaller (§5.2)
            aligned = F.adaptive_avg_pool2d(student_map, self.map_size)
        projected = self.projector(aligned)
        logits = self.head(projected)
        if not features:
            return logits
        return logits, self.backbone.pool_features(student_map), projected

    def extra_parameters(self) -> int:
        """Parameters the deployed student carries beyond its backbone: projector and teacher's head."""
        return sum(p.numel() for p in [*self.projector.parameters(), *self.head.parameters()])
