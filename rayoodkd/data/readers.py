"""Ray Data readers for image corpora, all ending in ``decode_batch`` (columns image/label/corrupt)."""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import math
import os
import pickle
import posixpath
import re
import struct
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.extensions import ArrowTensorArray

from rayoodkd.data.builtin import GENERATED_SOURCES, LETTERS, materialize_builtin
from rayoodkd.data.config import (
    SPLIT_PARTS,
    Corpus,
    CorpusConfig,
    check_archive_split,
    check_split,
    is_glob,
)
from rayoodkd.data.decode import _labels, decode_batch

IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm")
DECODE_BATCH_SIZE = 256
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_IDX_IMAGES = re.compile(r"idx3-ubyte(\.gz)?$", re.IGNORECASE)
_CIFAR10_TRAIN = re.compile(r"data_batch_(\d+)$")
_CIFAR_DIRS = ("cifar-10-batches-py", "cifar-100-python")
_ARCHIVES = (".tar.gz", ".tgz", ".tar")
_IMAGENET_BATCH = re.compile(r"(?:train_data_batch_(\d+)|val_data)(?:\.npz)?")
_PICKLES = (".pkl", ".pickle")
_BLOCK_ROWS = 4096
_CLASS_KEY = "__class_key"
_KEYED_MESSAGE = re.compile(r"\w+: ")


# ------------------------------------------------------------------------------------------ source resolving


def filesystem_and_path(source: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path in it, for a local path or a ``file://``/``s3://``/``gs://`` URI."""
    if _URI.match(source):
        return pafs.FileSystem.from_uri(source)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(source))


def _listdir(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    return sorted(fs.get_file_info(pafs.FileSelector(path, recursive=recursive)), key=lambda i: i.path)


def _is_visible(info: pafs.FileInfo) -> bool:
    return not info.base_name.startswith((".", "_"))


def _detect(fs: pafs.FileSystem, path: str) -> str:
    """Guess the format of a non-builtin source (see ``CorpusConfig``)."""
    name = posixpath.basename(path.rstrip("/")).lower()
    if is_glob(path):
        return "parquet"
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        if name.endswith(".parquet"):
            return "parquet"
        if _IDX_IMAGES.search(name):
            return "idx"
        # A CIFAR-10 batch looks like a downsampled ImageNet one but has 0-based labels.
        if _IMAGENET_BATCH.fullmatch(name) or (
            name.endswith(_PICKLES) and not _cifar_dir_kind({posixpath.splitext(name)[0]})
        ):
            return "imagenet_pickle"
        if name.endswith((".npy", ".npz")):
            return "numpy"
        return "cifar" if name.endswith(_ARCHIVES) else "image_folder"
    entries = [e for e in _listdir(fs, path) if _is_visible(e)]
    files = {e.base_name for e in entries if e.type == pafs.FileType.File}
    dirs = {e.base_name for e in entries if e.type == pafs.FileType.Directory}
    if any(f.lower().endswith(".parquet") for f in files) or (
        dirs and not files and all("=" in d for d in dirs)
    ):
        return "parquet"
    if _cifar_dir_kind(files) or dirs & set(_CIFAR_DIRS):
        return "cifar"
    if any(_IDX_IMAGES.search(f) for f in files):
        return "idx"
    if any(_IMAGENET_BATCH.fullmatch(f) for f in files):
        return "imagenet_pickle"
    return "image_folder"


def resolve_format(cfg: CorpusConfig) -> str:
    """The concrete format of ``cfg`` (``auto`` detected), after checking that a local/URI source exists.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for a split (or archive split) the
    format does not allow.
    """
    if cfg.is_builtin:
        return "builtin"
    fs, path = filesystem_and_path(cfg.source)
    if not is_glob(path) and fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"source: path not found: {cfg.source}")
    fmt = _detect(fs, path) if cfg.format == "auto" else cfg.format
    check_split(fmt, cfg.source_split)
    check_archive_split(fmt, cfg.archive_split)
    return fmt


