"""Small builders shared by several test modules (plain functions: also usable in spawned processes)."""

from __future__ import annotations

from pathlib import Path

import torch

from rayoodkd.config import BaseRunConfig, resolve_config
from rayoodkd.methods.base import RunContext


def small_context(world_size: int = 1, rank: int = 0, batch_size: int = 128) -> RunContext:
    """A CPU run context for 1×8×8 images of 10 classes (mean 0.5, std 0.25)."""
    return RunContext(
        device=torch.device("cpu"),
        rank=rank,
        world_size=world_size,
        generator=torch.Generator().manual_seed(0),
        num_classes=10,
        image_size=8,
        channels=1,
        mean=(0.5,),
        std=(0.25,),
        max_steps=1,
        batch_size=batch_size,
    )


def ray_run_config(tmp_path: Path, teacher: Path, *overrides: str) -> BaseRunConfig:
    """The demo preset with ``teacher``, storage and cache under ``tmp_path``, and ``overrides``."""
    return resolve_config(
        "demo",
        [
            f"teacher.checkpoint={teacher}",
            f"storage_path={tmp_path / 'runs'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ],
    )
