"""Per-epoch instance selection on webly collected images (KD3 §3.2 and its DFND-style baseline).

Every rank scores its own share of the web stream; only per-class counts and a few totals cross ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rayoodkd.methods.base import RunContext


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