def class_names_of(corpus: Corpus) -> list[str] | None:
    """Class names in label order for builtin sets and image folders with class subfolders, else None.

    A union's labelled members keep their own labels, so those whose class names are known must number them
    alike (one may have fewer classes, not others); its names are the longest member's. Raises
    ``ValueError`` naming the member (``1.source: ...``) when a label would mean two classes.
    """
    if isinstance(corpus, CorpusConfig):
        return _member_class_names(corpus)
    longest: list[str] = []
    longest_index = None
    for index, member in enumerate(corpus):
        with _member_errors(index):
            names = _member_class_names(member) if member.labelled else None
        if names is None:
            continue
        clash = next((i for i, (a, b) in enumerate(zip(names, longest, strict=False)) if a != b), None)
        if clash is not None:
            raise ValueError(
                f"{index}.source: label {clash} is class {names[clash]!r} here but {longest[clash]!r} in "
                f"member {longest_index} (each member numbers its own classes); give the labelled members "
                "the same classes, or set labelled: false on this one"
            )
        if len(names) > len(longest):
            longest, longest_index = names, index
    return longest or None


def _member_class_names(cfg: CorpusConfig) -> list[str] | None:
    fmt = resolve_format(cfg)
    if fmt == "builtin":
        if cfg.source in ("mnist5k", "uci-digits", "printed-digits"):
            return [str(d) for d in range(10)]
        return list(LETTERS) if cfg.source in ("letters", "hershey") else None
    if fmt == "image_folder":
        fs, path = filesystem_and_path(cfg.source)
        return _class_dirs(fs, path) or None
    return None


# ------------------------------------------------------------------------------------------------ hash split


def content_digests(contents: Iterable[object], seed: int) -> np.ndarray:
    """The 64-bit blake2b hash (uint64) keyed by ``seed`` of each row content: bytes, pixels or None."""
    key = seed.to_bytes(8, "little")
    digests = b"".join(
        hashlib.blake2b(_content_bytes(content), digest_size=8, key=key).digest() for content in contents
    )
    return np.frombuffer(digests, dtype="<u8")


