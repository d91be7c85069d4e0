"""The driver's view of a run's corpora: how many intact rows each consumed stream has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayoodkd.config import resolve_config
from rayoodkd.launch import _datasets
from rayoodkd.teacher_io import TeacherInfo

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def folder_with_corrupt_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ood") / "letters"
    root.mkdir()
    for i in range(6):
        Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(root / f"{i}.png")
    (root / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "garbage.png").write_bytes(b"not an image" * 10)
    return root


@pytest.mark.parametrize("materialize", [True, False])
def test_an_epoch_counts_only_the_intact_images(
    ray_local: object, folder_with_corrupt_images: Path, materialize: bool
) -> None:
    folder = str(folder_with_corrupt_images)
    cfg = resolve_config(
        "demo",
        [
            "num_workers=1",
            "data.batch_size=2",
            f"data.materialize={str(materialize).lower()}",
            f"data.ood={{source: {folder}, labelled: false}}",
            f"data.val={{source: {folder}, labelled: false}}",
            f"data.test={{source: {folder}, labelled: false}}",
        ],
    )
    info = TeacherInfo("lenet5", 10, 1, 28, (0.13,), (0.31,))
    _, corrupt, rows = _datasets(cfg, info)
    assert rows == {"ood": 6}
    assert corrupt.get("ood") == (2 if materialize else None)  # streamed corpora are counted by the workers
