"""Decoded corpora kept on local disk between launches: a warm start hands Ray Data pixels, not image files.

A materialised corpus (``data.materialize``) is read, decoded and repartitioned into Ray's object store at
every launch; for the demo's 20,000 letters that is a third of its start-up (docs/benchmarks.md). While the
driver counts a freshly materialised corpus's rows and corrupt images, it also keeps its decoded pixels,
labels and corrupt flags under ``<cache>/decoded/<key>/`` (up to ``data.decoded_cache_mb``), and a later
launch with the same corpus puts those arrays into the object store as blocks: no read, decode or
repartition task runs.

The key covers every setting of the corpus (each member of a union), the image size and channels, the
seed where a generated builtin set is rendered from it, the decoder's version and, for files, the path,
size and modification time of every file under the source: a changed, added or removed file means a new
key. Remote sources (``s3://``, ``gs://``) are never cached, nor is a corpus with a source that cannot be
listed (its read then fails with the usual message).
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from rayoodkd.data.builtin import FORMAT_VERSION, GENERATED_SOURCES, cache_root
from rayoodkd.data.config import Corpus, corpus_members
from rayoodkd.storage import is_remote

# Bump when decode_batch's output for the same input changes.
DECODED_VERSION = 1
COLUMNS = ("image", "label", "corrupt")
_GLOB_CHARS = ("*", "?", "[")


def cache_key(corpus: Corpus, *, image_size: int, channels: int, seed: int) -> str | None:
    """The decoded cache's key for ``corpus`` read at this size, or None when it cannot be cached."""
    members = []
    for member in corpus_members(corpus):
        files = None if member.is_builtin else _file_stamps(member.source)
        if not member.is_builtin and files is None:
            return None
        generated = member.is_builtin and member.source in GENERATED_SOURCES
        members.append(
            {
                "corpus": member.model_dump(mode="json"),
                "files": files,
                "seed": seed if generated else None,
                "builtin_format": FORMAT_VERSION if member.is_builtin else None,
            }
        )
    payload = {
        "members": members,
        "image_size": image_size,
        "channels": channels,
        "version": DECODED_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _file_stamps(source: str) -> list[tuple[str, int, int]] | None:
    """``(path, size, mtime_ns)`` of every file of a local source; None for a remote or missing one."""
    if is_remote(source):
        return None
    path = os.path.abspath(os.path.expanduser(source.removeprefix("file://")))
    if any(char in path for char in _GLOB_CHARS):
        files = sorted(glob.glob(path))
    elif os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(directory, name) for directory, _, names in os.walk(path) for name in names
        )
    else:
        return None
    stamps = []
    for file in files:
        stat = os.stat(file)
        stamps.append((file, stat.st_size, stat.st_mtime_ns))
    return stamps


def _entry(key: str, cache_dir: str | None) -> Path:
    return cache_root(cache_dir) / "decoded" / key


def read_cached(key: str | None, cache_dir: str | None, blocks: int) -> tuple[Any, int, int] | None:
    """The cached corpus as a Ray dataset of ``blocks`` blocks in the object store, its rows and corrupt
    rows; None when nothing is cached under ``key``."""
    import ray
    import ray.data
    from ray.data.block import BlockAccessor

    entry = None if key is None else _entry(key, cache_dir)
    if entry is None or not entry.is_dir():
        return None
    try:
        arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in COLUMNS}
    except (OSError, ValueError):  # an entry damaged by hand: decode again (and publish over it)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    rows = len(arrays["corrupt"])
    bounds = np.linspace(0, rows, min(blocks, rows) + 1).astype(int)
    refs = [
        ray.put(BlockAccessor.batch_to_block({name: np.array(a[start:stop]) for name, a in arrays.items()}))
        for start, stop in itertools.pairwise(bounds)
    ]
    return ray.data.from_arrow_refs(refs), rows, int(np.count_nonzero(arrays["corrupt"]))


def count_and_keep(
    dataset: Any, key: str | None = None, cache_dir: str | None = None, limit_mb: int = 0
) -> tuple[int, int]:
    """How many rows ``dataset`` has and how many are corrupt; with a ``key``, also cache its decoded
    columns when they take at most ``limit_mb`` MB (a corpus over the limit is counted, not cached)."""
    keep = key is not None and limit_mb > 0
    columns = COLUMNS if keep else ("corrupt",)
    kept: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    rows = corrupt = kept_bytes = 0
    for batch in dataset.select_columns(list(columns)).iter_batches(batch_size=None, batch_format="numpy"):
        rows += len(batch["corrupt"])
        corrupt += int(np.count_nonzero(batch["corrupt"]))
        if keep:
            kept_bytes += sum(batch[name].nbytes for name in columns)
            keep = kept_bytes <= limit_mb * 2**20
            for name in columns:
                if keep:
                    kept[name].append(batch[name])
                else:
                    kept[name].clear()
    if keep and rows:
        _publish(_entry(key, cache_dir), {name: np.concatenate(parts) for name, parts in kept.items()})
    return rows, corrupt


def _publish(entry: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays to a temporary directory and rename it into place (concurrent launches are safe)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        try:
            tmp.rename(entry)
        except OSError:
            if not entry.is_dir():  # another launch published it first otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
