"""Seeded hash splits of any corpus into train/val/test: disjoint, complete, stable, near the fractions."""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from rayoodkd.config import ConfigError, build_section
from rayoodkd.data import CorpusConfig, builtin_arrays, load_corpus, resolve_format
from rayoodkd.data.builtin import FORMAT_VERSION, encode_png
from rayoodkd.data.config import SPLIT_PARTS
from rayoodkd.data.readers import split_parts_of

FRACTIONS = (0.6, 0.2, 0.2)
# (pixel hash, label) -> how many rows hold that decoded image with that label
Contents = Counter[tuple[str, int]]


def _contents(ds) -> Contents:
    counts: Contents = Counter()
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for image, label in zip(batch["image"], batch["label"], strict=True):
            counts[(hashlib.sha256(image.tobytes()).hexdigest(), int(label))] += 1
    return counts


def _load(cfg: CorpusConfig, **kwargs: object) -> Contents:
    return _contents(load_corpus(cfg, image_size=28, channels=1, **kwargs))


def _parts(cfg: CorpusConfig, **kwargs: object) -> dict[str, Contents]:
    return {part: _load(cfg.model_copy(update={"split": part}), **kwargs) for part in SPLIT_PARTS}


def _images(contents: Contents) -> set[str]:
    return {image for image, _ in contents}


def _assert_is_a_split(parts: dict[str, Contents], whole: Contents, fractions: tuple[float, ...]) -> None:
    """Pairwise disjoint in image content, together exactly the source, each near its fraction."""
    for a, b in combinations(SPLIT_PARTS, 2):
        assert not _images(parts[a]) & _images(parts[b]), f"{a} and {b} share images"
    assert sum(parts.values(), Counter()) == whole
    total = whole.total()
    for part, fraction in zip(SPLIT_PARTS, fractions, strict=True):
        spread = 4 * math.sqrt(total * fraction * (1 - fraction)) + 1  # 4 binomial standard deviations
        assert abs(parts[part].total() - fraction * total) <= spread, (part, parts[part].total(), total)


def _assert_stable_in_seed(cfg: CorpusConfig, parts: dict[str, Contents], **kwargs: object) -> None:
    """The same seed gives the same part again; another seed gives another assignment."""
    assert _load(cfg.model_copy(update={"split": "train"}), **kwargs) == parts["train"]
    reseeded = _load(cfg.model_copy(update={"split": "train", "split_seed": cfg.split_seed + 1}), **kwargs)
    assert _images(reseeded) != _images(parts["train"])


def _error_message(**fields: object) -> tuple[tuple, str]:
    """The location and one-line message of the single validation error of ``CorpusConfig(**fields)``."""
    with pytest.raises(ValidationError) as info:
        CorpusConfig(**fields)
    (error,) = info.value.errors()
    message = error["msg"].removeprefix("Value error, ")
    assert "\n" not in message
    return error["loc"], message


def test_split_config_validation(tmp_path: Path) -> None:
    for bad in ((0.5, 0.6, 0.1), (-0.1, 0.6, 0.5), (float("nan"), 0.5, 0.5), (float("inf"), 0.0, 0.0)):
        loc, message = _error_message(source="uci-digits", split="train", split_fractions=bad)
        assert loc == ("split_fractions",)
        assert message.startswith("need (train, val, test), each >= 0, summing to 1; got")
    loc, _ = _error_message(source="uci-digits", split="train", split_fractions=(0.5, 0.5))
    assert loc[0] == "split_fractions"
    with pytest.raises(ConfigError, match=r"^invalid value for 'split_fractions': need .* summing to 1"):
        build_section(CorpusConfig, {"source": "uci-digits", "split": "val", "split_fractions": [1, 1, 1]})
    for split in ("all", None):
        _, message = _error_message(source="uci-digits", split=split, split_fractions=FRACTIONS)
        assert message.startswith("split: must be one of train, val, test when split_fractions is set")
    _, message = _error_message(source="/data/cifar.tar.gz", format="cifar", archive_split="test")
    assert message.startswith("archive_split: only used with split_fractions")
    _, message = _error_message(
        source="mnist5k", split="val", split_fractions=FRACTIONS, archive_split="test"
    )
    assert message.startswith("archive_split: only cifar and idx sources")
    folder = CorpusConfig(source=str(tmp_path), split="val", split_fractions=FRACTIONS, archive_split="test")
    with pytest.raises(ValueError, match="archive_split: only cifar and idx sources have archive parts"):
        resolve_format(folder)

    nearly_one = CorpusConfig(source="uci-digits", split="test", split_fractions=(0.7, 0.1, 0.2000005))
    assert nearly_one.split_seed == 0 and nearly_one.source_split == "all"
    cifar = CorpusConfig(source="/data/cifar.tar.gz", format="cifar", split="val", split_fractions=FRACTIONS)
    assert cifar.source_split is None  # the reader's default archive part, "train"
    assert cifar.model_copy(update={"archive_split": "test"}).source_split == "test"
    assert CorpusConfig(source="mnist5k", split="val").source_split == "val"  # no hash split: unchanged


