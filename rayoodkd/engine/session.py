"""Where a worker runs: a Ray Train worker (:class:`RaySession`), the driver process itself
(:class:`DriverSession`, ``num_workers=0``), or one plain process on in-memory tensors
(:class:`LocalSession`).

The loop in :mod:`rayoodkd.engine.loop` is written against this small interface only, so every method runs
unchanged in a test process, in the driver and on N TorchTrainer workers. Every session resumes from the
newest *intact* checkpoint of its run directory (``engine.checkpoint.newest_intact``).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import pyarrow.fs as pafs
import torch
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from rayoodkd.config import DataConfig
from rayoodkd.console import MARK
from rayoodkd.engine.checkpoint import (
    STATE_FILE,
    ResumePoint,
    checkpoint_dir_name,
    checkpoint_dirs,
    load_state,
    newest_intact,
)
from rayoodkd.engine.evaluation import Batches
from rayoodkd.engine.streams import BatchSource, ray_shard_source, tensor_source
from rayoodkd.methods.base import PlayerOptions
from rayoodkd.storage import filesystem, is_remote


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device
    run_dir: str
    stream_rows: dict[str, int]
    console_prefix: str  # what marks a console line as rayoodkd's (rayoodkd.console)
    allreduce_bytes: int  # gradient bytes this rank's DDP wrappers all-reduced so far (0 without DDP)

    def resume_point(self) -> ResumePoint: ...

    def sources(self, names: frozenset[str], data: DataConfig, seed: int) -> dict[str, BatchSource]: ...

    def eval_share(self, name: str, batch_size: int) -> Callable[[], Batches]:
        """Reads this rank's share of split ``name`` (intact rows: raw images, labels) at every call."""
        ...

    def distribute(self, module: nn.Module, options: PlayerOptions) -> nn.Module: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None: ...


def _shard_sources(shards: dict[str, Any], data: DataConfig, seed: int, rank: int) -> dict[str, BatchSource]:
    return {
        name: ray_shard_source(
            shard, data.batch_size, data.shuffle_buffer, seed * 1009 + rank, data.prefetch_batches
        )
        for name, shard in sorted(shards.items())
    }


def _counted_allreduce(session: RaySession, bucket):
    """DDP's own all-reduce of a gradient bucket (mean over ranks), counting the bytes it sends.

    Unannotated: DDP checks a hook's annotations at runtime and rejects the string ones of this module's
    ``from __future__ import annotations`` (dist.GradBucket -> torch.futures.Future[Tensor])."""
    buffer = bucket.buffer()
    session.allreduce_bytes += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(None, bucket)


