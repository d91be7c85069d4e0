"""Corpus readers on a local Ray instance, on small files written here in each real format, and the CLI."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rayoodkd.data import CorpusConfig, class_names_of, corpus_summary, load_corpus, resolve_format
from rayoodkd.data.__main__ import main
from rayoodkd.data.builtin import FORMAT_VERSION

# Every test here runs on conftest's session-wide local Ray instance (``ray_local``), started once.
pytestmark = pytest.mark.ray


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _rows(ds) -> dict[str, np.ndarray]:
    """All rows as numpy columns (images in [0, 1]), in a stable order (by label, corrupt first, then mean
    intensity)."""
    cols = {k: [] for k in ("image", "label", "corrupt")}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for k in cols:
            cols[k].append(batch[k])
    out = {k: np.concatenate(v) for k, v in cols.items()}
    assert out["image"].dtype == np.uint8  # decoded pixels; the workers turn them into floats
    out["image"] = out["image"].astype(np.float32) / 255
    means = out["image"].reshape(len(out["label"]), -1).mean(axis=1)
    order = np.lexsort((means, ~out["corrupt"], out["label"]))
    return {k: v[order] for k, v in out.items()}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """cats/ (3 PNGs, 1 RGB JPEG, 1 truncated PNG), dogs/ (2 palette PNGs, 1 garbage .jpg), a text file."""
    root = tmp_path_factory.mktemp("folder")
    (root / "cats").mkdir()
    (root / "dogs").mkdir()
    for i, value in enumerate((0, 100, 200)):
        Image.fromarray(np.full((10, 14), value, np.uint8)).save(root / "cats" / f"{i}.png")
    Image.new("RGB", (40, 30), (255, 255, 255)).save(root / "cats" / "white.JPG", quality=95)
    whole = _png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    (root / "cats" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    for i in range(2):
        img = Image.new("P", (9, 9), 1)
        img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
        img.save(root / "dogs" / f"{i}.png")
    (root / "dogs" / "garbage.jpg").write_bytes(b"this is not a jpeg" * 20)
    (root / "README.txt").write_text("not an image")
    return root


def test_image_folder_labels_and_corrupt_files(ray_local, image_folder: Path) -> None:
    cfg = CorpusConfig(source=str(image_folder))
    assert resolve_format(cfg) == "image_folder"
    assert class_names_of(cfg) == ["cats", "dogs"]
    rows = _rows(load_corpus(cfg, image_size=8, channels=1))
    assert rows["image"].shape == (8, 1, 8, 8)
    assert rows["label"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert rows["corrupt"].tolist() == [True, False, False, False, False, True, False, False]
    means = rows["image"].mean(axis=(1, 2, 3))
    np.testing.assert_allclose(means[:5], [0, 0, 100 / 255, 200 / 255, 1.0], atol=0.02)
    np.testing.assert_allclose(means[5:], [0, 1, 1], atol=1e-6)
    unlabelled = _rows(load_corpus(cfg.model_copy(update={"labelled": False}), image_size=4, channels=3))
    assert unlabelled["image"].shape == (8, 3, 4, 4) and (unlabelled["label"] == -1).all()
    assert unlabelled["corrupt"].sum() == 2


def test_flat_image_folder_is_unlabelled(ray_local, tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(np.full((5, 5), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
    summary = corpus_summary(load_corpus(CorpusConfig(source=str(tmp_path)), image_size=5, channels=1))
    assert summary == {"rows": 3, "corrupt": 0, "labelled": 0, "label_counts": {-1: 3}}


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory) -> Path:
    """Two shards with columns img (PNG bytes), y (int64) and an unrelated string column."""
    root = tmp_path_factory.mktemp("parquet")
    for shard in range(2):
        labels = [shard * 3 + i for i in range(3)]
        images = [_png(np.full((6, 6), 20 * label, np.uint8)) for label in labels]
        table = pa.table({"img": images, "y": pa.array(labels, pa.int64()), "note": ["x"] * 3})
        pq.write_table(table, root / f"part-{shard}.parquet")
    return root


@pytest.mark.parametrize("form", ["dir", "file_uri", "glob"])
def test_parquet_round_trip(ray_local, parquet_dir: Path, form: str) -> None:
    source = {
        "dir": str(parquet_dir),
        "file_uri": parquet_dir.as_uri(),
        "glob": str(parquet_dir / "part-*.parquet"),
    }[form]
    cfg = CorpusConfig(source=source, image_column="img", label_column="y")
    assert resolve_format(cfg) == "parquet"
    rows = _rows(load_corpus(cfg, image_size=6, channels=1))
    assert rows["label"].tolist() == [0, 1, 2, 3, 4, 5] and not rows["corrupt"].any()
    np.testing.assert_allclose(rows["image"][:, 0, 0, 0], [20 * i / 255 for i in range(6)], atol=1e-6)


def test_parquet_limits_labels_and_schema_errors(ray_local, parquet_dir: Path) -> None:
    cfg = CorpusConfig(source=str(parquet_dir), image_column="img", label_column="y", num_images=4)
    assert corpus_summary(load_corpus(cfg, image_size=4, channels=1))["rows"] == 4
    no_label = CorpusConfig(source=str(parquet_dir), image_column="img")  # default "label" column is optional
    assert _rows(load_corpus(no_label, image_size=4, channels=1))["label"].tolist() == [-1] * 6
    with pytest.raises(ValueError, match="label_column: column 'target'"):
        load_corpus(no_label.model_copy(update={"label_column": "target"}), image_size=4, channels=1)
    with pytest.raises(ValueError, match="image_column: column 'image'"):
        load_corpus(CorpusConfig(source=str(parquet_dir)), image_size=4, channels=1)


def _cifar_batch(n: int, offset: int, key: bytes) -> bytes:
    data = np.zeros((n, 3072), np.uint8)
    for i in range(n):
        data[i, :1024] = 10 * (offset + i)  # red plane encodes the row number
        data[i, 1024:2048] = 7  # green
    return pickle.dumps({b"data": data, key: [(offset + i) % 10 for i in range(n)], b"batch_label": b"x"}, 2)


def test_cifar10_archive(ray_local, tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        members = {
            "data_batch_2": _cifar_batch(2, 3, b"labels"),
            "data_batch_1": _cifar_batch(3, 0, b"labels"),
        }
        members["test_batch"] = _cifar_batch(4, 10, b"labels")
        members["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"]}, 2)
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    cfg = CorpusConfig(source=str(archive))
    assert resolve_format(cfg) == "cifar"
    rows = _rows(load_corpus(cfg, image_size=32, channels=3))
    assert rows["image"].shape == (5, 3, 32, 32) and rows["label"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(rows["image"][:, 0, 5, 5], [10 * i / 255 for i in range(5)], atol=1e-6)
    np.testing.assert_allclose(rows["image"][:, 1], 7 / 255, atol=1e-6)
    np.testing.assert_allclose(rows["image"][:, 2], 0.0)
    test = corpus_summary(load_corpus(cfg.model_copy(update={"split": "test"}), image_size=8, channels=1))
    assert test["rows"] == 4 and test["label_counts"] == {0: 1, 1: 1, 2: 1, 3: 1}


def test_cifar100_directory_and_refuses_foreign_pickles(ray_local, tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(_cifar_batch(3, 0, b"fine_labels"))
    (folder / "test").write_bytes(_cifar_batch(2, 20, b"fine_labels"))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": []}, 2))
    cfg = CorpusConfig(source=str(tmp_path), split="test")  # the parent of the extracted folder works too
    assert resolve_format(cfg) == "cifar"
    summary = corpus_summary(load_corpus(cfg, image_size=8, channels=3))
    assert summary["rows"] == 2 and summary["label_counts"] == {0: 1, 1: 1}
    (folder / "train").write_bytes(pickle.dumps({b"data": os.system}, 2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_corpus(CorpusConfig(source=str(folder)), image_size=8, channels=3)


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def test_idx_gzip_files(ray_local, tmp_path: Path) -> None:
    images = np.stack([np.full((28, 28), 30 * i, np.uint8) for i in range(4)])
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(_idx(images))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(_idx(np.array([3, 1, 4, 1])))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(_idx(images[:2]))
    by_file = CorpusConfig(source=str(tmp_path / "train-images-idx3-ubyte.gz"))
    assert resolve_format(by_file) == "idx"
    rows = _rows(load_corpus(by_file, image_size=14, channels=1))
    assert rows["label"].tolist() == [1, 1, 3, 4]
    np.testing.assert_allclose(rows["image"].mean(axis=(1, 2, 3)), np.array([30, 90, 0, 60]) / 255, atol=1e-6)
    test = CorpusConfig(source=str(tmp_path), split="test")  # directory + split, no labels file for t10k
    assert resolve_format(test) == "idx"
    assert corpus_summary(load_corpus(test, image_size=28, channels=1))["label_counts"] == {-1: 2}


def test_numpy_npz_and_npy(ray_local, tmp_path: Path) -> None:
    x = np.zeros((3, 3, 5, 5), np.float32)  # NCHW floats in [0, 1]
    x[:, 0] = np.array([0.0, 0.5, 1.0])[:, None, None]
    np.savez(tmp_path / "set.npz", x=x, y=np.array([2, 0, 1]))
    rows = _rows(load_corpus(CorpusConfig(source=str(tmp_path / "set.npz")), image_size=5, channels=3))
    assert rows["label"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(rows["image"][:, 0, 2, 2], [0.5, 1.0, 0.0], atol=1 / 255)
    assert rows["image"][:, 1:].max() == 0.0
    np.save(tmp_path / "gray.npy", np.full((4, 7, 7), 255, np.uint8))
    cfg = CorpusConfig(source=str(tmp_path / "gray.npy"), num_images=2)
    assert resolve_format(cfg) == "numpy"
    summary = corpus_summary(load_corpus(cfg, image_size=7, channels=1))
    assert summary == {"rows": 2, "corrupt": 0, "labelled": 0, "label_counts": {-1: 2}}


def test_builtin_goes_through_the_parquet_cache(ray_local, tmp_path: Path) -> None:
    cfg = CorpusConfig(source="mnist5k", split="val")
    ds = load_corpus(cfg, image_size=16, channels=1, cache_dir=str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "builtin").iterdir()) == [
        f"mnist5k-val-nall-s0-v{FORMAT_VERSION}"
    ]
    summary = corpus_summary(ds)
    assert summary["rows"] == 500 and summary["corrupt"] == 0
    assert summary["label_counts"] == {d: 50 for d in range(10)}
    assert class_names_of(cfg) == [str(d) for d in range(10)]


def test_cli_materialize_skips_corrupt_and_overwrites(
    ray_local, image_folder: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "shards"
    argv = ["materialize", str(image_folder), "--out", str(out), "--image-size", "8", "--shard-rows", "4"]
    for _ in range(2):  # the second run overwrites instead of appending
        assert main(argv) == 0
        printed = capsys.readouterr().out
        assert "skipped 2 corrupt images" in printed and "wrote 6 images" in printed
    table = pq.read_table(out)
    assert table.num_rows == 6 and sorted(table.column("label").to_pylist()) == [0, 0, 0, 0, 1, 1]
    assert len(list(out.glob("*.parquet"))) == 2
    decoded = [Image.open(io.BytesIO(b)) for b in table.column("image").to_pylist()]
    assert {(img.mode, img.size) for img in decoded} == {("L", (8, 8))}
    summary = corpus_summary(load_corpus(CorpusConfig(source=str(out)), image_size=8, channels=1))
    assert summary["rows"] == 6 and summary["corrupt"] == 0
    assert main(["inspect", str(image_folder), "--image-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "rows: 8" in printed and "corrupt: 2" in printed and "cats" in printed
