"""Decoded corpora kept on local disk between launches: a warm start hands Ray Data pixels, not image files.

A materialised corpus (``data.materialize``) is read, decoded and repartitioned into Ray's object store at
every launch; for the demo's 20,000 letters that is a third of its start-up (docs/benchmarks.md). When the
driver counts a freshly materialised corpus's rows and corrupt images, it also writes its decoded pixels,
labels and corrupt flags to ``<cache>/decoded/<key>/`` (when they take at most ``data.decoded_cache_mb``),
and a later launch with the same corpus puts those arrays into the object store as blocks, from the
driver: nothing is read or decoded again.

The key covers every setting of the corpus (each member of a union), the image size and channels, the
seed where a generated builtin set is rendered from it, the decoder's and Pillow's versions and, for a
local source, the path, size and modification time of every file and directory under it (following
symbolic links; for a single file, of everything in its directory, such as an IDX images file's labels
file): an added, removed or rewritten file means a new key. A file rewritten with the same size and
modification time (``cp -p``, ``rsync -t``) is not seen. Remote sources (``s3://``, ``gs://``) are never
cached, nor is a corpus that cannot be listed (its read then fails with the usual message), nor one found
over the limit before (a marker keyed by its settings alone spares the next launches the listing).
Writing the cache is best effort: a full or read-only disk costs a warning, not the run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import stat
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL

from rayoodkd.data.builtin import FORMAT_VERSION, GENERATED_SOURCES, cache_root
from rayoodkd.data.config import Corpus, corpus_members, is_glob
from rayoodkd.storage import is_remote

# Bump when decode_batch's output for the same input changes.
DECODED_VERSION = 1
COLUMNS = ("image", "label", "corrupt")
_STALE_TMP_SECONDS = 24 * 3600


def settings_key(corpus: Corpus, *, image_size: int, channels: int, seed: int, limit_mb: int) -> str:
    """A key of the corpus's settings alone (no file listing): what the over-limit marker is named by."""
    members = [_settings(member, seed) for member in corpus_members(corpus)]
    return _digest({"members": members, "size": [image_size, channels], "limit_mb": limit_mb})


def cache_key(corpus: Corpus, *, image_size: int, channels: int, seed: int) -> str | None:
    """The decoded cache's key for ``corpus`` read at this size, or None when it cannot be cached."""
    members = []
    for member in corpus_members(corpus):
        stamps = None
        if not member.is_builtin:
            stamps = _file_stamps(member.source)
            if stamps is None:
                return None
        members.append({**_settings(member, seed), "files": stamps})
    return _digest({"members": members, "size": [image_size, channels]})


def _settings(member: Any, seed: int) -> dict[str, Any]:
    generated = member.is_builtin and member.source in GENERATED_SOURCES
    return {
        "corpus": member.model_dump(mode="json"),
        "seed": seed if generated else None,
        "builtin_format": FORMAT_VERSION if member.is_builtin else None,
        "decoder": [DECODED_VERSION, PIL.__version__],
    }


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _file_stamps(source: str) -> list[tuple[str, int, int]] | None:
    """``(path, size, mtime_ns)`` of every file and directory a local source may be read from; None for a
    remote source, or one that is missing or cannot be listed."""
    if is_remote(source):
        return None
    path = os.path.abspath(os.path.expanduser(source.removeprefix("file://")))
    try:
        if is_glob(path) or os.path.isfile(path):
            # A glob or a single file: its directory's entries (an IDX images file's labels file with them).
            parent = os.path.dirname(path)
            entries = [parent, *(os.path.join(parent, name) for name in os.listdir(parent))]
        elif os.path.isdir(path):
            entries = [path]
            for directory, subdirectories, names in os.walk(path, followlinks=True, onerror=_raise):
                entries += [os.path.join(directory, name) for name in (*subdirectories, *names)]
        else:
            return None
        return [(entry, *_stat(entry)) for entry in sorted(entries)]
    except OSError:
        return None


def _raise(error: OSError) -> None:
    raise error


def _stat(path: str) -> tuple[int, int]:
    """Size (0 for a directory) and modification time, from one ``stat`` call."""
    info = os.stat(path)
    return (0 if stat.S_ISDIR(info.st_mode) else info.st_size), info.st_mtime_ns


@dataclass(frozen=True)
class Slot:
    """Where one corpus's decoded arrays are kept, or would be."""

    path: Path
    over_limit_marker: Path
    image_shape: tuple[int, int, int]
    limit_mb: int

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.image_shape)) + 8 + 1  # uint8 pixels, int64 label, bool corrupt flag


def slot(
    corpus: Corpus, *, image_size: int, channels: int, seed: int, cache_dir: str | None, limit_mb: int
) -> Slot | None:
    """The cache slot of ``corpus`` read at this size; None when the cache is off or cannot hold it."""
    if limit_mb <= 0:
        return None
    root = cache_root(cache_dir) / "decoded"
    settings = settings_key(corpus, image_size=image_size, channels=channels, seed=seed, limit_mb=limit_mb)
    marker = root / f"over-limit-{settings}"
    if marker.exists():
        return None
    key = cache_key(corpus, image_size=image_size, channels=channels, seed=seed)
    if key is None:
        return None
    return Slot(root / key, marker, (channels, image_size, image_size), limit_mb)


