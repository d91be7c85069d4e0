"""rayoodkd: out-of-domain knowledge distillation on Ray."""

__version__ = "0.1.0"
