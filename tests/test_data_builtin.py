"""Builtin offline image sets, their parquet cache and CorpusConfig validation (no Ray)."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from rayoodkd.data import BUILTIN_SOURCES, CorpusConfig, builtin, builtin_arrays, materialize_builtin

HAS_HERSHEY = os.path.isdir(builtin.HERSHEY_DIR)


def _row_keys(images: np.ndarray) -> set[bytes]:
    return {img.tobytes() for img in images}


def test_mnist5k_splits_are_stratified_disjoint_and_deterministic() -> None:
    sizes = {"train": 3500, "val": 500, "test": 1000, "all": 5000}
    parts = {}
    for split, size in sizes.items():
        images, labels = builtin_arrays("mnist5k", split)
        assert images.shape == (size, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
        assert np.bincount(labels, minlength=10).tolist() == [size // 10] * 10
        parts[split] = images
    keys = {s: _row_keys(parts[s]) for s in ("train", "val", "test")}
    assert len(keys["train"]) == 3500 and len(keys["val"]) == 500 and len(keys["test"]) == 1000
    assert (
        not keys["train"] & keys["val"]
        and not keys["train"] & keys["test"]
        and not keys["val"] & keys["test"]
    )
    assert keys["train"] | keys["val"] | keys["test"] == _row_keys(parts["all"])
    again, _ = builtin_arrays("mnist5k", "val", seed=123)  # the split never depends on the run seed
    np.testing.assert_array_equal(again, parts["val"])
    train_labels = builtin_arrays("mnist5k", "train")[1]
    assert len(set(train_labels[:20].tolist())) > 3  # shuffled, not sorted by class
    assert 20 < parts["all"].mean() < 60 and parts["all"].max() == 255  # MNIST: bright strokes, dark ground
    first, labels = builtin_arrays("mnist5k", "test", num_images=30)
    np.testing.assert_array_equal(first, parts["test"][:30])
    assert builtin_arrays("mnist5k")[0].shape[0] == 3500  # default split: train


def test_uci_digits_split_and_scaling() -> None:
    sizes = [len(builtin_arrays("uci-digits", s)[1]) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and abs(sizes[0] - 0.7 * 1797) < 10 and abs(sizes[1] - 0.1 * 1797) < 10
    images, labels = builtin_arrays("uci-digits", "all")
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    assert np.bincount(labels).min() > 170


@pytest.mark.parametrize(
    "name",
    [
        "letters",
        "textures",
        pytest.param(
            "hershey",
            marks=pytest.mark.skipif(not HAS_HERSHEY, reason="apt package hershey-fonts-data not installed"),
        ),
    ],
)
def test_generated_sets_are_deterministic_in_seed(name: str) -> None:
    a, la = builtin_arrays(name, None, 48, seed=0)
    b, lb = builtin_arrays(name, None, 48, seed=0)
    c, _ = builtin_arrays(name, None, 48, seed=1)
    v, _ = builtin_arrays(name, "val", 48, seed=0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c) and not np.array_equal(a, v)
    assert a.shape == (48, 28, 28) and a.dtype == np.uint8 and la.dtype == np.int64
    per_image_std = a.reshape(48, -1).std(axis=1)
    assert (per_image_std > 5).mean() > 0.9  # non-trivial content, not blank images
    if name == "textures":
        assert (la == -1).all()
        assert 40 < a.mean() < 200
    else:
        assert la.min() >= 0 and la.max() < 52 and len(set(la.tolist())) > 20
        assert 15 < a.mean() < 110 and (a.reshape(48, -1).max(axis=1) == 255).all()
        border = np.concatenate(
            [a[:, :2].ravel(), a[:, -2:].ravel(), a[:, :, :2].ravel(), a[:, :, -2:].ravel()]
        )
        assert border.mean() < a[:, 8:20, 8:20].mean() / 3  # centred glyph on a dark background


def test_hershey_parser_and_missing_fonts_message(tmp_path, monkeypatch) -> None:
    glyphs = builtin._parse_jhf("12345  5H\\NJPISFS[\n12345  5F^ZIJR R[[\n")
    assert glyphs[0] == [[(-4, -8), (-2, -9), (1, -12), (1, 9)]]
    assert glyphs[1] == [[(8, -9), (-8, 0)], [(9, 9)]]
    monkeypatch.setattr(builtin, "HERSHEY_DIR", str(tmp_path / "missing"))
    builtin._hershey_glyphs.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="apt-get install -y hershey-fonts-data"):
            builtin_arrays("hershey", None, 4)
    finally:
        builtin._hershey_glyphs.cache_clear()


def test_bad_builtin_arguments() -> None:
    with pytest.raises(ValueError, match=r"source: .*allowed: mnist5k, uci-digits"):
        builtin_arrays("mnist60k")
    with pytest.raises(ValueError, match=r"split: .*allowed: train, val, test, all"):
        builtin_arrays("letters", "holdout", 4)
    with pytest.raises(ValueError, match="num_images"):
        builtin_arrays("letters", None, 0)


def test_materialize_builtin_writes_png_shards_and_reuses_cache(tmp_path, monkeypatch) -> None:
    out = materialize_builtin("letters", "train", 40, seed=3, cache_dir=str(tmp_path))
    assert out.parent == tmp_path / "builtin" and out.is_dir()
    table = pq.read_table(out)
    assert table.column_names == ["image", "label"] and table.num_rows == 40
    expected, labels = builtin_arrays("letters", "train", 40, seed=3)
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in table.column("image").to_pylist()])
    np.testing.assert_array_equal(decoded, expected)  # PNG is lossless
    assert table.column("label").to_pylist() == labels.tolist()
    assert not [p for p in (tmp_path / "builtin").iterdir() if p.name.startswith(".tmp")]

    def fail(*args, **kwargs):
        raise AssertionError("a cached set must not be re-rendered")

    monkeypatch.setattr(builtin, "builtin_arrays", fail)
    assert materialize_builtin("letters", "train", 40, seed=3, cache_dir=str(tmp_path)) == out
    monkeypatch.setenv("RAYOODKD_CACHE", str(tmp_path))
    assert materialize_builtin("letters", None, 40, seed=3) == out  # env cache dir, default split train
    with pytest.raises(AssertionError, match="re-rendered"):
        materialize_builtin("letters", "train", 40, seed=4, cache_dir=str(tmp_path))  # another key renders


def test_materialize_builtin_tolerates_a_concurrent_writer(tmp_path, monkeypatch) -> None:
    real = builtin.write_parquet_shards
    key = f"uci-digits-val-nall-s0-v{builtin.FORMAT_VERSION}"

    def racing_writer(images, labels, out_dir, **kwargs):
        paths = real(images, labels, out_dir, **kwargs)
        final = tmp_path / "builtin" / key
        real(images, labels, final)  # another process publishes the same key first
        return paths

    monkeypatch.setattr(builtin, "write_parquet_shards", racing_writer)
    out = materialize_builtin("uci-digits", "val", cache_dir=tmp_path)
    assert out.name == key
    assert pq.read_table(out).num_rows == len(builtin_arrays("uci-digits", "val")[1])
    assert sorted(p.name for p in (tmp_path / "builtin").iterdir()) == [out.name]


def test_printed_digits_are_the_ten_digits_in_every_font_and_each_split_a_new_render(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rayoodkd.data.readers import class_names_of

    drawn: list[tuple[str, str]] = []
    glyph_image = builtin._glyph_image

    def recording(char: str, path: str, rng: np.random.Generator) -> np.ndarray:
        drawn.append((char, path))
        return glyph_image(char, path, rng)

    monkeypatch.setattr(builtin, "_glyph_image", recording)
    images, labels = builtin_arrays("printed-digits", "train", 2000, seed=0)
    assert [char for char, _ in drawn] == [builtin.DIGITS[label] for label in labels]
    assert {path for _, path in drawn} == set(builtin._font_paths())
    assert images.shape == (2000, 28, 28) and images.dtype == np.uint8
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and counts.min() > 150  # every digit, about 200 each
    assert (images.reshape(2000, -1).max(axis=1) > 200).all()  # a white glyph on every image
    # each class is a digit: its mean image differs from every other class's
    means = np.stack([images[labels == d].mean(axis=0) for d in range(10)])
    gaps = np.abs(means[:, None] - means[None]).mean(axis=(2, 3)) + np.eye(10) * 255
    assert gaps.min() > 5
    again, again_labels = builtin_arrays("printed-digits", "train", 2000, seed=0)
    assert np.array_equal(again, images) and np.array_equal(again_labels, labels)
    test_images, _ = builtin_arrays("printed-digits", "test", 2000, seed=0)
    assert not _row_keys(test_images) & _row_keys(images)
    assert class_names_of(CorpusConfig(source="printed-digits")) == [str(d) for d in range(10)]


def test_corpus_config_validation() -> None:
    cfg = CorpusConfig(source="letters")
    assert cfg.format == "auto" and cfg.labelled and cfg.label_column == "label"
    assert set(BUILTIN_SOURCES) == {
        "mnist5k",
        "uci-digits",
        "letters",
        "textures",
        "hershey",
        "web-digits",
        "printed-digits",
    }
    with pytest.raises(ValidationError, match=r"format[\s\S]*'auto'.*'image_folder'"):
        CorpusConfig(source="x", format="tfrecord")
    with pytest.raises(ValidationError, match="source: unknown builtin set 'digits'; allowed: mnist5k"):
        CorpusConfig(source="digits", format="builtin")
    with pytest.raises(ValidationError, match=r"split: 'validation' .*allowed: train, val, test, all"):
        CorpusConfig(source="mnist5k", split="validation")
    with pytest.raises(ValidationError, match=r"split: 'val' .*'cifar'; allowed: train, test"):
        CorpusConfig(source="/data/cifar.tar.gz", format="cifar", split="val")
    with pytest.raises(ValidationError, match="num_images"):
        CorpusConfig(source="letters", num_images=0)
    with pytest.raises(ValidationError, match="colour"):
        CorpusConfig(source="letters", colour=True)
    assert CorpusConfig(source="/some/folder", split="anything").split == "anything"  # ignored by folders
