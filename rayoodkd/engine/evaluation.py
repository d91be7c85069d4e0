"""Accuracy of a student on a labelled set: every rank scores its own share, the counts are summed exactly.

A val/test split reaches a worker as :class:`EvalSet`: its share of the split (the blocks of a materialised
split, or a lazy one's rows streamed by Ray Data; none twice, none dropped), kept in memory when every
worker's share fits in ``eval.cache_mb`` and otherwise read again at every evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

DEFAULT_TOPK = (1, 5)

Batches = Iterable[tuple[Tensor, Tensor]]


def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_initialized()


class EvalSet:
    """This rank's share of a labelled split, normalised on the device, re-iterable.

    ``read()`` yields the share's raw batches (images as stored, labels) and ``prepare`` makes one ready for
    a model. The first pass (at construction) keeps the prepared batches while they fit in ``cache_bytes``;
    the ranks agree, so either every rank keeps its share or every rank streams (a streamed Ray Data split
    needs every rank at every pass). ``example`` keeps up to two prepared images of the share (or ``None``).
    """

    def __init__(
        self,
        read: Callable[[], Batches],
        prepare: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
        *,
        cache_bytes: float,
        device: torch.device,
        world_size: int = 1,
    ) -> None:
        self.read, self.prepare, self.device, self.world_size = read, prepare, device, world_size
        kept: list[tuple[Tensor, Tensor]] | None = []
        size = rows = 0
        self.example: Tensor | None = None
        for batch in read():
            images, labels = prepare(*batch)
            if self.example is None and len(images):
                self.example = images[:2].clone()
            size += images.numel() * images.element_size()
            rows += len(labels)
            kept = kept if kept is not None and size <= cache_bytes else None
            if kept is not None:
                kept.append((images, labels))
        overflow = torch.tensor([float(kept is None)], device=device)
        total_rows = torch.tensor([rows], dtype=torch.float64, device=device)
        if _distributed(world_size):
            dist.all_reduce(overflow, op=dist.ReduceOp.MAX)
            dist.all_reduce(total_rows)
        self.streamed = bool(overflow.item())
        self.rows = int(total_rows.item())  # of the whole split, intact rows only
        self.cached = None if self.streamed else kept

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.cached is not None:
            return iter(self.cached)
        return (self.prepare(*batch) for batch in self.read())

    @torch.no_grad()
    def mean(self, per_sample: Callable[[Tensor, Tensor], Tensor]) -> float:
        """The mean of ``per_sample(images, labels)`` (one value per image) over the whole split."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for images, labels in self:
            values = per_sample(images, labels)
            totals[0] += values.double().sum()
            totals[1] += len(values)
        if _distributed(self.world_size):
            dist.all_reduce(totals)
        return (totals[0] / totals[1].clamp(min=1)).item()


@torch.no_grad()
def score(
    model: nn.Module,
    batches: Batches,
    *,
    device: torch.device,
    teacher: nn.Module | None = None,
    world_size: int = 1,
    topk: tuple[int, ...] = DEFAULT_TOPK,
) -> dict[str, float]:
    """``top{k}`` for every k in ``topk`` (always top1) and agreement with the teacher, in %, over every
    rank's ``batches`` (normalised images, labels): the counts are summed over ranks, so every rank returns
    the figures of the whole set. A k above the class count is capped."""
    ks = sorted({1, *topk})
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(ks) + 2, dtype=torch.float64, device=device)
    for images, labels in batches:
        x, y = images.to(device), labels.to(device)
        logits = model(x).float()
        ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
        for i, k in enumerate(ks):
            counts[i] += (ranked[:, :k] == y[:, None]).any(1).sum()
        if teacher is not None:
            counts[-2] += (teacher(x).argmax(1) == ranked[:, 0]).sum()
        counts[-1] += len(y)
    if _distributed(world_size):
        dist.all_reduce(counts)
    model.train(was_training)
    figures = (100 * counts[:-1] / counts[-1].clamp(min=1)).tolist()
    result = {f"top{k}": figures[i] for i, k in enumerate(ks)}
    if teacher is not None:
        result["agreement"] = figures[-1]
    return result


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
    """:func:`score` of in-memory ``images`` (normalised): rank r scores rows r, r + world_size, ..."""
    mine = torch.arange(rank, len(images), world_size)
    batches = ((images[index], labels[index]) for index in mine.split(batch_size))
    return score(
        model,
        batches,
        device=device or images.device,
        teacher=teacher,
        world_size=world_size,
        topk=topk,
    )
