"""rayoodkd: out-of-domain knowledge distillation on Ray.

``rayoodkd.fit(config, **overrides)`` runs a distillation and returns its summary; ``rayoodkd.load_student``
loads the student it logged to MLflow (see :mod:`rayoodkd.api`). Importing the package is cheap: torch, Ray
and MLflow load when these are first used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "fit", "load_student", "resolve"]


def __getattr__(name: str) -> Any:
    if name in ("fit", "load_student", "resolve"):
        from rayoodkd import api

        return getattr(api, name)
    raise AttributeError(f"module 'rayoodkd' has no attribute {name!r}")