def split_parts_of(contents: Iterable[object], fractions: Sequence[float], seed: int) -> np.ndarray:
    """The hash-split part (0 train, 1 val, 2 test) of each row content: bytes, an array of pixels or None.

    A row's ``content_digests`` hash becomes a uniform number in [0, 1) (its top 53 bits, so exactly
    representable and below 1) that is cut at the cumulative fractions, normalised to end at exactly 1 so a
    zero fraction gets no rows.
    """
    uniform = (content_digests(contents, seed) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    train, val, test = fractions
    total = train + val + test
    bounds = np.array([train / total, (train + val) / total])
    return np.searchsorted(bounds, uniform, side="right").astype(np.int8)


def _content_bytes(content: object) -> bytes | memoryview:
    if content is None:  # a null image cell: hashed as empty content, decoded as corrupt
        return b""
    if isinstance(content, bytes | bytearray | memoryview):
        return content
    return memoryview(np.ascontiguousarray(content))


def _image_contents(batch: pa.Table) -> Iterator[object]:
    """The content of each row's ``image`` cell in a raw (undecoded) pyarrow batch."""
    for chunk in batch.column("image").chunks:
        yield from chunk.to_numpy(zero_copy_only=False)


def _keep_split_part(batch: pa.Table, fractions: Sequence[float], seed: int, part: int) -> pa.Table:
    """The rows of ``batch`` whose ``image`` content hashes into ``part`` (a ``map_batches`` step)."""
    return batch.filter(pa.array(split_parts_of(_image_contents(batch), fractions, seed) == part))


# -------------------------------------------------------------------------------------------- per-class cap


def _with_class_key(batch: pa.Table, seed: int) -> pa.Table:
    """``batch`` less rows of unknown label, with int64 labels and each content hash in ``_CLASS_KEY``."""
    labels = _labels(batch.column("label").to_numpy(), batch.num_rows)
    keyed = batch.set_column(batch.schema.get_field_index("label"), "label", pa.array(labels))
    keyed = keyed.append_column(_CLASS_KEY, pa.array(content_digests(_image_contents(batch), seed)))
    return keyed.filter(pa.array(labels >= 0))


def _within_thresholds(batch: pa.Table, thresholds: dict[int, int]) -> pa.Table:
    """The rows of ``batch`` whose ``_CLASS_KEY`` is at most their class's threshold, without that column."""
    labels = batch.column("label").to_numpy()
    keys = batch.column(_CLASS_KEY).to_numpy()
    limits = np.array([thresholds.get(int(label), 0) for label in labels], dtype=np.uint64)
    keep = np.isin(labels, list(thresholds)) & (keys <= limits)
    return batch.filter(pa.array(keep)).drop_columns([_CLASS_KEY])


def _cap_per_class(ds: ray.data.Dataset, k: int, seed: int) -> ray.data.Dataset:
    """At most ``k`` rows of each label >= 0 (see ``CorpusConfig.per_class``), in source order.

    Only each row's label and 64-bit key reach the driver (16 bytes a row), which keeps the k smallest keys
    of each class as a threshold; the rows are then filtered in place. No shuffle: it also runs inside a Tune
    trial's placement group, where Ray Data's shuffle tasks cannot be scheduled.
    """
    keyed = ds.map_batches(_with_class_key, fn_kwargs={"seed": seed}, batch_format="pyarrow")
    labels, keys = [], []
    for batch in keyed.select_columns(["label", _CLASS_KEY]).iter_batches(batch_format="numpy"):
        labels.append(batch["label"])
        keys.append(batch[_CLASS_KEY])
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    thresholds = {
        int(label): int(np.sort(all_keys[all_labels == label])[:k][-1]) for label in np.unique(all_labels)
    }
    return keyed.map_batches(_within_thresholds, fn_kwargs={"thresholds": thresholds}, batch_format="pyarrow")


# ---------------------------------------------------------------------------------------------------- readers


def load_corpus(
    corpus: Corpus, *, image_size: int, channels: int, seed: int = 0, cache_dir: str | None = None
) -> ray.data.Dataset:
    """A lazy Ray Dataset with columns ``image`` (uint8 ``[channels, image_size, image_size]``),
    ``label`` (int64, -1 when unknown) and ``corrupt`` (bool; corrupt images are zeros).

    Builtin sets are first materialised as parquet shards in the cache (``seed`` picks the rendering of
    generated sets) and then read like any parquet corpus. CIFAR, IDX, numpy and ImageNet pickle sources are
    read into the driver's memory, the others are read lazily by Ray Data. Before decoding, the rows are hash
    split (``split_fractions``), then capped per class (``per_class``; see ``CorpusConfig``), and
    ``num_images`` caps what is left.

    A union (a list of corpora) is each member read so, with its own keys, then joined in member order by
    Ray Data's ``union``: every row of every member, with that member's labels. A row's hash-split part
    depends only on its content, so the same ``split_fractions`` and ``split_seed`` on every member split
    the union as a whole. Errors name the member by its index (``1.source: path not found: ...``), and
    labelled members must number their classes alike (``class_names_of``).
    """
    if image_size <= 0:
        raise ValueError(f"image_size: must be positive, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels: must be 1 or 3, got {channels}")
    options = {"image_size": image_size, "channels": channels, "seed": seed, "cache_dir": cache_dir}
    if isinstance(corpus, CorpusConfig):
        return _load_member(corpus, **options)
    class_names_of(corpus)  # refuses members whose labels would name different classes
    members = []
    for index, member in enumerate(corpus):
        with _member_errors(index):
            members.append(_load_member(member, **options))
    return members[0].union(*members[1:]) if len(members) > 1 else members[0]


@contextmanager
def _member_errors(index: int) -> Iterator[None]:
    """Re-raise a union member's ``FileNotFoundError`` or ``ValueError`` naming it (``1.source: ...``)."""
    try:
        yield
    except FileNotFoundError as error:
        raise FileNotFoundError(_in_member(index, error)) from None
    except ValueError as error:
        raise ValueError(_in_member(index, error)) from None


def _in_member(index: int, error: Exception) -> str:
    message = str(error)
    return f"{index}.{message}" if _KEYED_MESSAGE.match(message) else f"{index}: {message}"


def _load_member(
    cfg: CorpusConfig, *, image_size: int, channels: int, seed: int, cache_dir: str | None
) -> ray.data.Dataset:
    fmt = resolve_format(cfg)
    rendered = fmt == "builtin" and cfg.source in GENERATED_SOURCES
    # Without a hash split or per-class cap the limit is cheapest at the source (a smaller builtin cache,
    # fewer arrays sent from the driver); with one it must wait until after it. A generated set renders
    # num_images.
    selects = _selects_rows(cfg)
    source_limit = cfg.num_images if rendered or not selects else None
    limit = None if rendered else cfg.num_images
    if fmt == "builtin":
        out = materialize_builtin(cfg.source, cfg.source_split, source_limit, seed, cache_dir)
        ds = _read_parquet(
            cfg.model_copy(update={"image_column": "image", "label_column": "label"}), str(out)
        )
    elif fmt == "parquet":
        ds = _read_parquet(cfg, cfg.source)
    elif fmt == "image_folder":
        ds = _read_image_folder(cfg)
    else:
        images, labels = {
            "cifar": _cifar_arrays,
            "idx": _idx_arrays,
            "numpy": _numpy_arrays,
            "imagenet_pickle": _imagenet_arrays,
        }[fmt](cfg)
        if len(images) == 0:
            raise ValueError(f"source: {cfg.source} holds no images")
        kept_labels = labels[:source_limit] if labels is not None and cfg.labelled else None
        ds = _from_arrays(images[:source_limit], kept_labels)
    # Parquet and array sources may lack labels (known from their schema without reading); folders never do.
    if cfg.per_class is not None and fmt != "image_folder" and "label" not in ds.columns():
        raise ValueError(f"per_class: {cfg.source} has no labels")
    if cfg.split_fractions is not None:
        ds = ds.map_batches(
            _keep_split_part,
            fn_kwargs={
                "fractions": cfg.split_fractions,
                "seed": cfg.split_seed,
                "part": SPLIT_PARTS.index(cfg.split),
            },
            batch_format="pyarrow",
        )
    if cfg.per_class is not None:
        ds = _cap_per_class(ds, cfg.per_class, cfg.per_class_seed)
    if limit is not None:
        ds = ds.limit(limit)
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"image_size": image_size, "channels": channels},
        batch_format="numpy",
        batch_size=DECODE_BATCH_SIZE,
        udf_modifying_row_count=False,
    )


