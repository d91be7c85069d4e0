"""The driver's view of a run's corpora: how many intact rows each consumed stream has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rayoodkd.config import resolve_config
from rayoodkd.engine.session import _dataset_reader, _intact_block_batches, block_shares
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
    ray_local: object, folder_with_corrupt_images: Path, materialize: bool, tmp_path: Path
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
            f"data.cache_dir={tmp_path}",
        ],
    )
    info = TeacherInfo("lenet5", 10, 1, 28, (0.13,), (0.31,))
    datasets, corrupt, rows = _datasets(cfg, info)
    assert rows == {"ood": 6}
    assert corrupt.get("ood") == (2 if materialize else None)  # streamed corpora are counted by the workers
    # An eval split keeps its corrupt rows (and, materialised, its blocks); evaluation skips them itself.
    assert (block_shares(datasets["val"], 1) is not None) == materialize
    assert sum(len(labels) for _, labels in _dataset_reader(datasets["val"], 4)()) == 6


def _rows(dataset: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A corpus's images, labels and corrupt flags, in a canonical row order (block order may differ)."""
    batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    columns = [np.concatenate([b[name] for b in batches]) for name in ("image", "label", "corrupt")]
    order = np.lexsort((*columns[0].reshape(len(columns[0]), -1).T, columns[1]))
    return tuple(column[order] for column in columns)


def test_a_materialised_corpus_decodes_once_and_a_changed_file_decodes_again(
    ray_local: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rayoodkd.data

    folder = tmp_path / "ood"
    for label, name in enumerate(("a", "b")):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((12, 12), 40 * i + label, np.uint8)).save(folder / name / f"{i}.png")
    (folder / "b" / "garbage.png").write_bytes(b"not an image" * 10)
    cfg = resolve_config(
        "demo",
        [
            "num_workers=1",
            "data.batch_size=2",
            f"data.cache_dir={tmp_path / 'cache'}",
            *(f"data.{name}={{source: {folder}}}" for name in ("ood", "val", "test")),
        ],
    )
    info = TeacherInfo("lenet5", 10, 1, 28, (0.13,), (0.31,))
    decoded, corrupt, rows = _datasets(cfg, info)
    assert (corrupt["ood"], rows) == (1, {"ood": 6})
    first = _rows(decoded["ood"])
    assert sorted(first[1].tolist()) == [0, 0, 0, 1, 1, 1]  # labels from the class folders, corrupt row gone

    reads = []
    real_load = rayoodkd.data.load_corpus
    monkeypatch.setattr(rayoodkd.data, "load_corpus", lambda *a, **k: reads.append(a) or real_load(*a, **k))
    cached, corrupt, rows = _datasets(cfg, info)
    assert reads == []  # nothing read or decoded: every corpus came from the decoded cache
    assert (corrupt["ood"], rows) == (1, {"ood": 6})
    for got, want in zip(_rows(cached["ood"]), first, strict=True):
        np.testing.assert_array_equal(got, want)

    Image.fromarray(np.full((12, 12), 255, np.uint8)).save(folder / "a" / "0.png")
    changed, _, _ = _datasets(cfg, info)
    assert len(reads) == 3  # the changed folder is decoded again, for each of the three corpora
    assert _rows(changed["ood"])[0].max() == 255

    unmaterialised = cfg.model_copy(update={"data": cfg.data.model_copy(update={"materialize": False})})
    _datasets(unmaterialised, info)
    assert len(reads) == 6  # a corpus streamed every epoch is never taken from the cache


