"""Real-data streams for ``Method.train_step``: Ray Data shards on workers, in-memory tensors in one process.

Every source yields batches ``{"image": uint8 [N, C, H, W] (or float in [0, 1]), "label": int64 [N],
"corrupt": bool [N]}`` epoch after epoch, and can ``scan`` this rank's whole share once.
:class:`DeviceStreams` drops (and counts) corrupt rows, moves the batch to the worker's device, turns it
into float32 in [0, 1] there, augments it with the rank's generator and normalises it; a method may replace
a stream's training rows by a per-epoch *selection* of scanned rows (KD3, DFND), whose epoch length all
ranks agree on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from rayoodkd.augment import augment_batch, unit_images
from rayoodkd.config import StreamTransform
from rayoodkd.methods.base import RunContext


class BatchSource(Protocol):
    """An endless supply of batches whose position can be saved and restored."""

    def next_batch(self) -> dict[str, Tensor]: ...

    def scan(self, batch_size: int) -> Iterator[dict[str, Tensor]]: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...

    def close(self) -> None: ...


class EpochSource:
    """Turns ``epoch_iterator(epoch)`` into an endless source that remembers (epoch, batches consumed)."""

    def __init__(
        self,
        epoch_iterator: Callable[[int], Iterator[dict[str, Tensor]]],
        scan: Callable[[int], Iterator[dict[str, Tensor]]],
    ) -> None:
        self.epoch_iterator = epoch_iterator
        self.scan = scan
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
        self.close()
        self.epoch, self.consumed = state["epoch"], state["consumed"]

    def close(self) -> None:
        """End the open epoch's iterator now. Left to the garbage collector, a Ray Data iterator may be
        closed at interpreter exit, after Ray has shut down: its executor's shutdown then starts Ray again,
        and in a finalising interpreter that hangs the process (seen with ``num_workers=0``)."""
        close = getattr(self._iterator, "close", None)
        self._iterator = None
        if close is not None:
            close()


def tensor_source(
    images: Tensor, labels: Tensor, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> EpochSource:
    """Batches from in-memory tensors: this rank's strided share, reshuffled every epoch from ``seed``.

    Deterministic, so a resumed run sees exactly the batches an uninterrupted one would.
    """
    images, labels = images[rank::world_size], labels[rank::world_size]

    def batch(index: Tensor) -> dict[str, Tensor]:
        corrupt = torch.zeros(len(index), dtype=torch.bool)
        return {"image": images[index], "label": labels[index], "corrupt": corrupt}

    def epoch_iterator(epoch: int) -> Iterator[dict[str, Tensor]]:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield batch(order[start : start + batch_size])

    def scan(scan_batch_size: int) -> Iterator[dict[str, Tensor]]:
        for start in range(0, len(images), scan_batch_size):
            yield batch(torch.arange(start, min(start + scan_batch_size, len(images))))

    return EpochSource(epoch_iterator, scan)


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

    def scan(scan_batch_size: int) -> Iterator[dict[str, Tensor]]:
        return shard.iter_torch_batches(
            batch_size=scan_batch_size, drop_last=False, prefetch_batches=prefetch_batches, device="cpu"
        )

    return EpochSource(epoch_iterator, scan)


class DeviceStreams:
    """The :class:`~rayoodkd.methods.base.Streams` a method sees: clean, augmented, normalised, on device.

    Each stream has its own augmentation and normaliser (``data.transforms``, default: ``data.augment`` and
    the teacher's statistics); a batch carries the augmented image in [0, 1] as ``unit`` next to the
    normalised ``image``.
    """

    def __init__(
        self,
        sources: dict[str, BatchSource],
        ctx: RunContext,
        transforms: dict[str, StreamTransform],
        seed: int = 0,
    ) -> None:
        self.sources = sources
        self.ctx = ctx
        self.transforms = transforms
        self.seed = seed
        self.corrupt_skipped = 0
        self.selections: dict[str, dict[str, Any]] = {}
        self.selected: dict[str, EpochSource] = {}

    def close(self) -> None:
        """End every open iterator (see :meth:`EpochSource.close`)."""
        for source in [*self.selected.values(), *self.sources.values()]:
            source.close()

    def next(self, stream: str, augment: bool = True) -> dict[str, Tensor]:
        if stream not in self.sources:
            raise KeyError(
                f"stream {stream!r} is not configured; configured: {', '.join(self.sources) or 'none'}"
            )
        source = self.selected.get(stream) or self.sources[stream]
        batch = source.next_batch()
        keep = ~batch["corrupt"].bool()
        self.corrupt_skipped += int((~keep).sum())
        unit = unit_images(batch["image"][keep].to(self.ctx.device, non_blocking=True))
        labels = batch["label"][keep].to(self.ctx.device, torch.long, non_blocking=True)
        if augment:
            unit = augment_batch(unit, self.transforms[stream].augment, self.ctx.generator)
        return {"image": self._normalize(stream, unit), "unit": unit, "label": labels}

    def _normalize(self, stream: str, unit: Tensor) -> Tensor:
        """The stream's normaliser applied, in the run's memory format (NHWC with ``channels_last``)."""
        normalizer = self.transforms[stream].normalizer
        if normalizer is None:
            normalized = self.ctx.normalize(unit)
        else:
            mean, std = (torch.tensor(v, device=unit.device).view(1, -1, 1, 1) for v in normalizer)
            normalized = (unit - mean) / std
        return normalized.contiguous(memory_format=self.ctx.memory_format)

    def scan(
        self, stream: str, batch_size: int = 512, row_ids: bool = False, augment: bool = False
    ) -> Iterator[dict[str, Tensor]]:
        """This rank's whole share of ``stream`` once, in order, not augmented: batches of ``image``
        (normalised), ``unit``, ``label``; with ``row_ids``, ``row_id`` (a content hash of the image:
        stable across runs and ranks; identical images share it); with ``augment``, ``augmented`` (the
        stream's augmentation of ``unit``, normalised: what KD3's official code scores).

        Every rank must scan at the same time (Ray Data hands each epoch's blocks to all ranks together)."""
        for batch in self.sources[stream].scan(batch_size):
            keep = ~batch["corrupt"].bool()
            unit = unit_images(batch["image"][keep].to(self.ctx.device, non_blocking=True))
            labels = batch["label"][keep].to(self.ctx.device, torch.long, non_blocking=True)
            scanned = {"image": self._normalize(stream, unit), "unit": unit, "label": labels}
            if augment:
                augmented = augment_batch(unit, self.transforms[stream].augment, self.ctx.generator)
                scanned["augmented"] = self._normalize(stream, augmented)
            if row_ids:
                quantised = (unit * 255).round().to(torch.uint8).flatten(1).cpu().numpy()
                scanned["row_id"] = torch.tensor([_content_id(row.tobytes()) for row in quantised])
            yield scanned

    def use_selection(self, stream: str, unit: Tensor, labels: Tensor, epoch: int) -> int:
        """Train on these scanned rows of ``stream`` (images in [0, 1], or uint8) until the next selection;
        returns the steps of the epoch, the same on every rank: the smallest rank's selection sets it (the
        others leave their extra rows out this epoch, a different subset each epoch)."""
        images = unit.detach().cpu()
        if images.dtype != torch.uint8:
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        labels = labels.detach().cpu().long()
        self.selections[stream] = {"images": images, "labels": labels, "epoch": epoch}
        self._select(stream)
        local = torch.tensor([len(images) // self.ctx.batch_size], dtype=torch.int64, device=self.ctx.device)
        return int(self.ctx.all_reduce(local, "min").item())

    def clear_selections(self) -> None:
        """Back to every stream's own rows (a new stage)."""
        self.selections.clear()
        self.selected.clear()

    def _select(self, stream: str) -> None:
        selection = self.selections[stream]
        self.selected[stream] = tensor_source(
            selection["images"],
            selection["labels"],
            self.ctx.batch_size,
            seed=self.seed * 7_919 + 104_729 * self.ctx.rank + selection["epoch"],
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "corrupt_skipped": self.corrupt_skipped,
            **{k: s.state_dict() for k, s in self.sources.items()},
            "selections": {
                name: {**selection, "position": self.selected[name].state_dict()}
                for name, selection in self.selections.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.corrupt_skipped = int(state.get("corrupt_skipped", 0))
        for name, source in self.sources.items():
            if name in state:
                source.load_state_dict(state[name])
        for name, selection in state.get("selections", {}).items():
            self.selections[name] = {key: value for key, value in selection.items() if key != "position"}
            self._select(name)
            self.selected[name].load_state_dict(selection["position"])


def _content_id(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)