def test_split_parts_of_follows_the_fractions_and_the_content() -> None:
    rng = np.random.default_rng(0)
    contents = [rng.bytes(16) for _ in range(20000)]
    parts = split_parts_of(contents, (0.7, 0.1, 0.2), seed=3)
    np.testing.assert_allclose(np.bincount(parts, minlength=3) / len(contents), [0.7, 0.1, 0.2], atol=0.015)
    assert (split_parts_of(contents, (0.5, 0.5, 0.0), seed=3) < 2).all()  # a zero fraction gets no rows
    assert (split_parts_of(contents, (0.0, 0.0, 1.0), seed=3) == 2).all()
    assert (split_parts_of(contents, (0.7, 0.1, 0.2), seed=4) != parts).any()
    pixels = rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)
    by_array = split_parts_of(pixels, FRACTIONS, seed=0)
    np.testing.assert_array_equal(by_array, split_parts_of([p.tobytes() for p in pixels], FRACTIONS, seed=0))
    repeated = split_parts_of([contents[0]] * 5, (0.7, 0.1, 0.2), seed=3)
    np.testing.assert_array_equal(repeated, [parts[0]] * 5)  # identical content, identical part


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 MNIST-5k digits as PNGs in class folders 0..9, and 5 of them twice more under other names."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = builtin_arrays("mnist5k", "train", num_images=300)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        png = encode_png(image)
        for copy in range(3 if i < 5 else 1):
            (folder / f"{i}-{copy}.png").write_bytes(png)
    return root


@pytest.mark.ray
def test_image_folder_hash_split(ray_local, digit_folder: Path) -> None:
    whole = _load(CorpusConfig(source=str(digit_folder)))
    assert whole.total() == 310
    cfg = CorpusConfig(source=str(digit_folder), split="train", split_fractions=FRACTIONS, split_seed=7)
    parts = _parts(cfg)
    _assert_is_a_split(parts, whole, FRACTIONS)
    duplicated = [key for key, count in whole.items() if count == 3]
    assert len(duplicated) == 5
    for key in duplicated:  # all copies of an image land in one part
        assert sorted(parts[part][key] for part in SPLIT_PARTS) == [0, 0, 3]
    _assert_stable_in_seed(cfg, parts)


@pytest.fixture(scope="module")
def digit_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 UCI digits as PNG bytes in column ``png`` with labels in ``digit``, over two files."""
    root = tmp_path_factory.mktemp("digits-parquet")
    images, labels = builtin_arrays("uci-digits", "all", num_images=400)
    for shard, rows in enumerate((slice(0, 250), slice(250, 400))):
        table = pa.table(
            {
                "png": pa.array([encode_png(image) for image in images[rows]], pa.binary()),
                "digit": pa.array(labels[rows], pa.int64()),
            }
        )
        pq.write_table(table, root / f"part-{shard}.parquet")
    return root


@pytest.mark.ray
def test_parquet_hash_split_then_limit(ray_local, digit_parquet: Path) -> None:
    source = CorpusConfig(source=str(digit_parquet), image_column="png", label_column="digit")
    whole = _load(source)
    assert whole.total() == 400
    cfg = source.model_copy(update={"split": "train", "split_fractions": FRACTIONS})
    parts = _parts(cfg)
    _assert_is_a_split(parts, whole, FRACTIONS)
    _assert_stable_in_seed(cfg, parts)
    capped = _load(cfg.model_copy(update={"split": "val", "num_images": 10}))
    assert capped.total() == 10 and not capped - parts["val"]  # the limit applies after the split


@pytest.mark.ray
def test_builtin_uci_digits_hash_split(ray_local, tmp_path: Path) -> None:
    fractions = (0.8, 0.1, 0.1)
    whole = _load(CorpusConfig(source="uci-digits", split="all"), cache_dir=str(tmp_path))
    assert whole.total() == 1797
    cfg = CorpusConfig(source="uci-digits", split="train", split_fractions=fractions, split_seed=0)
    parts = _parts(cfg, cache_dir=str(tmp_path))
    _assert_is_a_split(parts, whole, fractions)
    _assert_stable_in_seed(cfg, parts, cache_dir=str(tmp_path))
    capped = _load(cfg.model_copy(update={"num_images": 25}), cache_dir=str(tmp_path))
    assert capped.total() == 25 and not capped - parts["train"]
    # Every split and seed reads the one unsplit cache entry.
    assert [p.name for p in (tmp_path / "builtin").iterdir()] == [f"uci-digits-all-nall-s0-v{FORMAT_VERSION}"]


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


@pytest.mark.ray
def test_idx_hash_split_of_an_archive_part(ray_local, tmp_path: Path) -> None:
    """Array sources split by raw pixel bytes; ``archive_split`` picks the IDX test files to split."""
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (40, 28, 28)), rng.integers(0, 256, (200, 28, 28))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(_idx(train))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(_idx(np.zeros(40)))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(_idx(test))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(_idx(np.arange(200) % 10))
    whole = _load(CorpusConfig(source=str(tmp_path), split="test"))
    cfg = CorpusConfig(source=str(tmp_path), split="val", split_fractions=FRACTIONS, archive_split="test")
    parts = _parts(cfg)
    _assert_is_a_split(parts, whole, FRACTIONS)
    capped = _load(cfg.model_copy(update={"split": "train", "num_images": 3}))
    assert capped.total() == 3 and not capped - parts["train"]
    default_archive = _load(cfg.model_copy(update={"archive_split": None}))
    assert default_archive and not _images(default_archive) & _images(whole)  # reads the train files