def test_the_decoded_cache_keys_what_the_reader_may_open_and_keeps_only_what_fits(
    ray_local: object, tmp_path: Path
) -> None:
    import ray.data

    from rayoodkd.data import CorpusConfig
    from rayoodkd.data.decoded import cache_key, count_and_keep, read_cached, slot

    def key(source: str | CorpusConfig, image_size: int = 28, seed: int = 0) -> str | None:
        corpus = source if isinstance(source, CorpusConfig) else CorpusConfig(source=source)
        return cache_key(corpus, image_size=image_size, channels=1, seed=seed)

    assert key("s3://bucket/images") is None
    assert key(str(tmp_path / "missing")) is None
    letters = CorpusConfig(source="letters", num_images=100)
    digits = CorpusConfig(source="mnist5k", split="val")
    assert key(letters, seed=0) != key(letters, seed=1)  # a generated set is rendered from the seed
    assert key(digits, seed=0) == key(digits, seed=1)  # the real digits are not
    assert key(digits) != key(digits, image_size=32)

    idx = tmp_path / "idx"
    idx.mkdir()
    images = idx / "t10k-images-idx3-ubyte"
    images.write_bytes(b"images")
    before = key(str(images))
    (idx / "t10k-labels-idx1-ubyte").write_bytes(b"labels")  # the reader pairs it with the images file
    assert key(str(images)) != before

    folder = tmp_path / "folder"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "0.png").write_bytes(b"png")
    before = key(str(folder))
    (folder / "0-empty-class").mkdir()  # an empty class folder shifts every label after it
    assert key(str(folder)) != before
    linked = tmp_path / "linked"
    (linked / "c").mkdir(parents=True)
    (folder / "c").symlink_to(linked / "c", target_is_directory=True)
    before = key(str(folder))
    (linked / "c" / "1.png").write_bytes(b"png")  # a file in a symlinked class folder
    assert key(str(folder)) != before

    def as_decoded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch["data"]
        labels = np.arange(len(pixels)) % 10
        return {"image": pixels, "label": labels, "corrupt": labels == 3}

    pixels = np.random.default_rng(0).integers(0, 255, (1500, 1, 28, 28), np.uint8)  # 1.1 MB of pixels
    dataset = ray.data.from_numpy(pixels).map_batches(as_decoded).materialize()
    options = {"image_size": 28, "channels": 1, "seed": 0, "cache_dir": str(tmp_path / "cache")}
    too_small = slot(digits, **options, limit_mb=1)
    assert count_and_keep(dataset, too_small) == (1500, 150)
    assert read_cached(too_small, blocks=4) is None
    assert slot(digits, **options, limit_mb=1) is None  # marked over the limit: not even listed again
    fits = slot(digits, **options, limit_mb=2)
    assert count_and_keep(dataset, fits) == (1500, 150)
    cached, rows, corrupt = read_cached(fits, blocks=4)
    assert (rows, corrupt, cached.num_blocks()) == (1500, 150, 4)
    got = np.concatenate([b["image"] for b in cached.iter_batches(batch_size=None, batch_format="numpy")])
    np.testing.assert_array_equal(got, pixels)  # in the dataset's block order
    (fits.path / "label.npy").write_bytes(b"damaged")
    assert read_cached(fits, blocks=4) is None and not fits.path.exists()


def test_a_materialised_eval_split_reaches_the_ranks_as_its_blocks_and_a_lazy_one_streams(
    ray_local: object,
) -> None:
    import ray.data

    from rayoodkd.engine.ingest import RunDataConfig

    rows = [
        {"image": np.full((1, 2, 2), i % 251, np.uint8), "label": i, "corrupt": int(i % 97 == 0)}
        for i in range(1000)
    ]
    materialised = ray.data.from_items(rows).repartition(8).materialize()
    lazy = ray.data.range(600).map_batches(lambda batch: batch)
    shares = block_shares(materialised, 2)
    assert block_shares(lazy, 2) is None

    def read(blocks: list) -> list[int]:
        labels = []
        for images, batch in _intact_block_batches(blocks, 64):
            assert len(batch) <= 64 and images.dtype == torch.uint8 and batch.dtype == torch.int64
            assert images[:, 0, 0, 0].tolist() == [label % 251 for label in batch.tolist()]  # rows stay whole
            labels += batch.tolist()
        return labels

    val = [read(share) for share in shares]
    assert sorted(val[0] + val[1]) == [i for i in range(1000) if i % 97]  # no intact row lost or doubled
    assert min(map(len, val)) > 0 and read(shares[0]) == val[0]  # each rank's share, the same every time
    all_corrupt = ray.data.from_items([{**rows[0], "corrupt": 1}] * 3).materialize()
    assert list(_intact_block_batches(block_shares(all_corrupt, 1)[0], 64)) == []  # no empty batch
    node = ray_local.get_runtime_context().get_node_id()
    splits = RunDataConfig(streams=[], eval_splits=["test"]).configure(
        {"test": lazy}, world_size=2, worker_handles=None, worker_node_ids=[node, node]
    )
    assert all(type(split["test"]).__name__ == "StreamSplitDataIterator" for split in splits)