def _selects_rows(cfg: CorpusConfig) -> bool:
    """Whether a hash split or per-class cap picks the rows, so that ``num_images`` can only cap after it."""
    return cfg.split_fractions is not None or cfg.per_class is not None


def corpus_summary(ds: ray.data.Dataset) -> dict[str, Any]:
    """Counts over a decoded corpus: ``rows``, ``corrupt``, ``labelled`` (intact rows with label >= 0) and
    ``label_counts`` (label -> intact rows)."""
    rows = corrupt = 0
    counts: Counter[int] = Counter()
    for batch in ds.select_columns(["label", "corrupt"]).iter_batches(batch_format="numpy", batch_size=4096):
        bad = batch["corrupt"].astype(bool)
        rows += len(bad)
        corrupt += int(bad.sum())
        values, n = np.unique(batch["label"][~bad], return_counts=True)
        counts.update(dict(zip(values.tolist(), n.tolist(), strict=True)))
    labelled = sum(n for label, n in counts.items() if label >= 0)
    return {
        "rows": rows,
        "corrupt": corrupt,
        "labelled": labelled,
        "label_counts": dict(sorted(counts.items())),
    }


def parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    if is_glob(path):
        parent, pattern = posixpath.split(path)
        regex = re.compile(fnmatch.translate(pattern))
        files = [e.path for e in _listdir(fs, parent) if e.is_file and regex.fullmatch(e.base_name)]
    elif fs.get_file_info(path).type == pafs.FileType.File:
        files = [path]
    else:
        files = [
            e.path
            for e in _listdir(fs, path, recursive=True)
            if e.is_file and e.base_name.lower().endswith(".parquet") and _is_visible(e)
        ]
    if not files:
        raise FileNotFoundError(f"source: no parquet files found at {path}")
    return files


def _read_parquet(cfg: CorpusConfig, source: str) -> ray.data.Dataset:
    """Parquet shards with an encoded-image column and an optional int label column."""
    fs, path = filesystem_and_path(source)
    files = parquet_files(fs, path)
    with fs.open_input_file(files[0]) as f:
        names = pq.read_schema(f).names
    if cfg.image_column not in names:
        raise ValueError(f"image_column: column {cfg.image_column!r} not in the parquet schema {names}")
    label = cfg.label_column if cfg.labelled else None
    if label is not None and label not in names:
        if cfg.label_column != CorpusConfig.model_fields["label_column"].default:
            raise ValueError(f"label_column: column {label!r} not in the parquet schema {names}")
        label = None  # the default label column is optional
    columns = [cfg.image_column] + ([label] if label else [])
    ds = ray.data.read_parquet(files, filesystem=fs, columns=columns)
    rename = {cfg.image_column: "image"}
    if label:
        rename[label] = "label"
    rename = {k: v for k, v in rename.items() if k != v}
    return ds.rename_columns(rename) if rename else ds


