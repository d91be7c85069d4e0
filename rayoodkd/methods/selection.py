"""Per-epoch instance selection on webly collected images (KD3 §3.2 and its DFND-style baseline).

Every rank scores its own share of the web stream; only per-class counts and a few totals cross ranks.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from rayoodkd.methods.base import MethodConfig, RunContext, Stage
from rayoodkd.methods.optim import OptimizerConfig, sgd


class EpochSelectionOptimizers(MethodConfig):
    """KD3's official: SGD, × 0.1 at 62.5 %, 75 % and 87.5 % of the epochs (150/180/210 of 240), set at
    each epoch's start."""

    student: OptimizerConfig = sgd(
        0.05, weight_decay=5e-4, schedule="multistep", milestones=(0.625, 0.75, 0.875)
    )


class EpochSelectionConfig(MethodConfig):
    """What the methods that re-select the web stream every epoch share (defaults: KD3's official code,
    spec §5.4): the selection rule, the epoch budget, and the student's optimizer over the epochs."""

    epochs: int = Field(240, ge=1, description="epochs, each starting with a selection over the web stream")
    p_cutoff: float = Field(0.95, gt=0, lt=1, description="the confidence cut for the most predicted class")
    class_adaptive: bool = Field(True, description="FlexMatch per-class thresholds (false: p_cutoff for all)")
    scan_batch_size: int = Field(512, ge=1)
    eval_every_epochs: int | None = Field(
        1, ge=1, description="evaluate and checkpoint every this many epochs; null: every eval.every steps"
    )
    steps_per_epoch: int | None = Field(
        None,
        ge=1,
        description="fixed steps per epoch, cycling the selection (equal-step comparisons); "
        "null: one pass over the selection (official)",
    )
    optim: EpochSelectionOptimizers = EpochSelectionOptimizers()

    def stage(self) -> Stage:
        return Stage("train", epochs=self.epochs, eval_every_epochs=self.eval_every_epochs)

    def lr_at(self, epoch: int) -> float:
        """The student's lr in ``epoch``: a function of the epoch, exact however a run is resumed."""
        return self.optim.student.lr_at(epoch, self.epochs)

    def epoch_steps(self, selected_steps: int) -> int:
        """``steps_per_epoch`` when set, else the selection's batches; 0 when it fills no batch."""
        return (self.steps_per_epoch or selected_steps) if selected_steps > 0 else 0


def class_adaptive_thresholds(counts: Tensor, p_cutoff: float) -> Tensor:
    """τ_k = p_cutoff · β_k / (2 − β_k) with β_k = N_k / max N (FlexMatch's warped thresholds)."""
    beta = counts.float() / counts.max().clamp_min(1).float()
    return p_cutoff * beta / (2 - beta)


def select_confident(
    confidence: Tensor, prediction: Tensor, p_cutoff: float, class_adaptive: bool, ctx: RunContext
) -> tuple[Tensor, Tensor]:
    """``(keep mask, per-class thresholds)``: row i is kept iff its top probability ``confidence`` exceeds
    the threshold of its predicted class. The thresholds come from the predicted-class counts of every
    rank's rows (all-reduced), so all ranks apply the same rule to their own shard."""
    if class_adaptive:
        counts = ctx.all_reduce(torch.bincount(prediction, minlength=ctx.num_classes))
        thresholds = class_adaptive_thresholds(counts, p_cutoff)
    else:
        thresholds = torch.full((ctx.num_classes,), p_cutoff, device=confidence.device)
    return confidence > thresholds[prediction], thresholds


def selection_metrics(
    keep: Tensor, predictions: Tensor, origins: Tensor, ctx: RunContext
) -> dict[str, float]:
    """Size of the selection over all ranks and, when the corpus records its images' origins (label ≥ 0: an
    image of that teacher class; < 0: off-task, e.g. ``web-digits``), its precision and recall of the
    in-task images and the accuracy of the predicted class on the in-task images it kept."""
    keep, predictions = keep.to(origins.device), predictions.to(origins.device)
    in_task = origins >= 0
    totals = torch.stack(
        [
            keep.sum(),
            torch.tensor(len(keep), device=keep.device),
            in_task.sum(),
            (keep & in_task).sum(),
            (keep & in_task & (predictions == origins)).sum(),
        ]
    )
    selected, scanned, in_task_rows, kept_in_task, kept_correct = ctx.all_reduce(totals).tolist()
    metrics = {
        "select/size": selected,
        "select/scanned": scanned,
        "select/fraction": selected / max(scanned, 1),
    }
    if in_task_rows > 0:
        metrics["select/precision"] = kept_in_task / max(selected, 1)
        metrics["select/recall"] = kept_in_task / in_task_rows
        metrics["select/label_accuracy"] = kept_correct / max(kept_in_task, 1)
    return {key: float(value) for key, value in metrics.items()}
