"""Hinton knowledge distillation on real images: ``kd_ood`` (raw OOD corpus) and ``kd_id`` (in-domain).

``kd_ood`` is MosaicKD's "KD on OOD data" baseline (``kd_vanilla.py``, spec §6.2): the student mimics the
teacher's softened outputs on unlabelled out-of-domain images. ``kd_id`` is the upper bound (spec §6.1):
the same loss on the in-domain training images, plus an optional cross-entropy on their labels.

Per step::

    x ~ stream;  t = T(x);  s = S(x)
    L = α · τ² · KL(softmax(t/τ) ‖ softmax(s/τ)) + (1 − α) · CE(s, y)
    S ← S − η ∇L          (SGD with momentum, cosine schedule per iteration)
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from rayoodkd.methods.base import Method, MethodConfig, Metrics, RunContext, Streams, kd_loss
from rayoodkd.methods.optim import OptimizerConfig, sgd
from rayoodkd.methods.registry import METHODS


class KDOptimizers(MethodConfig):
    student: OptimizerConfig = sgd(0.1, weight_decay=1e-4, schedule="cosine")


class KDConfig(MethodConfig):
    """Hyper-parameters of Hinton KD (defaults: MosaicKD ``kd_vanilla.py``)."""

    temperature: float = Field(5.0, gt=0)
    kd_weight: float = Field(1.0, ge=0, le=1, description="α; 1 − α weights the CE on labels (kd_id only)")
    optim: KDOptimizers = KDOptimizers()


class _HintonKD(Method):
    stream: ClassVar[str]
    Config = KDConfig

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: KDConfig, ctx: RunContext) -> None:
        super().__init__(teacher, student, cfg, ctx)
        self.optimizer, self.scheduler = cfg.optim.student.build(student.parameters(), ctx.max_steps)

    def players(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.optimizer}

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {"student": self.scheduler}

    def train_step(self, data: Streams) -> Metrics:
        cfg: KDConfig = self.cfg
        batch = data.next(self.stream)
        images, labels = batch["image"], batch["label"]
        self.student.train()
        with torch.no_grad(), self.ctx.autocast():
            teacher_logits = self.teacher(images)
        with self.ctx.autocast():
            student_logits = self.student(images)
            loss_kd = kd_loss(student_logits.float(), teacher_logits.float(), cfg.temperature)
            loss = cfg.kd_weight * loss_kd
            metrics = {"loss/kd": loss_kd.detach()}
            if cfg.kd_weight < 1 and bool((labels >= 0).all()):
                loss_ce = nn.functional.cross_entropy(student_logits.float(), labels)
                loss = loss + (1 - cfg.kd_weight) * loss_ce
                metrics["loss/ce"] = loss_ce.detach()
        self.ctx.step(loss, self.optimizer, "student")
        self.scheduler.step()
        agreement = (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean()
        return {
            **metrics,
            "loss/total": loss.detach(),
            "train/agreement": agreement,
            "lr/student": self.optimizer.param_groups[0]["lr"],
            "images": float(images.shape[0]),
        }


@METHODS.register("kd_ood")
class KDOnOOD(_HintonKD):
    """KD on the raw out-of-domain corpus ("KD on OOD data" / blind KD)."""

    name = "kd_ood"
    consumes = frozenset({"ood"})
    stream = "ood"


@METHODS.register("kd_id")
class KDInDomain(_HintonKD):
    """KD on the in-domain training images: the upper bound the OOD methods are measured against."""

    name = "kd_id"
    consumes = frozenset({"labelled"})
    stream = "labelled"