def _class_dirs(fs: pafs.FileSystem, path: str) -> list[str]:
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    dirs = [e for e in _listdir(fs, path) if e.type == pafs.FileType.Directory]
    return [e.base_name for e in dirs if not e.base_name.startswith(".")]


def _folder_labels(batch: dict[str, np.ndarray], root: str, classes: list[str]) -> dict[str, np.ndarray]:
    """Label each file by its first directory below ``root`` (-1 outside a class folder)."""
    index = {name: i for i, name in enumerate(classes)}
    prefix = root.rstrip("/") + "/"
    labels = np.full(len(batch["path"]), -1, dtype=np.int64)
    for i, p in enumerate(batch["path"]):
        rel = p[len(prefix) :] if p.startswith(prefix) else p
        head, sep, _ = rel.partition("/")
        if sep:
            labels[i] = index.get(head, -1)
    return {"image": batch["bytes"], "label": labels}


def _read_image_folder(cfg: CorpusConfig) -> ray.data.Dataset:
    """Image files (read as raw bytes, so corrupt files reach the decoder); class subfolders give labels."""
    fs, path = filesystem_and_path(cfg.source)
    classes = _class_dirs(fs, path) if cfg.labelled else []
    ds = ray.data.read_binary_files(
        path, filesystem=fs, include_paths=True, file_extensions=list(IMAGE_EXTENSIONS)
    )
    return ds.map_batches(
        _folder_labels,
        fn_kwargs={"root": path, "classes": classes},
        batch_format="numpy",
        udf_modifying_row_count=False,
    )


def _from_arrays(images: np.ndarray, labels: np.ndarray | None) -> ray.data.Dataset:
    """A dataset of raw uint8 pixel rows (``[H,W]`` or ``[H,W,C]``) and optional labels, in several blocks."""
    tables = []
    for start in range(0, len(images), _BLOCK_ROWS):
        cols = {
            "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images[start : start + _BLOCK_ROWS]))
        }
        if labels is not None:
            cols["label"] = pa.array(np.asarray(labels[start : start + _BLOCK_ROWS], dtype=np.int64))
        tables.append(pa.table(cols))
    return ray.data.from_arrow(tables)


def _to_uint8_images(arr: np.ndarray, what: str) -> np.ndarray:
    """Images as uint8 ``[N,H,W]`` or ``[N,H,W,C]`` (C=3/4); accepts NCHW, floats in [0,1] and bools."""
    if arr.ndim == 4 and arr.shape[-1] not in (1, 3, 4) and arr.shape[1] in (1, 3, 4):
        arr = arr.transpose(0, 2, 3, 1)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (3, 4):
        raise ValueError(f"source: {what} must hold images [N,H,W], [N,H,W,C] or [N,C,H,W], got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind == "f" and arr.size and np.nanmax(arr) <= 1.0:
        arr = arr * 255.0
    return np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path, compression=None) as f:
        data = f.read()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


# --- CIFAR --------------------------------------------------------------------------------------------------


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR and ImageNet batches: only numpy arrays and scalars and plain containers, never
    arbitrary callables."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),  # how numpy writes arrays at pickle protocol 5
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol <= 2
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a batch of images")
        return super().find_class(module, name)


def _cifar_dir_kind(names: set[str]) -> str | None:
    if any(_CIFAR10_TRAIN.fullmatch(n) for n in names) or "test_batch" in names:
        return "cifar10"
    return "cifar100" if {"train", "test", "meta"} <= names else None


def _cifar_wanted(name: str, split: str) -> bool:
    if split == "train":
        return bool(_CIFAR10_TRAIN.fullmatch(name)) or name == "train"
    return name in ("test_batch", "test")


