"""Downsampled ImageNet (ImageNet-16/32/64) and KD3 pickles, from small files written in the real formats."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pickle
from pathlib import Path

import numpy as np
import pytest

from rayoodkd.data import CorpusConfig, load_corpus, resolve_format
from rayoodkd.data.readers import _imagenet_arrays

GREEN, BLUE, MARK = 100, 200, 255


def _rows(ids: list[int], side: int = 32) -> np.ndarray:
    """Channel-planar rows (R plane, G plane, B plane): red is 10·id with pixel (y=1, x=2) at 255, green and
    blue constant."""
    plane = side * side
    data = np.zeros((len(ids), 3 * plane), np.uint8)
    for i, row_id in enumerate(ids):
        data[i, :plane] = 10 * row_id
        data[i, side + 2] = MARK
        data[i, plane : 2 * plane] = GREEN
        data[i, 2 * plane :] = BLUE
    return data


def _batch(ids: list[int], side: int = 32, *, val: bool = False) -> dict[str, object]:
    """A downsampled ImageNet batch: labels 1..1000 (here id + 1); ``val_data`` has no mean."""
    data = _rows(ids, side)
    batch: dict[str, object] = {"data": data, "labels": [row_id + 1 for row_id in ids]}
    if not val:
        batch["mean"] = data.mean(axis=0, dtype=np.float64)
    return batch


def _pickle2(obj: object, *, numpy1: bool = False) -> bytes:
    """Protocol 2, as the release's pickles; ``numpy1``: name the numpy < 2 module, as those pickles do."""
    data = pickle.dumps(obj, 2)
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray") if numpy1 else data


def _check_decoded(images: np.ndarray, ids: list[int], side: int = 32) -> None:
    assert images.shape == (len(ids), side, side, 3) and images.dtype == np.uint8
    assert images[:, 0, 0, 0].tolist() == [10 * i for i in ids]
    assert (images[:, 1, 2, 0] == MARK).all() and (images[:, 1, 2, 1:] != MARK).all()
    assert (images[..., 1] == GREEN).all() and (images[..., 2] == BLUE).all()


@pytest.fixture
def imagenet32(tmp_path: Path) -> Path:
    """train_data_batch_1/2/10 (ids 0-1, 2-3, 4; batch 10 as numpy < 2 wrote it) and val_data (ids 20-22)."""
    root = tmp_path / "Imagenet32_train"
    root.mkdir()
    (root / "train_data_batch_10").write_bytes(_pickle2(_batch([4]), numpy1=True))
    (root / "train_data_batch_2").write_bytes(_pickle2(_batch([2, 3])))
    (root / "train_data_batch_1").write_bytes(_pickle2(_batch([0, 1])))
    (root / "val_data").write_bytes(_pickle2(_batch([20, 21, 22], val=True)))
    return root


def test_downsampled_directory_train_in_numeric_order_and_val(imagenet32: Path) -> None:
    cfg = CorpusConfig(source=str(imagenet32))
    assert resolve_format(cfg) == "imagenet_pickle"
    assert resolve_format(CorpusConfig(source=str(imagenet32 / "train_data_batch_2"))) == "imagenet_pickle"
    images, labels = _imagenet_arrays(cfg)
    _check_decoded(images, [0, 1, 2, 3, 4])
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 4]  # 1-based made 0-based
    images, labels = _imagenet_arrays(cfg.model_copy(update={"split": "val"}))
    _check_decoded(images, [20, 21, 22])
    assert labels.tolist() == [20, 21, 22]
    images, labels = _imagenet_arrays(CorpusConfig(source=str(imagenet32 / "train_data_batch_10")))
    assert labels.tolist() == [4]


def test_downsampled_reading_stops_at_num_images(imagenet32: Path) -> None:
    _, labels = _imagenet_arrays(CorpusConfig(source=str(imagenet32), num_images=3))
    assert labels.tolist() == [0, 1, 2, 3]  # whole batches 1 and 2; load_corpus caps the rows
    split = CorpusConfig(source=str(imagenet32), num_images=3, split_fractions=(0.5, 0.5, 0.0), split="val")
    assert len(_imagenet_arrays(split)[1]) == 5  # a hash split needs every row first


