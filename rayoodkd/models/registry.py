"""Name → builder registries for classifiers, generators and discriminators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])


class Registry:
    """A mapping from names to callables that build ``nn.Module`` objects.

    ``kind`` is used in error messages ("unknown classifier 'x'; allowed: ...").
    ``extra_allowed`` lists name patterns that a caller resolves outside the registry
    (e.g. ``"torchvision:<name>"``); they are only shown in the error message.
    """

    def __init__(self, kind: str, extra_allowed: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.extra_allowed = extra_allowed
        self._builders: dict[str, Callable[..., nn.Module]] = {}

    def register(self, name: str) -> Callable[[BuilderT], BuilderT]:
        """Decorator that registers a builder (a function or an ``nn.Module`` class) under ``name``."""

        def decorator(builder: BuilderT) -> BuilderT:
            if name in self._builders:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._builders[name] = builder
            return builder

        return decorator

    def get(self, name: str) -> Callable[..., nn.Module]:
        """Return the builder registered under ``name``; raise ``ValueError`` listing the allowed names."""
        try:
            return self._builders[name]
        except KeyError:
            allowed = ", ".join([*self.names(), *self.extra_allowed])
            raise ValueError(f"unknown {self.kind} '{name}'; allowed: {allowed}") from None

    def build(self, name: str, **kwargs: Any) -> nn.Module:
        """Build the module registered under ``name`` with keyword arguments ``kwargs``."""
        return self.get(name)(**kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._builders)


CLASSIFIERS = Registry(
    "classifier", extra_allowed=("torchvision:<name>", "timm:<name>", "<module.path>:<ClassName>")
)
GENERATORS = Registry("generator")
DISCRIMINATORS = Registry("discriminator")