def _cifar_batch(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _NumpyUnpickler(io.BytesIO(data), encoding="bytes").load()
    labels = batch.get(b"labels", batch.get(b"fine_labels"))
    if b"data" not in batch or labels is None:
        raise ValueError("source: CIFAR batch lacks b'data' and b'labels'/b'fine_labels'")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(labels, dtype=np.int64)


def _cifar_order(name: str) -> int:
    match = _CIFAR10_TRAIN.fullmatch(name)
    return int(match.group(1)) if match else 0


def _cifar_arrays(cfg: CorpusConfig) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10/100 python batches from a ``.tar.gz`` archive or an extracted directory (HWC uint8)."""
    fs, path = filesystem_and_path(cfg.source)
    split = cfg.source_split or "train"
    found: dict[str, bytes] = {}
    if fs.get_file_info(path).type == pafs.FileType.File:
        with (
            fs.open_input_stream(path, compression=None) as raw,
            tarfile.open(fileobj=raw, mode="r|*") as tar,
        ):
            for member in tar:
                name = posixpath.basename(member.name)
                if member.isfile() and _cifar_wanted(name, split):
                    found[name] = tar.extractfile(member).read()
    else:
        names = {e.base_name for e in _listdir(fs, path)}
        if not _cifar_dir_kind(names):
            sub = [d for d in _CIFAR_DIRS if d in names]
            if not sub:
                raise ValueError(f"source: {cfg.source} holds no CIFAR python batches")
            path = posixpath.join(path, sub[0])
            names = {e.base_name for e in _listdir(fs, path)}
        for name in names:
            if _cifar_wanted(name, split):
                found[name] = _read_bytes(fs, posixpath.join(path, name))
    if not found:
        raise ValueError(f"source: no CIFAR {split!r} batches found in {cfg.source}")
    parts = [_cifar_batch(found[n]) for n in sorted(found, key=_cifar_order)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --- downsampled ImageNet / KD3 pickles ---------------------------------------------------------------------


def _imagenet_images(data: object, path: str) -> np.ndarray:
    """Channel-planar rows (R, G then B plane of S×S, like CIFAR) as ``[N,S,S,3]``, S from the row length."""
    rows = np.asarray(data)
    width = math.prod(rows.shape[1:]) if rows.ndim >= 2 else 0
    side = math.isqrt(width // 3)
    if side == 0 or width != 3 * side * side:
        raise ValueError(
            f"source: {path}: 'data' of shape {rows.shape} is not N×(3·S·S) S×S RGB images "
            "(3072 values a row for 32×32, 12288 for 64×64)"
        )
    return _to_uint8_images(rows.reshape(-1, 3, side, side).transpose(0, 2, 3, 1), path)


def _imagenet_file(data: bytes, path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One downsampled ImageNet batch (pickle or ``.npz``; labels 1..1000 made 0-based) or KD3 pickle."""
    if data[:4] == b"PK\x03\x04":  # a zip, i.e. an .npz
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            content = {key: npz[key] for key in npz.files}
    else:
        content = _NumpyUnpickler(io.BytesIO(data), encoding="latin1").load()
    if not isinstance(content, dict):
        raise ValueError(f"source: {path} holds a {type(content).__name__}, not a dict of arrays")
    if "data" in content and "labels" in content:
        images, labels, offset = _imagenet_images(content["data"], path), content["labels"], 1
    else:
        key = "test" if split == "val" and "val" not in content else split
        part = content.get(key)
        if not isinstance(part, dict) or not {"data", "target"} <= part.keys():
            raise ValueError(
                f"source: {path} is neither a downsampled ImageNet batch {{'data', 'labels'}} nor a KD3 "
                f"pickle {{{key!r}: {{'data', 'target'}}}}; it has keys {sorted(map(str, content))}"
            )
        images, labels, offset = _imagenet_images(part["data"], path), part["target"], 0
    labels = np.asarray(labels).astype(np.int64).reshape(-1) - offset
    if len(labels) != len(images):
        raise ValueError(f"source: {path} has {len(labels)} labels for {len(images)} images")
    return images, labels


def _imagenet_batch_files(fs: pafs.FileSystem, path: str, split: str) -> list[str]:
    """The ``train_data_batch_<n>`` files in numeric order, or ``val_data``, each pickled or ``.npz``."""
    batches: dict[int, str] = {}
    # Sorted by name, so a batch's .npz overrides its pickle when a directory holds both.
    for entry in _listdir(fs, path):
        match = _IMAGENET_BATCH.fullmatch(entry.base_name)
        if entry.is_file and match and (match.group(1) is not None) == (split == "train"):
            batches[int(match.group(1) or 0)] = entry.path
    if not batches:
        wanted = "train_data_batch_<n>" if split == "train" else "val_data"
        raise ValueError(f"source: no {wanted}[.npz] files for split {split!r} in {path}")
    return [batches[n] for n in sorted(batches)]


def _imagenet_arrays(cfg: CorpusConfig) -> tuple[np.ndarray, np.ndarray]:
    """Downsampled ImageNet (Chrabaszcz et al. 2017: ImageNet-16/32/64) or KD3's ImageNet-32 pickle (HWC).

    A directory is read by ``split``: "train" concatenates ``train_data_batch_1`` … ``_10`` in numeric order,
    "val" reads ``val_data``; their 1-based labels become 0-based. A single file is read whole: such a batch,
    or a KD3 pickle ``{'train': {'data', 'target'}, 'val' or 'test': ...}`` of which ``split`` picks the part
    ("val" falls back to 'test'), its targets kept as given (KD3 ignores them; usually 0-based). S×S comes
    from the row length. Without a hash split or per-class cap, batches past ``num_images`` rows are not read.
    """
    fs, path = filesystem_and_path(cfg.source)
    split = cfg.source_split or "train"
    if fs.get_file_info(path).type == pafs.FileType.File:
        return _imagenet_file(_read_bytes(fs, path), path, split)
    limit = None if _selects_rows(cfg) else cfg.num_images
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for file in _imagenet_batch_files(fs, path, split):
        parts.append(_imagenet_file(_read_bytes(fs, file), file, split))
        if limit is not None and sum(len(images) for images, _ in parts) >= limit:
            break
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --- IDX (MNIST) --------------------------------------------------------------------------------------------


def _parse_idx(data: bytes, path: str) -> np.ndarray:
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"source: {path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    count = int(np.prod(dims))
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=4 + 4 * ndim).reshape(dims)


