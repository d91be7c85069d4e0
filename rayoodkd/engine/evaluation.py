"""Accuracy of a student on a labelled in-domain set, split across ranks and summed exactly."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    teacher: nn.Module | None = None,
    batch_size: int = 512,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Top-1, top-5 (%) and agreement with the teacher (%) over the whole set.

    ``images`` are already normalised. Rank r scores rows r, r + world_size, ...; the counts are summed
    over ranks, so every rank returns the figures of the full set.
    """
    device = device or images.device
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)
    mine = torch.arange(rank, len(images), world_size)
    for start in range(0, len(mine), batch_size):
        index = mine[start : start + batch_size]
        x, y = images[index].to(device), labels[index].to(device)
        logits = model(x).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top5[:, 0] == y).sum()
        counts[1] += (top5 == y[:, None]).any(1).sum()
        if teacher is not None:
            counts[2] += (teacher(x).argmax(1) == top5[:, 0]).sum()
        counts[3] += len(index)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(counts)
    model.train(was_training)
    total = max(counts[3].item(), 1.0)
    result = {"top1": 100 * counts[0].item() / total, "top5": 100 * counts[1].item() / total}
    if teacher is not None:
        result["agreement"] = 100 * counts[2].item() / total
    return result