def _intact_batches(shard: Any, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in shard.iter_torch_batches(batch_size=batch_size):
        keep = ~batch["corrupt"].bool()
        yield batch["image"][keep], batch["label"][keep].long()


def block_shares(dataset: Any, ranks: int) -> list[list[Any]] | None:
    """A materialised split divided by its blocks, whole blocks dealt to the ranks in turn (no row dropped or
    doubled), as one list of object-store references per rank; None for a lazy split, which streams. A rank
    reads its blocks straight from the object store, without a Ray Data execution or a round trip to Ray
    Train's dataset manager for each split: 1.45 s of the demo's start-up on 2 cores (docs/benchmarks.md)."""
    from ray.data.dataset import MaterializedDataset

    if not isinstance(dataset, MaterializedDataset):
        return None
    blocks = [ref for bundle in dataset.iter_internal_ref_bundles() for ref in bundle.block_refs]
    return [blocks[rank::ranks] for rank in range(ranks)]


def _intact_block_batches(blocks: list[Any], batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    import ray
    from ray.data.block import BlockAccessor

    for block in blocks:
        columns = BlockAccessor.for_block(ray.get(block)).to_batch_format("numpy")
        keep = columns["corrupt"] == 0
        if not keep.any():
            continue
        # Boolean indexing copies: writable arrays for torch.
        images, labels = torch.from_numpy(columns["image"][keep]), torch.from_numpy(columns["label"][keep])
        yield from zip(images.split(batch_size), labels.long().split(batch_size), strict=True)


def _dataset_reader(dataset: Any, batch_size: int) -> Callable[[], Batches]:
    """All of a Ray dataset's intact rows, in one process (``num_workers=0``, tests)."""
    shares = block_shares(dataset, 1)
    if shares is not None:
        return lambda: _intact_block_batches(shares[0], batch_size)
    iterator = dataset.iterator()
    return lambda: _intact_batches(iterator, batch_size)


class RaySession:
    """A Ray Train worker: dataset shards, DDP through ``prepare_model``, ``ray.train.report`` checkpoints."""

    def __init__(
        self, run_dir: str, stream_rows: dict[str, int], eval_blocks: dict[str, list[list[Any]]]
    ) -> None:
        """``eval_blocks``: the materialised eval splits, by name, as :func:`block_shares` divides them (the
        lazy ones come as Ray Train dataset shards)."""
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_dir = run_dir
        self.stream_rows = stream_rows
        self.eval_blocks = eval_blocks
        self.console_prefix = MARK
        self.allreduce_bytes = 0

    def resume_point(self) -> ResumePoint:
        return newest_intact(self.run_dir)

    def sources(self, names: frozenset[str], data: DataConfig, seed: int) -> dict[str, BatchSource]:
        import ray.train

        shards = {name: ray.train.get_dataset_shard(name) for name in names}
        return _shard_sources(shards, data, seed, self.rank)

    def eval_share(self, name: str, batch_size: int) -> Callable[[], Batches]:
        import ray.train

        if name in self.eval_blocks:
            blocks = self.eval_blocks[name][self.rank]
            return lambda: _intact_block_batches(blocks, batch_size)
        shard = ray.train.get_dataset_shard(name)  # split across the workers, no row dropped (launch)
        return lambda: _intact_batches(shard, batch_size)

    def distribute(self, module: nn.Module, options: PlayerOptions) -> nn.Module:
        import ray.train.torch

        kwargs = {"find_unused_parameters": True} if options.find_unused_parameters else None
        module = options.prepare(module, self.world_size, self.device)
        wrapped = ray.train.torch.prepare_model(module, parallel_strategy_kwargs=kwargs)
        if isinstance(wrapped, nn.parallel.DistributedDataParallel):
            wrapped.register_comm_hook(self, _counted_allreduce)
        return wrapped

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
            checkpoint_dir_name=unused_checkpoint_name(self.run_dir, step),
        )


class DriverSession:
    """``num_workers=0``: the run trains in the driver process on the full Ray datasets, and writes its own
    checkpoints to the run directory (the same layout, manifest and retention as Ray Train's)."""

    console_prefix = ""
    allreduce_bytes = 0  # one process: no DDP

    def __init__(
        self,
        datasets: dict[str, Any],
        run_dir: str,
        keep: int,
        stream_rows: dict[str, int],
        device: str | torch.device = "cpu",
    ) -> None:
        self.rank, self.world_size = 0, 1
        self.stream_rows = stream_rows
        self.device = torch.device(device)
        self.datasets = datasets
        self.run_dir = run_dir.rstrip("/")
        self.keep = keep
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: str | None = None

    def resume_point(self) -> ResumePoint:
        return newest_intact(self.run_dir)

    def sources(self, names: frozenset[str], data: DataConfig, seed: int) -> dict[str, BatchSource]:
        return _shard_sources({name: self.datasets[name].iterator() for name in names}, data, seed, 0)

    def eval_share(self, name: str, batch_size: int) -> Callable[[], Batches]:
        return _dataset_reader(self.datasets[name], batch_size)

    def distribute(self, module: nn.Module, options: PlayerOptions) -> nn.Module:
        return module.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        self.last_metrics = dict(metrics)
        if checkpoint_dir is None:
            return
        name = unused_checkpoint_name(self.run_dir, step)
        self.last_checkpoint = publish_checkpoint(checkpoint_dir, self.run_dir, name)
        for _, stale in checkpoint_dirs(self.run_dir)[self.keep :]:
            if stale != self.last_checkpoint:  # never the one just written (newer ones may be broken)
                fs, path = filesystem(stale)
                fs.delete_dir(path)


def unused_checkpoint_name(run_dir: str, step: int) -> str:
    """``step_NNNNNNN``, or with a unique suffix when a run that resumed from an older checkpoint (a newer
    one was corrupt) reaches that step again: Ray Train deletes a replaced checkpoint's directory by name,
    so reusing the name would delete the new checkpoint and break the run's snapshot."""
    name = checkpoint_dir_name(step)
    fs, root = filesystem(f"{run_dir}/{name}")
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return name
    return f"{name}-{time.time_ns():x}"  # a later re-take sorts after an earlier one


def publish_checkpoint(local_dir: Path, run_dir: str, name: str) -> str:
    """Copy a finished checkpoint directory to ``run_dir/name`` (any storage); return its path.

    Locally it is assembled under a hidden name and renamed, so ``step_*`` directories are complete; on
    object stores the manifest (written last) is what marks it complete.
    """
    target = f"{run_dir}/{name}"
    fs, root = filesystem(run_dir)
    fs.create_dir(root, recursive=True)
    if is_remote(run_dir):
        pafs.copy_files(str(local_dir), f"{root}/{name}", destination_filesystem=fs)
        return target
    staging = Path(root) / f".{name}-{uuid.uuid4().hex}"
    shutil.copytree(local_dir, staging)
    final = Path(root) / name
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return str(final)


class LocalSession:
    """One process, in-memory data, checkpoints in a directory: for tests, debugging, benchmarks and
    ``rayoodkd evaluate``.

    An evaluation set is ``(images, labels)`` tensors or a decoded Ray dataset (read as the run's workers
    read theirs: kept in memory when it fits ``eval.cache_mb``, else streamed at every evaluation).
    ``resume_from`` is a checkpoint directory, or a run directory whose newest intact checkpoint is used.
    """

    console_prefix = ""
    allreduce_bytes = 0  # one process: no DDP

    def __init__(
        self,
        streams: dict[str, tuple[Tensor, Tensor]],
        eval_sets: dict[str, tuple[Tensor, Tensor] | Any],
        checkpoint_root: str | Path,
        device: str | torch.device = "cpu",
        resume_from: str | Path | None = None,
    ) -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.streams = streams
        self.eval_sets = eval_sets
        self.checkpoint_root = Path(checkpoint_root)
        self.run_dir = str(self.checkpoint_root)
        self.stream_rows = {name: len(images) for name, (images, _) in streams.items()}
        self.resume_from = Path(resume_from) if resume_from else None
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    def resume_point(self) -> ResumePoint:
        if self.resume_from is None:
            return ResumePoint()
        if (self.resume_from / STATE_FILE).is_file():
            return ResumePoint(str(self.resume_from), load_state(self.resume_from))
        return newest_intact(str(self.resume_from))

    def sources(self, names: frozenset[str], data: DataConfig, seed: int) -> dict[str, BatchSource]:
        missing = sorted(names - set(self.streams))
        if missing:
            raise KeyError(f"LocalSession has no data for stream(s) {', '.join(missing)}")
        return {
            name: tensor_source(*self.streams[name], data.batch_size, seed * 1009) for name in sorted(names)
        }

    def eval_share(self, name: str, batch_size: int) -> Callable[[], Batches]:
        if hasattr(self.eval_sets[name], "iterator"):  # a Ray dataset
            return _dataset_reader(self.eval_sets[name], batch_size)
        images, labels = self.eval_sets[name]
        return lambda: zip(images.split(batch_size), labels.split(batch_size), strict=True)

    def distribute(self, module: nn.Module, options: PlayerOptions) -> nn.Module:
        return module.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            target = Path(
                publish_checkpoint(checkpoint_dir, str(self.checkpoint_root), checkpoint_dir_name(step))
            )
            self.checkpoints.append(target)


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary directory to assemble a checkpoint in before it is reported."""
    with tempfile.TemporaryDirectory(prefix="rayoodkd-ckpt-") as directory:
        yield Path(directory)
