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


def _pixels(dataset: object) -> tuple[np.ndarray, np.ndarray]:
    """A corpus's images and corrupt flags, in a canonical row order (block order may differ)."""
    batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    images = np.concatenate([b["image"] for b in batches])
    corrupt = np.concatenate([b["corrupt"] for b in batches])
    order = np.lexsort(images.reshape(len(images), -1).T)
    return images[order], corrupt[order]


def test_a_materialised_corpus_decodes_once_and_a_changed_file_decodes_again(
    ray_local: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rayoodkd.data

    folder = tmp_path / "ood"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((12, 12), 50 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "garbage.png").write_bytes(b"not an image" * 10)
    corpus = f"{{source: {folder}, labelled: false}}"
    cfg = resolve_config(
        "demo",
        [
            "num_workers=1",
            "data.batch_size=2",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"data.ood={corpus}",
            f"data.val={corpus}",
            f"data.test={corpus}",
        ],
    )
    info = TeacherInfo("lenet5", 10, 1, 28, (0.13,), (0.31,))
    decoded, corrupt, rows = _datasets(cfg, info)
    assert (corrupt["ood"], rows) == (1, {"ood": 4})
    first = _pixels(decoded["ood"])

    reads = []
    real_load = rayoodkd.data.load_corpus
    monkeypatch.setattr(rayoodkd.data, "load_corpus", lambda *a, **k: reads.append(a) or real_load(*a, **k))
    cached, corrupt, rows = _datasets(cfg, info)
    assert reads == []  # nothing read or decoded: every corpus came from the decoded cache
    assert (corrupt["ood"], rows) == (1, {"ood": 4})
    for got, want in zip(_pixels(cached["ood"]), first, strict=True):
        np.testing.assert_array_equal(got, want)

    Image.fromarray(np.full((12, 12), 255, np.uint8)).save(folder / "0.png")
    changed, _, _ = _datasets(cfg, info)
    assert len(reads) == 3  # the changed folder is decoded again, for each of the three corpora
    assert _pixels(changed["ood"])[0].max() == 255


def test_the_decoded_cache_keys_only_what_it_can_stamp_and_keeps_only_what_fits(
    ray_local: object, tmp_path: Path
) -> None:
    import ray.data

    from rayoodkd.data import CorpusConfig
    from rayoodkd.data.decoded import cache_key, count_and_keep, read_cached

    size = {"image_size": 28, "channels": 1}
    assert cache_key(CorpusConfig(source="s3://bucket/images"), **size, seed=0) is None
    assert cache_key(CorpusConfig(source=str(tmp_path / "missing")), **size, seed=0) is None
    letters = CorpusConfig(source="letters", num_images=100)
    digits = CorpusConfig(source="mnist5k", split="val")
    assert cache_key(letters, **size, seed=0) != cache_key(letters, **size, seed=1)  # rendered from the seed
    assert cache_key(digits, **size, seed=0) == cache_key(digits, **size, seed=1)  # real digits are not
    assert cache_key(digits, **size, seed=0) != cache_key(digits, image_size=32, channels=1, seed=0)

    def as_decoded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["data"]
        return {"image": images, "label": np.full(len(images), -1), "corrupt": np.zeros(len(images), bool)}

    dataset = ray.data.from_numpy(np.zeros((1500, 1, 28, 28), np.uint8)).map_batches(as_decoded)  # 1.1 MB
    assert count_and_keep(dataset, "too-big", str(tmp_path), limit_mb=1) == (1500, 0)
    assert read_cached("too-big", str(tmp_path), blocks=4) is None
    assert count_and_keep(dataset, "fits", str(tmp_path), limit_mb=2) == (1500, 0)
    cached, rows, corrupt = read_cached("fits", str(tmp_path), blocks=4)
    assert (rows, corrupt, cached.num_blocks()) == (1500, 0, 4)
