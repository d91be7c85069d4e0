"""Self-describing, exactly-resumable checkpoints of a whole run.

One file, ``state.pt``, holds every player (unwrapped, so it loads at any world size), optimizer,
scheduler, GradScaler, the method's extra state, each rank's RNG and stream positions, the step, the
resolved config, library versions and the teacher's content hash. It is read with
``torch.load(weights_only=True)``: nothing in it is pickled code.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
FORMAT = "rayoodkd.run/1"


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
    """Write ``payload`` (plus the format tag) as ``directory/state.pt``."""
    path = Path(directory) / STATE_FILE
    torch.save({"format": FORMAT, **payload}, path)
    return path


def load_state(directory: str | Path) -> dict[str, Any]:
    """Read a run checkpoint written by :func:`save_state` (weights only)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {directory}: no {STATE_FILE} inside")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: format {state.get('format')!r}, expected {FORMAT!r}")
    return state


def state_dict_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of a model's weights (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
