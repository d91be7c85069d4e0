"""Batch augmentation on tensors (the engine's data streams, the teacher recipe, and data-free methods).

Every mode works on a batch in [0, 1] with one random draw per image from the given generator, so a resumed
run augments exactly as an uninterrupted one:

- ``crop``: random translation by up to 1/8 of the size with zero padding (RandomCrop(size, padding=size/8));
- ``crop_flip``: ``crop`` and a horizontal flip with probability 1/2;
- ``resized_crop_flip``: torchvision's RandomResizedCrop (area 8–100 %, aspect 3/4–4/3, bilinear back to
  the input size) and a horizontal flip with probability 1/2 (KD3's web-image view).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import roi_align

from rayoodkd.config import AugmentMode as AugmentMode  # the modes below, re-exported

RESIZED_CROP_SCALE = (0.08, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)
_RESIZED_CROP_TRIES = 10


UNIT_SCALE = 1.0 / 255.0


def unit_images(images: Tensor) -> Tensor:
    """uint8 pixels (as decoded corpora hold them) as float32 in [0, 1]: ``x · float32(1/255)``, the
    arithmetic decoding into float32 used to do, so a float image is the same wherever it is converted.
    Other images become float32 unchanged in value. Convert after moving to the device: a quarter of the
    bytes travel."""
    if images.dtype != torch.uint8:
        return images.to(torch.float32)
    return images.to(torch.float32).mul_(UNIT_SCALE)


def _uniform(n: int, generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def _flip(images: Tensor, generator: torch.Generator) -> Tensor:
    flip = (_uniform(len(images), generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def _translate(images: Tensor, generator: torch.Generator) -> Tensor:
    n, _, height, width = images.shape
    pad = max(1, height // 8)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(images.device)
    rows = (dy[:, None] + torch.arange(height, device=images.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, :]
    batch_index = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch_index, rows, cols].permute(0, 3, 1, 2)


def _resized_crop(images: Tensor, generator: torch.Generator) -> Tensor:
    """RandomResizedCrop: up to 10 tries per image for a box inside it, else the whole image."""
    n, _, height, width = images.shape
    tries = n * _RESIZED_CROP_TRIES
    area = _uniform(tries, generator, *RESIZED_CROP_SCALE) * height * width
    log_ratio = _uniform(tries, generator, math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1]))
    ratio = torch.exp(log_ratio)
    box_w = torch.sqrt(area * ratio).round().view(n, _RESIZED_CROP_TRIES)
    box_h = torch.sqrt(area / ratio).round().view(n, _RESIZED_CROP_TRIES)
    fits = (box_w <= width) & (box_h <= height) & (box_w > 0) & (box_h > 0)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1, device=fits.device))
    rows = torch.arange(n, device=fits.device)
    found = first >= 0
    w = torch.where(
        found, box_w[rows, first.clamp_min(0)], torch.full((n,), float(width), device=fits.device)
    )
    h = torch.where(
        found, box_h[rows, first.clamp_min(0)], torch.full((n,), float(height), device=fits.device)
    )
    x0 = torch.floor(_uniform(n, generator) * (width - w + 1))
    y0 = torch.floor(_uniform(n, generator) * (height - h + 1))
    boxes = torch.stack([rows.float(), x0, y0, x0 + w, y0 + h], 1).to(images.device, images.dtype)
    # One bilinear sample per output pixel, at its centre, as torchvision's crop-then-resize: a full box is
    # the identity.
    return roi_align(
        images, boxes, output_size=(height, width), spatial_scale=1.0, sampling_ratio=1, aligned=True
    )


def augment_batch(images: Tensor, mode: str, generator: torch.Generator) -> Tensor:
    """``images`` in [0, 1] augmented per image as ``mode`` says (module docstring)."""
    if mode == "none":
        return images
    if mode == "resized_crop_flip":
        return _flip(_resized_crop(images, generator), generator).contiguous()
    out = _translate(images, generator)
    if mode == "crop_flip":
        out = _flip(out, generator)
    return out.contiguous()
