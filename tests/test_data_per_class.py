"""Per-class caps of any labelled corpus: k images of each class, chosen by a seeded content hash."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from rayoodkd.data import CorpusConfig, decode_batch, load_corpus, materialize_builtin
from rayoodkd.data.builtin import encode_png
from rayoodkd.data.readers import content_digests

# (pixel hash, label) of each decoded row, in row order
Rows = list[tuple[str, int]]


def _rows(batch: dict[str, np.ndarray]) -> Rows:
    return [
        (hashlib.sha256(image.tobytes()).hexdigest(), int(label))
        for image, label in zip(batch["image"], batch["label"], strict=True)
    ]


def _load(cfg: CorpusConfig, **kwargs: object) -> Rows:
    ds = load_corpus(cfg, image_size=28, channels=1, **kwargs)
    return [row for batch in ds.iter_batches(batch_format="numpy", batch_size=None) for row in _rows(batch)]


def _per_class(rows: Rows) -> Counter[int]:
    return Counter(label for _, label in rows)


def _error_message(**fields: object) -> tuple[tuple, str]:
    with pytest.raises(ValidationError) as info:
        CorpusConfig(**fields)
    (error,) = info.value.errors()
    return error["loc"], error["msg"].removeprefix("Value error, ")


def test_per_class_config_validation() -> None:
    for bad in (0, -3):
        loc, _ = _error_message(source="uci-digits", per_class=bad)
        assert loc == ("per_class",)
    loc, _ = _error_message(source="uci-digits", per_class=5, per_class_seed=-1)
    assert loc == ("per_class_seed",)
    _, message = _error_message(source="uci-digits", per_class=5, labelled=False)
    assert message == "per_class: needs a labelled corpus (labelled is false)"
    cfg = CorpusConfig(source="uci-digits", per_class=5)
    assert (cfg.per_class_seed, CorpusConfig(source="uci-digits").per_class) == (0, None)


@pytest.mark.ray
def test_builtin_per_class_keeps_the_smallest_hashes(ray_local, tmp_path: Path) -> None:
    cfg = CorpusConfig(source="uci-digits", split="train", per_class=10, per_class_seed=3)
    ten = _load(cfg, cache_dir=str(tmp_path))
    assert _per_class(ten) == {label: 10 for label in range(10)}
    assert sorted(_load(cfg, cache_dir=str(tmp_path))) == sorted(ten)  # the same rows

    # The rule, from the cached PNG bytes: per class the 10 smallest keyed hashes.
    table = pq.read_table(materialize_builtin("uci-digits", "train", cache_dir=str(tmp_path)))
    pngs, labels = table.column("image").to_pylist(), table.column("label").to_numpy()
    keys = content_digests(pngs, seed=3)
    chosen = [
        i for label in range(10) for i in sorted(np.flatnonzero(labels == label), key=keys.__getitem__)[:10]
    ]
    expected = decode_batch(
        {"image": np.array([pngs[i] for i in chosen], dtype=object), "label": labels[chosen]},
        image_size=28,
        channels=1,
    )
    assert sorted(ten) == sorted(_rows(expected))

    three = _load(cfg.model_copy(update={"per_class": 3}), cache_dir=str(tmp_path))
    assert _per_class(three) == {label: 3 for label in range(10)}
    assert set(three) < set(ten)  # nested in k
    reseeded = _load(cfg.model_copy(update={"per_class_seed": 4}), cache_dir=str(tmp_path))
    assert _per_class(reseeded) == _per_class(ten) and set(reseeded) != set(ten)
    capped = _load(cfg.model_copy(update={"num_images": 15}), cache_dir=str(tmp_path))
    assert len(capped) == 15 and set(capped) < set(ten)  # num_images applies after the cap


@pytest.fixture(scope="module")
def three_class_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 distinct random PNGs in each of the class folders a, b, c, and 4 unlabelled PNGs at the root."""
    root = tmp_path_factory.mktemp("three-classes")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (root / name).mkdir()
        for i in range(7):
            (root / name / f"{i}.png").write_bytes(encode_png(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
    for i in range(4):
        (root / f"loose-{i}.png").write_bytes(encode_png(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
    return root


@pytest.mark.ray
def test_image_folder_per_class_after_a_hash_split(ray_local, three_class_folder: Path) -> None:
    split = CorpusConfig(source=str(three_class_folder), split="train", split_fractions=(0.5, 0.5, 0.0))
    part = _load(split)
    available = _per_class(part)
    assert available[-1] > 0 and 0 < min(available[c] for c in range(3)) < 7  # some of each class left out
    for k in (2, 5):
        capped = _load(split.model_copy(update={"per_class": k}))
        assert _per_class(capped) == {c: min(k, available[c]) for c in range(3)}  # unlabelled rows dropped
        assert set(capped) <= set(part)  # only rows of the chosen part


@pytest.mark.ray
def test_array_sources_per_class(ray_local, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (30, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=images, labels=np.arange(30) % 4)
    capped = _load(CorpusConfig(source=str(tmp_path / "set.npz"), per_class=3))
    assert _per_class(capped) == {label: 3 for label in range(4)}
    np.save(tmp_path / "unlabelled.npy", images)
    with pytest.raises(ValueError, match=r"^per_class: .*unlabelled\.npy has no labels$"):
        load_corpus(
            CorpusConfig(source=str(tmp_path / "unlabelled.npy"), per_class=3), image_size=8, channels=1
        )