def _existing(fs: pafs.FileSystem, candidates: list[str]) -> str | None:
    for candidate in candidates:
        if fs.get_file_info(candidate).type == pafs.FileType.File:
            return candidate
    return None


def _idx_arrays(cfg: CorpusConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """MNIST-style IDX images (gzip or not) and the paired labels file (``images``->``labels``, idx3->idx1).

    The source is the images file, or a directory with the standard ``train-``/``t10k-`` names (by split).
    Without a labels file the images are unlabelled.
    """
    fs, path = filesystem_and_path(cfg.source)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        stem = "train" if (cfg.source_split or "train") == "train" else "t10k"
        names = [f"{stem}-images-idx3-ubyte", f"{stem}-images.idx3-ubyte"]
        images_path = _existing(fs, [posixpath.join(path, n + gz) for n in names for gz in ("", ".gz")])
        if images_path is None:
            raise FileNotFoundError(f"source: no {stem}-images-idx3-ubyte[.gz] in {cfg.source}")
        path = images_path
    images = _parse_idx(_read_bytes(fs, path), path)
    if images.ndim != 3:
        raise ValueError(f"source: {path} holds a {images.ndim}-d array, expected [N,H,W] images")
    parent, name = posixpath.split(path)
    label_name = re.sub(r"\.gz$", "", name.replace("images", "labels").replace("idx3", "idx1"))
    labels_path = _existing(fs, [posixpath.join(parent, label_name + gz) for gz in ("", ".gz")])
    if labels_path is None:
        return images, None
    labels = _parse_idx(_read_bytes(fs, labels_path), labels_path).astype(np.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"source: {labels_path} has {labels.shape} labels for {len(images)} images")
    return images, labels


# --- numpy --------------------------------------------------------------------------------------------------


def _numpy_arrays(cfg: CorpusConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """``.npy`` (images only) or ``.npz`` with ``images``/``x`` and optional ``labels``/``y`` arrays."""
    fs, path = filesystem_and_path(cfg.source)
    loaded = np.load(io.BytesIO(_read_bytes(fs, path)), allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        return _to_uint8_images(loaded, path), None
    keys = {k.lower(): k for k in loaded.files}
    image_key = keys.get("images", keys.get("x"))
    if image_key is None:
        raise ValueError(f"source: {path} has no 'images' or 'x' array (arrays: {loaded.files})")
    images = _to_uint8_images(loaded[image_key], path)
    label_key = keys.get("labels", keys.get("y"))
    labels = None if label_key is None else np.asarray(loaded[label_key]).astype(np.int64).reshape(-1)
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"source: {path} has {len(labels)} labels for {len(images)} images")
    return images, labels
