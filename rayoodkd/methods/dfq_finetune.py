"""DFQ+ — data-free DFQ, then fine-tuning on a small labelled student-domain set: the two-stage baseline that
AuG-KD (spec/methods.md §3.6) sets against anchor-based mixup ("DFKD followed by fine-tuning").

Stage ``datafree`` (``datafree_steps`` outer iterations) is exactly :class:`~rayoodkd.methods.dfq.DFQ`; its
student is selected on ``data.val`` and that snapshot is reloaded when the stage ends. Stage ``finetune``
(``finetune_steps``) trains the student alone::

    x, y ~ labelled student-domain stream;  L = CE(S(x), y) + kd_weight · kldiv(S(x), T(x), τ)   S ← step

with its own optimizer and cosine schedule over the stage; the run's best-on-val student is the one the
fine-tuning stage selects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rayoodkd.methods.base import Metrics, RunContext, Stage, Streams, kd_loss
from rayoodkd.methods.dfq import DFQ, DFQConfig, DFQOptimizers
from rayoodkd.methods.optim import OptimizerConfig, sgd
from rayoodkd.methods.registry import METHODS


class DFQFinetuneOptimizers(DFQOptimizers):
    """DFQ's, and the fine-tuning optimizer (cosine over the fine-tuning budget)."""

    finetune: OptimizerConfig = sgd(0.01, weight_decay=5e-4, schedule="cosine")


class DFQFinetuneConfig(DFQConfig):
    """DFQ's keys, the two stage budgets and the fine-tuning optimiser."""

    datafree_steps: int = Field(500, ge=1, description="DFQ outer iterations (stage 1)")
    finetune_steps: int = Field(500, ge=1, description="fine-tuning steps on data.labelled (stage 2)")
    optim: DFQFinetuneOptimizers = DFQFinetuneOptimizers()
    finetune_kd_weight: float = Field(0.0, ge=0, description="weight of kldiv from the teacher (0: CE only)")
    finetune_temperature: float = Field(4.0, gt=0)


@METHODS.register("dfq_finetune")
class DFQFinetune(DFQ):
    """DFQ, then CE fine-tuning of the selected data-free student on the labelled student-domain data."""

    name = "dfq_finetune"
    consumes = frozenset({"labelled"})
    Config = DFQFinetuneConfig

    def __init__(
        self, teacher: nn.Module, student: nn.Module, cfg: DFQFinetuneConfig, ctx: RunContext
    ) -> None:
        super().__init__(teacher, student, cfg, ctx)
        self.opt_ft, self.sched_ft = cfg.optim.finetune.build(student.parameters(), cfg.finetune_steps)

    def datafree_steps(self) -> int:
        return self.cfg.datafree_steps

    def stages(self) -> list[Stage]:
        cfg: DFQFinetuneConfig = self.cfg
        return [
            Stage("datafree", cfg.datafree_steps, trains=("student", "generator"), reload_best=True),
            Stage("finetune", cfg.finetune_steps, trains=("student",)),
        ]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {**super().optimizers(), "finetune": self.opt_ft}

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {**super().schedulers(), "finetune": self.sched_ft}

    def train_step(self, data: Streams) -> Metrics:
        if self.ctx.stage == "datafree":
            return super().train_step(data)
        return self.finetune_step(data)

    def finetune_step(self, data: Streams) -> Metrics:
        """One CE (+ optional KD) step of the student on a labelled student-domain batch."""
        cfg: DFQFinetuneConfig = self.cfg
        batch = data.next("labelled")
        images, labels = batch["image"], batch["label"]
        self.student.train()
        with self.ctx.autocast():
            logits = self.student(images).float()
        loss_ce = F.cross_entropy(logits, labels)
        loss = loss_ce
        metrics = {"loss/ce": loss_ce.detach()}
        if cfg.finetune_kd_weight > 0:
            with torch.no_grad(), self.ctx.autocast():
                teacher_logits = self.teacher(images).float()
            loss_kd = kd_loss(logits, teacher_logits, cfg.finetune_temperature)
            loss = loss + cfg.finetune_kd_weight * loss_kd
            metrics["loss/kd"] = loss_kd.detach()
        self.ctx.step(loss, self.opt_ft, "finetune")
        self.sched_ft.step()
        return {
            **metrics,
            "train/top1": 100 * (logits.argmax(1) == labels).float().mean(),
            "lr/student": self.opt_ft.param_groups[0]["lr"],
            "images": float(len(images)),
        }
