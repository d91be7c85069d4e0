"""Batch image decoding for Ray Data ``map_batches``: bytes or raw pixels -> uint8 CHW pixels.

Decoded images stay uint8 in the object store and on their way to the workers (a quarter of float32's
bytes); a worker turns them into float32 in [0, 1] on its own device (``rayoodkd.augment.unit_images``).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

_ALPHA_MODES = {"LA": "L", "RGBA": "RGB", "La": "L", "RGBa": "RGB"}


def decode_batch(batch: dict[str, np.ndarray], image_size: int, channels: int) -> dict[str, np.ndarray]:
    """Decode the ``image`` column of a numpy batch into ``image``/``label``/``corrupt`` columns.

    Each ``image`` entry is encoded image bytes (any format Pillow reads) or a raw uint8 pixel array
    (``[H,W]`` or ``[H,W,C]``). Images become uint8 ``(channels, image_size, image_size)``, squashed (not
    cropped) with Pillow's antialiasing bilinear resize, and converted to L (channels=1) or RGB
    (channels=3). An image that cannot be decoded becomes zeros with ``corrupt=True``; this function never
    raises for bad image data. ``label`` is int64, copied from the batch's ``label`` column, -1 where it is
    missing or null.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels: must be 1 or 3, got {channels}")
    images = batch["image"]
    n = len(images)
    out = np.zeros((n, channels, image_size, image_size), dtype=np.uint8)
    corrupt = np.zeros(n, dtype=bool)
    for i in range(n):
        try:
            out[i] = _decode_one(images[i], image_size, channels)
        except Exception:  # any undecodable image is flagged, never raised
            corrupt[i] = True
    return {"image": out, "label": _labels(batch.get("label"), n), "corrupt": corrupt}


def _decode_one(item: object, size: int, channels: int) -> np.ndarray:
    target = "L" if channels == 1 else "RGB"
    if isinstance(item, bytes | bytearray | memoryview):
        img = Image.open(io.BytesIO(item))
        img.draft(target, (size, size))  # JPEG only: decode at a reduced scale, still >= size
        img.load()
    else:
        arr = np.asarray(item)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ValueError(f"raw pixels must be uint8 [H,W] or [H,W,C], got {arr.dtype} {arr.shape}")
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    img = to_mode(img, target)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def to_mode(img: Image.Image, target: str) -> Image.Image:
    """Convert any Pillow mode to ``target`` ("L" or "RGB").

    Palette images keep their transparency, alpha is composited onto black (the MNIST-style background),
    16/32-bit integer and float images are rescaled to 8 bits rather than clipped.
    """
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        base = img.convert(_ALPHA_MODES[img.mode])
        flat = Image.new(base.mode, img.size)
        flat.paste(base, mask=img.getchannel("A"))
        img = flat
    elif img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode.startswith("I") and arr.max(initial=0) > 255):
            arr = arr / 257.0
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return img if img.mode == target else img.convert(target)


def _labels(values: np.ndarray | None, n: int) -> np.ndarray:
    """int64 labels with -1 for a missing column or null entries."""
    if values is None:
        return np.full(n, -1, dtype=np.int64)
    arr = np.asarray(values)
    if arr.dtype == object:
        arr = np.array([np.nan if v is None else v for v in arr], dtype=np.float64)
    if arr.dtype.kind == "f":
        arr = np.where(np.isnan(arr), -1, arr)
    return arr.astype(np.int64)
