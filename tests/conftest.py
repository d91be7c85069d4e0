"""Shared fixtures: quiet, fast Ray settings, a tiny teacher checkpoint, and one local Ray instance."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path

import pytest
import torch
from torch import nn

from rayoodkd.models import build_classifier
from rayoodkd.teacher_io import TeacherInfo, save_teacher


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained LeNet-5 teacher checkpoint for 1×28×28 inputs and 10 classes (behaviour tests only)."""
    torch.manual_seed(0)
    model = build_classifier("lenet5", num_classes=10, in_channels=1, image_size=28)
    info = TeacherInfo("lenet5", 10, 1, 28, (0.13,), (0.31,))
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", model, info)


@pytest.fixture(scope="session")
def bn_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ``cnn_small`` (conv-BN) teacher for 1×28×28 inputs, with non-trivial BN running stats."""
    torch.manual_seed(0)
    model = build_classifier("cnn_small", num_classes=10, in_channels=1, image_size=28)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    info = TeacherInfo("cnn_small", 10, 1, 28, (0.13,), (0.31,))
    return save_teacher(tmp_path_factory.mktemp("bn_teacher") / "teacher.pt", model, info)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for every test that needs it (starting Ray costs ~13 s here)."""
    import ray

    ray.init(num_cpus=2, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