def read_cached(slot: Slot | None, blocks: int) -> tuple[Any, int, int] | None:
    """The cached corpus as a Ray dataset of ``blocks`` blocks put into the object store by this process,
    its rows and its corrupt rows; None when nothing is cached in ``slot``."""
    import ray
    import ray.data
    from ray.data.block import BlockAccessor

    if slot is None or not slot.path.is_dir():
        return None
    try:
        arrays = {name: np.load(slot.path / f"{name}.npy", mmap_mode="r") for name in COLUMNS}
    except (FileNotFoundError, ValueError, EOFError):  # damaged by hand: decode again, publish over it
        shutil.rmtree(slot.path, ignore_errors=True)
        return None
    rows = len(arrays["corrupt"])
    bounds = np.linspace(0, rows, min(blocks, rows) + 1).astype(int)
    refs = [
        ray.put(BlockAccessor.batch_to_block({name: np.array(a[start:stop]) for name, a in arrays.items()}))
        for start, stop in itertools.pairwise(bounds)
    ]
    return ray.data.from_arrow_refs(refs), rows, int(np.count_nonzero(arrays["corrupt"]))


def count_and_keep(dataset: Any, slot: Slot | None = None) -> tuple[int, int]:
    """How many rows a decoded ``dataset`` has and how many are corrupt; with a ``slot``, also write its
    columns there, in the dataset's block order, when they fit the slot's limit (else mark the corpus's
    settings as over the limit)."""
    if slot is not None:
        rows = dataset.count()
        if rows and rows * slot.row_bytes > slot.limit_mb * 2**20:
            _touch(slot.over_limit_marker)
        elif rows:
            try:
                return rows, _write(dataset, slot, rows)
            except OSError as error:
                warnings.warn(f"decoded cache: could not write {slot.path}: {error}", stacklevel=2)
    rows = corrupt = 0
    for batch in dataset.select_columns(["corrupt"]).iter_batches(batch_size=None, batch_format="numpy"):
        rows += len(batch["corrupt"])
        corrupt += int(np.count_nonzero(batch["corrupt"]))
    return rows, corrupt


def _write(dataset: Any, slot: Slot, rows: int) -> int:
    """Write ``dataset``'s columns to ``slot`` through memory maps (never more than a block in memory),
    publish the directory by a rename (concurrent launches are safe); return the corrupt rows."""
    root = slot.path.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    tmp = root / f".tmp-{slot.path.name}-{uuid.uuid4().hex}"
    shapes = {"image": (rows, *slot.image_shape), "label": (rows,), "corrupt": (rows,)}
    dtypes = {"image": np.uint8, "label": np.int64, "corrupt": np.bool_}
    try:
        tmp.mkdir()
        out = {
            name: np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", dtypes[name], shapes[name])
            for name in COLUMNS
        }
        start = 0
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            stop = start + len(batch["corrupt"])
            for name in COLUMNS:
                out[name][start:stop] = batch[name]
            start = stop
        if start != rows:
            raise OSError(f"the dataset yielded {start} rows, not the {rows} it counted")
        corrupt = int(np.count_nonzero(out["corrupt"]))
        for array in out.values():
            array.flush()
        del out
        try:
            tmp.rename(slot.path)
        except OSError:
            if not slot.path.is_dir():  # another launch published it first otherwise
                raise
        return corrupt
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(root: Path) -> None:
    """Temporary directories of launches killed while writing, a day old or more."""
    for stale in root.glob(".tmp-*"):
        try:
            if time.time() - stale.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            continue


def _touch(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as error:
        warnings.warn(f"decoded cache: could not write {path}: {error}", stacklevel=3)


def cache_usage(cache_dir: str | None = None) -> dict[str, tuple[int, int]]:
    """``{part: (entries, bytes)}`` of each part of the cache (``builtin``, ``decoded``, ``teachers``)."""
    root = cache_root(cache_dir)
    usage = {}
    for part in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        entries = [e for e in part.iterdir() if not e.name.startswith((".", "over-limit-"))]
        size = sum(_size(f) for f in part.rglob("*"))
        usage[part.name] = (len(entries), size)
    return usage


def clear_decoded(cache_dir: str | None = None) -> tuple[int, int]:
    """Delete every decoded corpus (and over-limit marker) in the cache; return (entries, bytes) freed."""
    entries, size = cache_usage(cache_dir).get("decoded", (0, 0))
    shutil.rmtree(cache_root(cache_dir) / "decoded", ignore_errors=True)
    return entries, size


def _size(path: Path) -> int:
    """A file's size; 0 for a directory, or a file a concurrent launch renamed or removed meanwhile."""
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0
