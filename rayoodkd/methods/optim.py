"""One optimizer-and-schedule config for every player of every method (``<method>.optim.<player>.*``).

A method lists its players' defaults in an ``optim`` section (MosaicKD's: SGD for the student, Adam for the
generator and the discriminator, all cosine); a user changes one key, ``mosaickd.optim.generator.lr=2e-4``,
and the player's other defaults stay. The schedule is a function of the progress through the budget the
method gives it (its stage's steps, or its epochs), computed from the *current* budget: a run relaunched
with a larger ``max_steps`` anneals over the new budget instead of the one it started with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from rayoodkd.methods.base import MethodConfig


class OptimizerConfig(MethodConfig):
    """A player's optimizer and its learning-rate schedule over the budget the method gives it."""

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    nesterov: bool = Field(False, description="sgd only")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam only")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine", "multistep"] = "constant"
    eta_min: float = Field(0.0, ge=0, description="cosine: the learning rate at the end of the budget")
    milestones: tuple[float, ...] = Field(
        (), description="multistep: fractions of the budget where the learning rate is multiplied by gamma"
    )
    gamma: float = Field(0.1, gt=0, le=1, description="multistep: the factor at each milestone")

    @model_validator(mode="after")
    def _check(self) -> OptimizerConfig:
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError(
                "schedule=multistep needs milestones (fractions of the budget, e.g. [0.5, 0.75])"
            )
        if any(not 0 < fraction <= 1 for fraction in self.milestones):
            raise ValueError(f"milestones: fractions in (0, 1], got {list(self.milestones)}")
        return self

    def factor(self, done: int, budget: int) -> float:
        """The learning rate's multiplier after ``done`` of ``budget`` steps (or epochs)."""
        if self.schedule == "cosine":
            progress = min(done, budget) / max(budget, 1)
            floor = self.eta_min / self.lr
            return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2
        if self.schedule == "multistep":
            passed = sum(done >= max(1, round(fraction * budget)) for fraction in self.milestones)
            return self.gamma**passed
        return 1.0

    def lr_at(self, done: int, budget: int) -> float:
        """The learning rate after ``done`` of ``budget`` steps or epochs (methods that set it per epoch)."""
        return self.lr * self.factor(done, budget)

    def optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer over ``params`` at the base learning rate."""
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            params,
            lr=self.lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
        )

    def build(
        self, params: Iterable[nn.Parameter], budget: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimizer and a scheduler, stepped once per step, annealing over ``budget`` steps.

        The multiplier is a plain function of the scheduler's step count (LambdaLR saves no function in its
        state), so a resumed scheduler follows the budget of the resumed run."""
        optimizer = self.optimizer(params)

        def multiplier(done: int) -> float:
            return self.factor(done, budget)

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def sgd(lr: float, **options: object) -> OptimizerConfig:
    """An SGD default (momentum 0.9 unless given)."""
    return OptimizerConfig(name="sgd", lr=lr, **options)


def adam(lr: float, **options: object) -> OptimizerConfig:
    """An Adam default."""
    return OptimizerConfig(name="adam", lr=lr, **options)
