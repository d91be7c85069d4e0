"""The interface shared by every classifier (needed by KD3 classifier sharing and AuG-KD)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn


class Classifier(nn.Module, ABC):
    """Base class: ``forward(x) = fc(pool_features(forward_feature_map(x)))``.

    Subclasses set ``feature_map_channels`` (channels of the last feature map before pooling),
    ``feature_dim`` (size of the pooled penultimate features) and ``fc`` (the final ``nn.Linear``) and
    implement ``forward_feature_map``; they override ``pool_features`` when they do more than global average
    pooling. ``legacy_prefixes`` maps state-dict key prefixes used by the source repository to this module's
    names (e.g. DAFL/MosaicKD ``linear.`` → ``fc.``), so that the authors' released checkpoints load
    unchanged with ``load_state_dict``.
    """

    legacy_prefixes: ClassVar[dict[str, str]] = {}
    feature_map_channels: int
    feature_dim: int
    fc: nn.Linear

    def __init__(self) -> None:
        super().__init__()
        if self.legacy_prefixes:
            self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    @abstractmethod
    def forward_feature_map(self, x: Tensor) -> Tensor:
        """The last feature map before pooling, shape ``[N, feature_map_channels, H, W]``."""

    def pool_features(self, feature_map: Tensor) -> Tensor:
        """Penultimate features ``[N, feature_dim]`` from ``forward_feature_map``'s output."""
        return F.adaptive_avg_pool2d(feature_map, 1).flatten(1)

    def forward_features(self, x: Tensor) -> Tensor:
        """Penultimate features after pooling, shape ``[N, feature_dim]``."""
        return self.pool_features(self.forward_feature_map(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]``."""
        return self.fc(self.forward_features(x))


def _rename_legacy_keys(module: Classifier, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    for old, new in module.legacy_prefixes.items():
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)
