"""Teacher checkpoints: write a self-describing file, read and verify it, load the frozen network.

A teacher checkpoint holds the architecture, class count, input size and channels, the normalisation the
teacher was trained with, its accuracy, the recipe, and a content hash of its weights; it is read with
``torch.load(weights_only=True)``, so nothing in it can run code. The engine loads teachers through this
module; ``python -m rayoodkd.teacher`` (the CLI) writes them.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rayoodkd.engine.checkpoint import state_dict_hash
from rayoodkd.errors import first_line, one_line
from rayoodkd.models import build_classifier

FORMAT = "rayoodkd.teacher/1"
IMPORT_HINT = (
    "to use weights from another project, import them once: python -m rayoodkd.teacher import "
    "--weights FILE --out teacher.pt arch=NAME|torchvision:NAME|timm:NAME|module.path:Class "
    "num_classes=N image_size=PX channels=C mean=[..] std=[..] (docs/teachers.md)"
)


class TeacherFileError(ValueError):
    """A teacher file that is missing, unreadable or not a rayoodkd teacher (one line, names the key)."""


@dataclass
class TeacherInfo:
    """What a teacher checkpoint says about its network."""

    arch: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    accuracy: dict[str, float] = field(default_factory=dict)
    content_hash: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)


def save_teacher(path: str | Path, model: nn.Module, info: TeacherInfo) -> Path:
    """Write a teacher checkpoint (atomically: a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    info.content_hash = state_dict_hash(state_dict)
    payload = {"format": FORMAT, **asdict(info), "mean": list(info.mean), "std": list(info.std)}
    payload["state_dict"] = state_dict
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(payload, partial)
    partial.replace(path)
    return path


def _unreadable_reason(error: Exception) -> str:
    if isinstance(error, pickle.UnpicklingError) and "weights_only" in str(error):
        return "it pickles Python objects beyond tensors, which rayoodkd never unpickles"
    return one_line(error, limit=160)


def read_teacher(path: str | Path, key: str = "teacher.checkpoint") -> tuple[dict[str, Tensor], TeacherInfo]:
    """The weights and :class:`TeacherInfo` of a checkpoint, hash verified; any problem is one
    :class:`TeacherFileError` line naming ``key`` and the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TeacherFileError(f"{key}: no such file {str(path)!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file becomes one line, never a traceback
        raise TeacherFileError(
            f"{key}: {path} is not a readable rayoodkd teacher ({_unreadable_reason(error)}); {IMPORT_HINT}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        is_weights = isinstance(payload, dict) and any(isinstance(v, Tensor) for v in payload.values())
        what = "a plain state dict" if is_weights else f"a {type(payload).__name__}"
        raise TeacherFileError(f"{key}: {path} holds {what}, not a rayoodkd teacher; {IMPORT_HINT}")
    state_dict = payload.pop("state_dict")
    payload.pop("format")
    info = TeacherInfo(**{**payload, "mean": tuple(payload["mean"]), "std": tuple(payload["std"])})
    if state_dict_hash(state_dict) != info.content_hash:
        raise TeacherFileError(f"{key}: {path}: weights do not match their content hash (corrupt file?)")
    return state_dict, info


def load_teacher(
    path: str | Path, device: torch.device | str = "cpu", key: str = "teacher.checkpoint"
) -> tuple[nn.Module, TeacherInfo]:
    """A frozen teacher in eval mode on ``device``, and what its checkpoint says about it.

    The network is rebuilt from the recorded ``arch`` (and ``kwargs``); a ``timm:`` or ``module.path:Class``
    arch needs timm or that module importable here, in every Ray worker too (else one
    :class:`TeacherFileError` line naming ``key``, the file and the module)."""
    state_dict, info = read_teacher(path, key)
    try:
        model = build_classifier(
            info.arch,
            num_classes=info.num_classes,
            in_channels=info.channels,
            image_size=info.image_size,
            **info.kwargs,
        )
    except (ValueError, TypeError) as error:
        raise TeacherFileError(
            f"{key}: {path} records arch={info.arch}, which does not build here: {first_line(error, 400)}"
        ) from None
    model.load_state_dict(state_dict)
    return model.to(device).eval().requires_grad_(False), info
