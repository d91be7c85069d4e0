"""Where runs live: a local directory, a ``file://`` URI, or ``s3://`` / ``gs://`` storage via pyarrow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` paths."""
    return "://" in path


def is_remote(path: str) -> bool:
    """True for URIs other than ``file://`` (s3://, gs://, ...): storage that is not a local directory."""
    return is_uri(path) and not path.startswith("file://")


def local_path(path: str) -> Path:
    """An absolute local path for a plain path or a ``file://`` URI."""
    if path.startswith("file://"):
        return Path(urlparse(path).path).resolve()
    if is_uri(path):
        raise ValueError(f"storage_path: {path!r} is not a local path or file:// URI")
    return Path(path).expanduser().resolve()


def ray_storage_path(path: str) -> str:
    """What Ray Train's ``RunConfig(storage_path=...)`` gets: remote URIs as is, local paths absolute."""
    return path if is_remote(path) else str(local_path(path))


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for any storage path or URI."""
    if is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(local_path(path))


def read_json(path: str) -> dict[str, Any] | None:
    """A JSON file from any storage, or ``None`` if it does not exist."""
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(inner) as stream:
        return json.loads(stream.read().decode())


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write a JSON file to any storage, creating parent directories."""
    fs, inner = filesystem(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as stream:
        stream.write(json.dumps(data, indent=2).encode())