def test_downsampled_side_from_row_length_and_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "train_data_batch_1").write_bytes(_pickle2(_batch([1, 2], side=64)))
    images, labels = _imagenet_arrays(CorpusConfig(source=str(tmp_path)))
    _check_decoded(images, [1, 2], side=64)
    assert labels.tolist() == [1, 2]
    with pytest.raises(ValueError, match="no val_data"):
        _imagenet_arrays(CorpusConfig(source=str(tmp_path), split="val"))
    bad = tmp_path / "val_data"
    bad.write_bytes(_pickle2({"data": np.zeros((2, 1000), np.uint8), "labels": [1, 2]}))
    with pytest.raises(ValueError, match=r"val_data: 'data' of shape \(2, 1000\)") as err:
        _imagenet_arrays(CorpusConfig(source=str(tmp_path), split="val"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="split: 'test' is not valid for format 'imagenet_pickle'"):
        CorpusConfig(source=str(tmp_path), format="imagenet_pickle", split="test")


def test_downsampled_npz_variant(tmp_path: Path) -> None:
    for n, ids in ((1, [0, 1]), (2, [2])):
        batch = _batch(ids, side=16)
        np.savez(tmp_path / f"train_data_batch_{n}.npz", **batch)
    val = _batch([9], side=16, val=True)
    np.savez(tmp_path / "val_data.npz", data=val["data"], labels=np.array(val["labels"]))
    cfg = CorpusConfig(source=str(tmp_path))
    assert resolve_format(cfg) == "imagenet_pickle"
    assert resolve_format(CorpusConfig(source=str(tmp_path / "val_data.npz"))) == "imagenet_pickle"
    images, labels = _imagenet_arrays(cfg)
    _check_decoded(images, [0, 1, 2], side=16)
    assert labels.tolist() == [0, 1, 2]
    images, labels = _imagenet_arrays(CorpusConfig(source=str(tmp_path / "val_data.npz")))
    _check_decoded(images, [9], side=16)
    assert labels.tolist() == [9]


def test_kd3_single_pickle(tmp_path: Path) -> None:
    path = tmp_path / "ImageNet-32.pkl"
    kd3 = {
        "train": {"data": _rows([3, 4, 5]), "target": [np.int64(0), np.int64(7), np.int64(7)]},
        "test": {"data": _rows([6]), "target": np.array([2])},
    }
    path.write_bytes(pickle.dumps(kd3, pickle.HIGHEST_PROTOCOL))
    cfg = CorpusConfig(source=str(path))
    assert resolve_format(cfg) == "imagenet_pickle"
    images, labels = _imagenet_arrays(cfg)
    _check_decoded(images, [3, 4, 5])
    assert labels.tolist() == [0, 7, 7]  # KD3's targets are kept as given
    images, labels = _imagenet_arrays(cfg.model_copy(update={"split": "val"}))  # no 'val': its 'test'
    _check_decoded(images, [6])
    assert labels.tolist() == [2]
    path.write_bytes(pickle.dumps({"train": {"data": _rows([1])}}, 2))
    with pytest.raises(ValueError, match=r"ImageNet-32\.pkl is neither .* 'target'.*keys \['train'\]"):
        _imagenet_arrays(cfg)


def test_pickle_detection_leaves_cifar_batches_alone(tmp_path: Path) -> None:
    for name in ("data_batch_1.pkl", "test_batch.pickle", "webly.pickle"):
        (tmp_path / name).write_bytes(_pickle2(_batch([0])))
    assert resolve_format(CorpusConfig(source=str(tmp_path / "webly.pickle"))) == "imagenet_pickle"
    assert resolve_format(CorpusConfig(source=str(tmp_path / "data_batch_1.pkl"))) != "imagenet_pickle"
    assert resolve_format(CorpusConfig(source=str(tmp_path / "test_batch.pickle"))) != "imagenet_pickle"


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("layout", ["batch", "kd3"])
def test_malicious_pickle_is_refused(tmp_path: Path, layout: str) -> None:
    marker = tmp_path / "pwned"
    exploit = _Exploit(marker)
    path = tmp_path / ("train_data_batch_1" if layout == "batch" else "webly.pkl")
    payload = {"data": exploit, "labels": [1]} if layout == "batch" else {"train": {"data": exploit}}
    path.write_bytes(pickle.dumps(payload, 2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _imagenet_arrays(CorpusConfig(source=str(path)))
    assert not marker.exists()


@pytest.mark.ray
def test_load_corpus_decodes_imagenet32(ray_local, imagenet32: Path) -> None:
    cfg = CorpusConfig(source=str(imagenet32), num_images=3)
    rows = {"image": [], "label": [], "corrupt": []}
    for batch in load_corpus(cfg, image_size=32, channels=3).iter_batches(batch_format="numpy"):
        for key, column in rows.items():
            column.append(batch[key])
    image, label, corrupt = (np.concatenate(rows[key]) for key in ("image", "label", "corrupt"))
    order = np.argsort(label)
    assert label[order].tolist() == [0, 1, 2] and not corrupt.any()
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image[order], _rows([0, 1, 2]).reshape(3, 3, 32, 32))
