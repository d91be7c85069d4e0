"""Averaging a method's step metrics between logs without a host sync per step.

``train_step`` returns its losses as detached tensors (or plain numbers); they are summed where they live,
and the host reads them once per log, in one transfer. On a GPU a ``.item()`` per metric per step would
wait for the step's kernels a dozen times; here the step never waits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

SUMMED = frozenset({"images"})  # counts added up over the interval, not averaged


class MetricAccumulator:
    """Per-key sums and counts of the metrics since the last :meth:`flush`."""

    def __init__(self) -> None:
        self.tensor_sums: dict[str, Tensor] = {}
        self.number_sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, Tensor | float]) -> None:
        """Add one step's (or one epoch start's) metrics."""
        for key, value in metrics.items():
            if isinstance(value, Tensor):
                value = value.detach().reshape(()).to(torch.float64)
                previous = self.tensor_sums.get(key)
                self.tensor_sums[key] = value if previous is None else previous + value
            else:
                self.number_sums[key] = self.number_sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self) -> dict[str, float]:
        """The means (sums for :data:`SUMMED` keys) since the last flush, read in one transfer; then reset."""
        totals = dict(self.number_sums)
        if self.tensor_sums:
            keys = list(self.tensor_sums)
            values = torch.stack([self.tensor_sums[key] for key in keys]).cpu().tolist()
            for key, value in zip(keys, values, strict=True):
                totals[key] = totals.get(key, 0.0) + value
        means = {key: total if key in SUMMED else total / self.counts[key] for key, total in totals.items()}
        self.tensor_sums, self.number_sums, self.counts = {}, {}, {}
        return means
