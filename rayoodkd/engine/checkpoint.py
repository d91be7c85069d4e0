"""Self-describing, exactly-resumable, verifiable checkpoints of a whole run.

A checkpoint is a directory ``step_NNNNNNN`` with two files. ``state.pt`` holds every player (unwrapped, so
it loads at any world size), optimizer, scheduler, GradScaler, each rank's method state, RNG and stream
positions, the step, the resolved config, library versions and the teacher's content hash; it is read with
``torch.load(weights_only=True)``: nothing in it is pickled code. ``manifest.json`` is written *after* it and
holds its SHA-256 and size, so a checkpoint cut short by a crash, a kill during upload or a full disk is
recognised as such, and resuming falls back to the newest intact one (:func:`newest_intact`).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from rayoodkd.config import ConfigError
from rayoodkd.methods.base import Stage
from rayoodkd.storage import filesystem

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT = "rayoodkd.run/2"
LEGACY_FORMAT = "rayoodkd.run/1"  # written before manifests: accepted without one when it loads
CHECKPOINT_DIR = re.compile(r"^step_(\d+)(-[0-9a-f]+)?$")


class CorruptCheckpoint(ValueError):
    """A checkpoint that cannot be trusted: missing files, a hash mismatch, or an unreadable state."""


def checkpoint_dir_name(step: int) -> str:
    """The directory name of the checkpoint taken at ``step``."""
    return f"step_{step:07d}"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG a step can draw from on this rank."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_as_tuple(state["python"]))
    np.random.set_state(
        ("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0)
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def save_state(directory: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the format tag) as ``directory/state.pt``, then its manifest."""
    path = Path(directory) / STATE_FILE
    torch.save({"format": FORMAT, **payload}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = {
        "format": FORMAT,
        "step": int(payload["step"]),
        "sha256": digest,
        "bytes": path.stat().st_size,
    }
    (Path(directory) / MANIFEST_FILE).write_text(json.dumps(manifest))
    return path


def _read_file(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_file(path) as stream:
        return stream.read()


def load_state(directory: str | Path) -> dict[str, Any]:
    """Read and verify a run checkpoint written by :func:`save_state` (a local path or a storage URI).

    Raises :class:`CorruptCheckpoint` (saying what is wrong with which file) for a truncated or altered
    ``state.pt``, a missing manifest, or a state that does not load; ``FileNotFoundError`` if there is no
    ``state.pt`` at all. Checkpoints of the legacy format (before manifests) load without one.
    """
    fs, root = filesystem(str(directory))
    state_path, manifest_path = f"{root}/{STATE_FILE}", f"{root}/{MANIFEST_FILE}"
    if fs.get_file_info(state_path).type != pafs.FileType.File:
        raise FileNotFoundError(f"checkpoint {directory}: no {STATE_FILE} inside")
    manifest: dict[str, Any] | None = None
    if fs.get_file_info(manifest_path).type == pafs.FileType.File:
        try:
            manifest = json.loads(_read_file(fs, manifest_path))
            expected = str(manifest["sha256"])
        except (ValueError, KeyError) as error:
            raise CorruptCheckpoint(f"{directory}/{MANIFEST_FILE}: unreadable ({error})") from None
    data = _read_file(fs, state_path)
    if manifest is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CorruptCheckpoint(
            f"{directory}/{STATE_FILE}: content hash mismatch ({len(data)} bytes, "
            f"{manifest.get('bytes')} expected): truncated or altered"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # a verified but unloadable file is still only a skipped checkpoint
        raise CorruptCheckpoint(f"{directory}/{STATE_FILE}: does not load ({type(error).__name__})") from None
    found = state.get("format") if isinstance(state, dict) else None
    if found == FORMAT and manifest is None:
        raise CorruptCheckpoint(f"{directory}: no {MANIFEST_FILE} (the checkpoint was not finished)")
    if found not in (FORMAT, LEGACY_FORMAT):
        raise CorruptCheckpoint(f"{directory}/{STATE_FILE}: format {found!r}, expected {FORMAT!r}")
    return state


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from, and the newer ones that were skipped (with the reason)."""

    directory: str | None = None
    state: dict[str, Any] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def checkpoint_dirs(run_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``step_*`` directory under ``run_dir`` (any storage), newest first."""
    fs, root = filesystem(run_dir)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        match = CHECKPOINT_DIR.match(info.base_name)
        if info.type == pafs.FileType.Directory and match:
            found.append((int(match.group(1)), f"{run_dir.rstrip('/')}/{info.base_name}"))
    return sorted(found, reverse=True)  # a suffixed re-take of a step sorts before the plain name


def newest_intact(run_dir: str) -> ResumePoint:
    """The newest checkpoint under ``run_dir`` that verifies, loaded; newer broken ones are listed as skipped.

    This reads the storage itself rather than only what Ray Train registered, so a checkpoint whose upload
    finished just before a kill is still used, and one cut short is never used.
    """
    point = ResumePoint()
    for _, directory in checkpoint_dirs(run_dir):
        try:
            state = load_state(directory)
        except (CorruptCheckpoint, FileNotFoundError) as error:
            point.skipped.append((directory, str(error)))
            continue
        point.directory, point.state = directory, state
        return point
    return point


def state_dict_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of a model's weights (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class StageStart:
    """Where an ``init_from`` run starts: the checkpoint, its players as the earlier stage left them, the
    hash of the teacher they were trained with, and the source run's config."""

    directory: str
    players: dict[str, dict[str, torch.Tensor]]
    teacher_hash: str
    config: dict[str, Any]


def stage_start(source: str, stages: list[Stage], start: str, method: str) -> StageStart:
    """``init_from``: the checkpoint under ``source`` (a run directory, newest first, or one ``step_*``
    checkpoint) that ends the stage before ``start``, with the players as that stage left them (its
    selected snapshot when it reloads its best).

    Raises :class:`~rayoodkd.config.ConfigError` naming ``init_from`` when there is no such checkpoint.
    """
    names = [stage.name for stage in stages]
    if start not in names[1:]:
        raise ConfigError(
            f"init_from.stage: {start!r} is not a later stage of {method!r}; allowed: {', '.join(names[1:])}"
            if len(names) > 1
            else f"init_from: method {method!r} has one stage; nothing to start from"
        )
    index = names.index(start)
    previous = stages[index - 1]
    name = source.rstrip("/").rsplit("/", 1)[-1]
    candidates = [source] if CHECKPOINT_DIR.match(name) else [d for _, d in checkpoint_dirs(source)]
    for directory in candidates:
        try:
            state = load_state(directory)
        except (CorruptCheckpoint, FileNotFoundError):
            continue
        trained_with = state["config"]["method"]
        if trained_with != method:
            raise ConfigError(f"init_from.checkpoint: {directory} is a {trained_with!r} run, not {method!r}")
        # Whether that run finished the stage by its own budget (older checkpoints: by this run's).
        done = state.get("stage_done")
        if done is None:
            done = previous.done(state["stage_step"], state["stage_epoch"])
        if state.get("stage", 0) == index - 1 and done:
            best = state.get("stage_best")
            players = best["players"] if previous.reload_best and best else state["players"]
            return StageStart(directory, players, state["teacher_hash"], state["config"])
    raise ConfigError(
        f"init_from.checkpoint: no intact checkpoint at the end of stage {previous.name!r} under {source} "
        f"(run the stages before {start!r} with stop_after={previous.name})"
    )
