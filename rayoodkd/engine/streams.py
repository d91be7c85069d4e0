"""Real-data streams for ``Method.train_step``: Ray Data shards on workers, in-memory tensors in one process.

Every source yields batches ``{"image": float [N, C, H, W] in [0, 1], "label": int64 [N], "corrupt": bool
[N]}`` epoch after epoch. :class:`DeviceStreams` drops (and counts) corrupt rows, moves the batch to the
worker's device, augments it with the rank's generator and normalises it with the teacher's statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from rayoodkd.augment import augment_batch
from rayoodkd.config import StreamTransform
from rayoodkd.methods.base import RunContext


class BatchSource(Protocol):
    """An endless supply of batches whose position can be saved and restored."""

    def next_batch(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


class EpochSource:
    """Turns ``epoch_iterator(epoch)`` into an endless source that remembers (epoch, batches consumed)."""

    def __init__(self, epoch_iterator: Callable[[int], Iterator[dict[str, Tensor]]]) -> None:
        self.epoch_iterator = epoch_iterator
        self.epoch = 0
        self.consumed = 0
        self._iterator: Iterator[dict[str, Tensor]] | None = None

    def next_batch(self) -> dict[str, Tensor]:
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self.epoch_iterator(self.epoch))
                for _skipped in range(self.consumed):
                    next(self._iterator)
            batch = next(self._iterator, None)
            if batch is not None:
                self.consumed += 1
                return batch
            self._iterator, self.epoch, self.consumed = None, self.epoch + 1, 0
        raise RuntimeError("data stream is empty: not one full batch per epoch (lower data.batch_size?)")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed, self._iterator = state["epoch"], state["consumed"], None


def tensor_source(
    images: Tensor, labels: Tensor, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> EpochSource:
    """Batches from in-memory tensors: this rank's strided share, reshuffled every epoch from ``seed``.

    Deterministic, so a resumed run sees exactly the batches an uninterrupted one would.
    """
    images, labels = images[rank::world_size], labels[rank::world_size]

    def epoch_iterator(epoch: int) -> Iterator[dict[str, Tensor]]:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield {
                "image": images[index],
                "label": labels[index],
                "corrupt": torch.zeros(len(index), dtype=torch.bool),
            }

    return EpochSource(epoch_iterator)


def ray_shard_source(
    shard: Any, batch_size: int, shuffle_buffer: int, seed: int, prefetch_batches: int
) -> EpochSource:
    """Batches from this worker's ``ray.train.get_dataset_shard(name)``; one pass over the shard per epoch.

    Ray Data hands blocks to workers dynamically, so after a resume the stream continues at the recorded
    epoch and batch count, but not necessarily with the same images.
    """

    def epoch_iterator(epoch: int) -> Iterator[dict[str, Tensor]]:
        return shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=seed * 100_003 + epoch if shuffle_buffer else None,
            prefetch_batches=prefetch_batches,
        )

    return EpochSource(epoch_iterator)


class DeviceStreams:
    """The :class:`~rayoodkd.methods.base.Streams` a method sees: clean, augmented, normalised, on device.

    Each stream has its own augmentation and normaliser (``data.transforms``, default: ``data.augment`` and
    the teacher's statistics); a batch carries the augmented image in [0, 1] as ``unit`` next to the
    normalised ``image``.
    """

    def __init__(
        self, sources: dict[str, BatchSource], ctx: RunContext, transforms: dict[str, StreamTransform]
    ) -> None:
        self.sources = sources
        self.ctx = ctx
        self.transforms = transforms
        self.corrupt_skipped = 0

    def next(self, stream: str, augment: bool = True) -> dict[str, Tensor]:
        if stream not in self.sources:
            raise KeyError(
                f"stream {stream!r} is not configured; configured: {', '.join(self.sources) or 'none'}"
            )
        batch = self.sources[stream].next_batch()
        keep = ~batch["corrupt"].bool()
        self.corrupt_skipped += int((~keep).sum())
        unit = batch["image"][keep].to(self.ctx.device, torch.float32, non_blocking=True)
        labels = batch["label"][keep].to(self.ctx.device, torch.long, non_blocking=True)
        transform = self.transforms[stream]
        if augment:
            unit = augment_batch(unit, transform.augment, self.ctx.generator)
        if transform.normalizer is None:
            image = self.ctx.normalize(unit)
        else:
            mean, std = (torch.tensor(v, device=unit.device).view(1, -1, 1, 1) for v in transform.normalizer)
            image = (unit - mean) / std
        return {"image": image, "unit": unit, "label": labels}

    def state_dict(self) -> dict[str, Any]:
        return {
            "corrupt_skipped": self.corrupt_skipped,
            **{k: s.state_dict() for k, s in self.sources.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.corrupt_skipped = int(state.get("corrupt_skipped", 0))
        for name, source in self.sources.items():
            if name in state:
                source.load_state_dict(state[name])
