"""The registry of methods, keyed by the name used in ``method=NAME``."""

from __future__ import annotations

from rayoodkd.models.registry import Registry

METHODS = Registry("method")
