"""Where a worker runs: a Ray Train worker (:class:`RaySession`) or one plain process (:class:`LocalSession`).

The loop in :mod:`rayoodkd.engine.loop` is written against this small interface only, so every method runs
unchanged in a test process and on N TorchTrainer workers.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rayoodkd.config import DataConfig
from rayoodkd.engine.checkpoint import load_state
from rayoodkd.engine.streams import BatchSource, ray_shard_source, tensor_source


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def latest_state(self) -> dict[str, Any] | None: ...

    def sources(self, names: frozenset[str], data: DataConfig, seed: int) -> dict[str, BatchSource]: ...

    def eval_set(self, name: str) -> tuple[Tensor, Tensor]: ...

    def distribute(self, module: nn.Module, find_unused_parameters: bool) -> nn.Module: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None: ...


class RaySession:
    """A Ray Train worker: dataset shards, DDP through ``prepare_model``, ``ray.train.report`` checkpoints."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def latest_state(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_state(directory)

    def sources(self, names: frozenset[str], data: DataConfig, seed: int) -> dict[str, BatchSource]:
        import ray.train

        return {
            name: ray_shard_source(
                ray.train.get_dataset_shard(name),
                data.batch_size,
                data.shuffle_buffer,
                seed * 1009 + self.rank,
                data.prefetch_batches,
            )
            for name in sorted(names)
        }

    def eval_set(self, name: str) -> tuple[Tensor, Tensor]:
        import ray.train

        images, labels = [], []
        for batch in ray.train.get_dataset_shard(name).iter_torch_batches(batch_size=1024):
            keep = ~batch["corrupt"].bool()
            images.append(batch["image"][keep])
            labels.append(batch["label"][keep])
        return torch.cat(images), torch.cat(labels).long()

    def distribute(self, module: nn.Module, find_unused_parameters: bool) -> nn.Module:
        import ray.train.torch

        kwargs = {"find_unused_parameters": True} if find_unused_parameters else None
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=kwargs)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:07d}")


class LocalSession:
    """One process, in-memory data, checkpoints in a directory: for tests, debugging and benchmarks."""

    def __init__(
        self,
        streams: dict[str, tuple[Tensor, Tensor]],
        eval_sets: dict[str, tuple[Tensor, Tensor]],
        checkpoint_root: str | Path,
        device: str | torch.device = "cpu",
        resume_from: str | Path | None = None,
    ) -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.streams = streams
        self.eval_sets = eval_sets
        self.checkpoint_root = Path(checkpoint_root)
        self.resume_from = Path(resume_from) if resume_from else None
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    def latest_state(self) -> dict[str, Any] | None:
        return load_state(self.resume_from) if self.resume_from else None

    def sources(self, names: frozenset[str], data: DataConfig, seed: int) -> dict[str, BatchSource]:
        missing = sorted(names - set(self.streams))
        if missing:
            raise KeyError(f"LocalSession has no data for stream(s) {', '.join(missing)}")
        return {
            name: tensor_source(*self.streams[name], data.batch_size, seed * 1009) for name in sorted(names)
        }

    def eval_set(self, name: str) -> tuple[Tensor, Tensor]:
        return self.eval_sets[name]

    def distribute(self, module: nn.Module, find_unused_parameters: bool) -> nn.Module:
        return module.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            target = self.checkpoint_root / f"step_{step:07d}"
            target.mkdir(parents=True, exist_ok=True)
            for file in checkpoint_dir.iterdir():
                file.replace(target / file.name)
            self.checkpoints.append(target)


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary directory to assemble a checkpoint in before it is reported."""
    with tempfile.TemporaryDirectory(prefix="rayoodkd-ckpt-") as directory:
        yield Path(directory)
