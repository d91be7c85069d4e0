"""How Ray Train hands a run's datasets to its workers (imported where Ray Train runs)."""

from __future__ import annotations

from typing import Any

import ray.train


class RunDataConfig(ray.train.DataConfig):
    """The training streams are split equally (the ranks step in lockstep, so a split may drop a few rows);
    the val/test splits are split with no row dropped: every rank scores its share and the counts are
    summed, so an evaluation is exact and no worker holds the whole set. The val/test splits that come here
    are lazy and stream (``streaming_split(equal=False)``); a materialised one reaches the workers as its
    blocks instead (``engine.session.block_shares``)."""

    def __init__(self, streams: list[str], eval_splits: list[str]) -> None:
        super().__init__(datasets_to_split=[*streams, *eval_splits])
        self.eval_splits = frozenset(eval_splits)

    def configure(
        self,
        datasets: dict[str, Any],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        exact = {name: ds for name, ds in datasets.items() if name in self.eval_splits}
        rest = {name: ds for name, ds in datasets.items() if name not in exact}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, dataset in exact.items():
            if dataset.name is None:
                dataset.set_name(name)
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            splits = dataset.streaming_split(world_size, equal=False, locality_hints=hints)
            for rank, split in enumerate(splits):
                output[rank][name] = split
        return output
