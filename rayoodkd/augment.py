"""Batch augmentation on tensors (the engine's data streams, the teacher recipe, and data-free methods)."""

from __future__ import annotations

import torch
from torch import Tensor


def augment_batch(images: Tensor, mode: str, generator: torch.Generator) -> Tensor:
    """Random translation by up to 1/8 of the size (zero padding); ``crop_flip`` adds a horizontal flip."""
    if mode == "none":
        return images
    n, _, height, width = images.shape
    pad = max(1, height // 8)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(images.device)
    rows = (dy[:, None] + torch.arange(height, device=images.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, :]
    batch_index = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch_index, rows, cols].permute(0, 3, 1, 2)
    if mode == "crop_flip":
        flip = torch.rand(n, generator=generator, device=generator.device).to(images.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.contiguous()
