"""Accuracy of a student on a labelled set, split across ranks and summed exactly."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

DEFAULT_TOPK = (1, 5)


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
    topk: tuple[int, ...] = DEFAULT_TOPK,
) -> dict[str, float]:
    """``top{k}`` for every k in ``topk`` (always top1) and agreement with the teacher, in %, over the set.

    ``images`` are already normalised. Rank r scores rows r, r + world_size, ...; the counts are summed
    over ranks, so every rank returns the figures of the full set. A k above the class count is capped.
    """
    device = device or images.device
    ks = sorted({1, *topk})
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(ks) + 2, dtype=torch.float64, device=device)
    mine = torch.arange(rank, len(images), world_size)
    for start in range(0, len(mine), batch_size):
        index = mine[start : start + batch_size]
        x, y = images[index].to(device), labels[index].to(device)
        logits = model(x).float()
        ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
        for i, k in enumerate(ks):
            counts[i] += (ranked[:, :k] == y[:, None]).any(1).sum()
        if teacher is not None:
            counts[-2] += (teacher(x).argmax(1) == ranked[:, 0]).sum()
        counts[-1] += len(index)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(counts)
    model.train(was_training)
    total = max(counts[-1].item(), 1.0)
    result = {f"top{k}": 100 * counts[i].item() / total for i, k in enumerate(ks)}
    if teacher is not None:
        result["agreement"] = 100 * counts[-2].item() / total
    return result
