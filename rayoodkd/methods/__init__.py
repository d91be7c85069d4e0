"""Distillation methods, one module each. Importing this package registers every method in :data:`METHODS`."""

import importlib
import pkgutil

from rayoodkd.methods.base import (
    Method,
    MethodConfig,
    PlayerOptions,
    RunContext,
    Stage,
    Streams,
    kd_loss,
    unwrap,
)
from rayoodkd.methods.registry import METHODS

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHODS",
    "Method",
    "MethodConfig",
    "PlayerOptions",
    "RunContext",
    "Stage",
    "Streams",
    "kd_loss",
    "unwrap",
]
