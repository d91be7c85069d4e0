"""Distillation methods. Importing this package registers every method in :data:`METHODS`."""

from rayoodkd.methods import kd
from rayoodkd.methods.base import Method, MethodConfig, RunContext, Streams, kd_loss, unwrap
from rayoodkd.methods.registry import METHODS

__all__ = ["METHODS", "Method", "MethodConfig", "RunContext", "Streams", "kd", "kd_loss", "unwrap"]
