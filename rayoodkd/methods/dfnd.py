"""DFND-style KD on webly collected images: the teacher alone selects, every epoch, the web images it is
confident about, and the student distils the teacher on them — the "teacher-only confidence selection"
baseline of KD3 (spec/methods.md §5; no student vote, no feature alignment, no contrastive term).

At the start of every epoch (``Method.begin_epoch``), over this rank's whole share of the web stream::

    p_i = softmax(T(x_i));  c_i = max_k p_ik;  ŷ_i = argmax_k p_ik              (no augmentation)
    N_k = #{i : ŷ_i = k}, summed over all ranks;  β_k = N_k / max_k' N_k'
    τ_k = p_cutoff · β_k / (2 − β_k)                                              (FlexMatch, KD3 §5.2)
    select i  ⇔  c_i > τ_ŷ_i

then, for as many steps as the smallest rank's selection fills::

    x ~ selected rows (augmented);  L = τ²·KL(softmax(T(x)/τ) ‖ softmax(S(x)/τ))   S ← SGD step

The learning rate drops by ``gamma`` at the given fractions of the epochs (KD3: ×0.1 at 150/180/210 of 240).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from rayoodkd.methods.base import Method, Metrics, RunContext, Stage, Streams, kd_loss
from rayoodkd.methods.registry import METHODS
from rayoodkd.methods.selection import EpochSelectionConfig, select_confident, selection_metrics


class DFNDConfig(EpochSelectionConfig):
    """Teacher-only selection and KD (defaults: KD3's optimiser and threshold, spec §5.4)."""

    temperature: float = Field(4.0, gt=0)


@METHODS.register("dfnd")
class DFND(Method):
    """KD on the web images the teacher is confident about, re-selected every epoch."""

    name = "dfnd"
    consumes = frozenset({"web"})
    Config = DFNDConfig

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: DFNDConfig, ctx: RunContext) -> None:
        super().__init__(teacher, student, cfg, ctx)
        self.optimizer = cfg.optim.student.optimizer(student.parameters())

    def stages(self) -> list[Stage]:
        return [self.cfg.stage()]

    def players(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.optimizer}

    @torch.no_grad()
    def begin_epoch(self, data: Streams, epoch: int) -> tuple[int, dict[str, float]]:
        cfg: DFNDConfig = self.cfg
        units, labels, confidences, predictions = [], [], [], []
        for batch in data.scan("web", cfg.scan_batch_size):
            with self.ctx.autocast():
                confidence, prediction = torch.softmax(self.teacher(batch["image"]).float(), 1).max(1)
            confidences.append(confidence)
            predictions.append(prediction)
            units.append((batch["unit"] * 255).round().to(torch.uint8).cpu())
            labels.append(batch["label"])
        confidence, prediction, origins = torch.cat(confidences), torch.cat(predictions), torch.cat(labels)
        keep, thresholds = select_confident(
            confidence, prediction, cfg.p_cutoff, cfg.class_adaptive, self.ctx
        )
        selected_steps = data.use_selection("web", torch.cat(units)[keep.cpu()], origins[keep].cpu(), epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(epoch)
        steps = cfg.epoch_steps(selected_steps)
        return steps, {
            **selection_metrics(keep, prediction, origins, self.ctx),
            "select/threshold_min": float(thresholds.min()),
            "select/steps": float(steps),
        }

    def train_step(self, data: Streams) -> Metrics:
        images = data.next("web")["image"]
        self.student.train()
        with torch.no_grad(), self.ctx.autocast():
            teacher_logits = self.teacher(images).float()
        with self.ctx.autocast():
            student_logits = self.student(images).float()
        loss = kd_loss(student_logits, teacher_logits, self.cfg.temperature)
        self.ctx.step(loss, self.optimizer, "student")
        return {
            "loss/kd": loss.detach(),
            "train/agreement": (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean(),
            "lr/student": self.optimizer.param_groups[0]["lr"],
            "images": float(len(images)),
        }
