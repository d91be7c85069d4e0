"""Classifiers from outside rayoodkd: ``timm:<name>`` and a user's own ``module.path:ClassName``.

``module.path:ClassName`` imports ``module.path`` (it must be importable where rayoodkd runs: the current
directory, ``PYTHONPATH`` or an installed package; Ray workers started by the driver see the first two, see
docs/teachers.md) and calls ``ClassName(**kwargs)``; the attribute may also be a function returning an
``nn.Module``. ``num_classes``, ``in_channels`` and ``image_size`` are passed too, each only when the callable
names that parameter. Naming a module runs its code, by design: the user names it. A callable that builds a
:class:`~rayoodkd.models.classifiers.base.Classifier` is used as it is; any other ``nn.Module`` is wrapped
in :class:`ModuleClassifier` (logits only). ``timm:<name>`` is ``timm.create_model(name, pretrained=False,
num_classes=..., in_chans=..., **kwargs)`` (nothing is downloaded; timm is optional) behind the full
interface. Both wrappers load the wrapped network's own state dict unchanged (its keys, without the
wrapper's ``model.`` prefix), so weights saved by another project import as they are.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from torch import Tensor, nn

from rayoodkd.errors import first_line, one_line
from rayoodkd.models.classifiers.base import Classifier

TIMM_PREFIX = "timm:"
BUILD_ARGUMENTS = ("num_classes", "in_channels", "image_size")


def accept_plain_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook of a wrapper with ``wrapper_key(key)``: rename the keys of the wrapped
    network's own state dict to the wrapper's when more of them fit that way (a wrapper-form dict, e.g. a
    rayoodkd checkpoint, is left alone)."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    if not keys:
        return
    expected = set(module.state_dict(keep_vars=True))
    given = [k[len(prefix) :] for k in keys]
    renamed = [module.wrapper_key(k) for k in given]
    if len(expected.intersection(renamed)) > len(expected.intersection(given)):
        for key, new in zip(keys, renamed, strict=True):
            state_dict[prefix + new] = state_dict.pop(key)


class ModuleClassifier(Classifier):
    """Any ``nn.Module`` mapping images to logits, as a classifier: ``forward`` is the module's own.

    It has no feature interface (``forward_feature_map`` and friends raise ``TypeError``): methods that read
    the teacher's features (kd3) need a :class:`Classifier` subclass. State-dict keys are ``model.<key>``;
    the module's plain state dict loads too.
    """

    def __init__(self, model: nn.Module, arch: str) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.register_load_state_dict_pre_hook(accept_plain_state_dict)

    @staticmethod
    def wrapper_key(key: str) -> str:
        return f"model.{key}"

    @staticmethod
    def source_key(key: str) -> str:
        return key.removeprefix("model.")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _no_features(self) -> TypeError:
        return TypeError(
            f"arch {self.arch!r} is a plain nn.Module: it gives logits only, no feature map or pooled "
            "features (subclass rayoodkd.models.Classifier for methods that read them)"
        )

    def forward_feature_map(self, x: Tensor) -> Tensor:
        raise self._no_features()

    def pool_features(self, feature_map: Tensor) -> Tensor:
        raise self._no_features()

    def forward_features(self, x: Tensor) -> Tensor:
        raise self._no_features()


def _resolve(arch: str) -> Any:
    module_name, _, attribute = arch.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"arch {arch!r}: expected module.path:ClassName")
    # The current directory, as `python -m` and every Ray worker of a local driver have it (a console
    # script's sys.path lacks it); last, so that it never shadows an installed module.
    if not {"", os.getcwd()} & set(sys.path):
        sys.path.append(os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # an import runs arbitrary code: any failure is one line
        raise ValueError(
            f"module {module_name!r} of arch {arch!r} cannot be imported ({one_line(error, 160)}); it must "
            "be importable where rayoodkd runs: the current directory, PYTHONPATH or an installed package"
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no {attribute!r} (arch {arch!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"arch {arch!r}: {attribute} is a {type(target).__name__}, not a class or function")
    return target


def _named_parameters(builder: Any) -> set[str]:
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return set()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in parameters if p.kind in named}


def build_module_classifier(
    arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs: Any
) -> Classifier:
    """``module.path:ClassName(**kwargs)``, plus ``num_classes``/``in_channels``/``image_size`` where the
    callable names them; a plain ``nn.Module`` is wrapped in :class:`ModuleClassifier`."""
    builder = _resolve(arch)
    given = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    accepted = _named_parameters(builder)
    kwargs = {**{k: v for k, v in given.items() if k in accepted and k not in kwargs}, **kwargs}
    try:
        model = builder(**kwargs)
    except Exception as error:  # the user's constructor: any failure is one line
        call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise TypeError(f"{arch}({call}) failed: {one_line(error, 200)}") from None
    if isinstance(model, Classifier):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"arch {arch!r} built a {type(model).__name__}, not a torch nn.Module")
    return ModuleClassifier(model, arch)


class TimmClassifier(ModuleClassifier):
    """A timm model: ``forward`` is its own; ``forward_feature_map`` its ``forward_features`` (when that is
    an NCHW map, not a transformer's tokens), ``pool_features`` its ``forward_head(pre_logits=True)``, ``fc``
    its classifier."""

    @property
    def fc(self) -> nn.Linear:  # type: ignore[override]
        head = self.model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise TypeError(
                f"arch {self.arch!r}: the timm classifier is a {type(head).__name__}, not nn.Linear"
            )
        return head

    @property
    def feature_dim(self) -> int:  # type: ignore[override]
        return self.fc.in_features

    @property
    def feature_map_channels(self) -> int:  # type: ignore[override]
        return int(self.model.num_features)

    def forward_feature_map(self, x: Tensor) -> Tensor:
        feature_map = self.model.forward_features(x)
        if feature_map.dim() != 4 or feature_map.shape[1] != self.feature_map_channels:
            raise TypeError(
                f"arch {self.arch!r}: forward_features gives shape {list(feature_map.shape)}, "
                f"not an NCHW map of {self.feature_map_channels} channels"
            )
        return feature_map

    def pool_features(self, feature_map: Tensor) -> Tensor:
        return self.model.forward_head(feature_map, pre_logits=True)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def build_timm_classifier(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> TimmClassifier:
    """``timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)``
    (never downloads: weights come from an imported state dict)."""
    arch = f"{TIMM_PREFIX}{name}"
    try:
        import timm
    except ImportError:
        raise ValueError(f"arch {arch!r} needs timm, which is not installed here: pip install timm") from None
    if "pretrained" in kwargs:
        raise ValueError(f"arch {arch!r}: timm weights are never downloaded; import a local state dict")
    if not timm.is_model(name):
        raise ValueError(f"arch {arch!r}: timm {timm.__version__} has no model {name!r}")
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except Exception as error:  # timm's constructors: any failure is one line
        raise TypeError(f"arch {arch!r}: timm.create_model failed: {first_line(error)}") from None
    return TimmClassifier(model, arch)
