"""AuG-KD's encoder E(x, y) and AnchorNet A(z, y) (spec/methods.md §3.2, from the official code).

The official networks assume 32×32 RGB; here the label channel and the flattened feature size follow the
image size and channel count (any size divisible by 4), so the same modules serve 28×28 digits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Upper bound of the AnchorNet mask: ReLU(Softsign(u)) with u = Sigmoid(·) − 0.5 ∈ (−0.5, 0.5) stays below
# Softsign(0.5) = 1/3 (spec §3.5.3: the official per-batch target d·(1 − inv) is out of its reach).
MASK_SUPREMUM = 1.0 / 3.0


def _uniform_init(module: nn.Module, types: tuple[type[nn.Module], ...]) -> None:
    """The official init: weights U(−0.08, 0.08), biases 0, for the given layer types only."""
    for layer in module.modules():
        if isinstance(layer, types):
            nn.init.uniform_(layer.weight, -0.08, 0.08)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class CVAEEncoder(nn.Module):
    """E(x, y) → (z, μ, log σ²): a conditional VAE encoder that learns to invert the generator.

    ``x`` is an image in [0, 1]; ``y`` its class. Layout (§3.2)::

        label = Linear(one-hot(y) → H·W) as one extra channel;  image = Conv1×1(C → C)
        BN(C+1) → ×0.5 → Conv3×3(C+1 → w) → BN → LReLU(0.2) → ×0.5 → Conv3×3(w → 2w) → BN → LReLU(0.2)
        → Conv3×3(2w → 4w) → BN → Tanh → flatten → fc_mu, fc_var (→ nz)

    log σ² is clipped to [−5, 3]; z = μ + ε·exp(½ log σ²) with ε ~ N(0, I) clipped to [−10, 10]. The
    official code samples in eval mode too, and so does this encoder (pass ``generator`` for reproducible ε).
    """

    def __init__(
        self, nz: int, num_classes: int, image_size: int, channels: int = 3, width: int = 64
    ) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise ValueError(f"image_size must be a multiple of 4 (two ×0.5 downsamplings): {image_size}")
        self.num_classes = num_classes
        self.image_size = image_size
        self.embed_label = nn.Linear(num_classes, image_size * image_size)
        self.embed_image = nn.Conv2d(channels, channels, kernel_size=1)
        self.bn_in = nn.BatchNorm2d(channels + 1)
        self.block1 = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.BatchNorm2d(4 * width),
            nn.Tanh(),
        )
        features = 4 * width * (image_size // 4) ** 2
        self.fc_mu = nn.Linear(features, nz)
        self.fc_var = nn.Linear(features, nz)
        _uniform_init(self, (nn.Conv2d, nn.Linear))

    def forward(
        self, x: Tensor, y: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        size = self.image_size
        label = self.embed_label(F.one_hot(y, self.num_classes).float()).view(-1, 1, size, size)
        h = self.bn_in(torch.cat([self.embed_image(x), label], dim=1))
        h = self.block1(F.interpolate(h, scale_factor=0.5))
        h = self.block2(F.interpolate(h, scale_factor=0.5)).flatten(1)
        mu, log_var = self.fc_mu(h), self.fc_var(h).clamp(-5.0, 3.0)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype).clamp(-10.0, 10.0)
        return mu + eps * torch.exp(0.5 * log_var), mu, log_var


def gaussian_kl(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per sample, summed over latent dimensions."""
    return -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(1)


class AnchorNet(nn.Module):
    """A(z, y) → (z_a, m): maps a latent towards a low-uncertainty teacher-domain anchor (§3.2)::

        e = Linear(one-hot(y) → nz)
        m = ReLU(Softsign(Sigmoid(BN1d(L3(L2(L1(e))))) − 0.5))          ∈ [0, 1/3), class-conditional
        ψ(v) = Linear(4·nz → nz)(flatten(LReLU(BN(Conv1d(8→4)(LReLU(BN(Conv1d(4→8)(
                   LReLU(BN(Conv1d(1→4)(v as [B, 1, nz])))))))))))
        z_a = m ⊙ ψ(z ⊙ m) + (1 − m) ⊙ z

    Linear weights U(−0.08, 0.08) and zero biases; the Conv1d layers keep PyTorch's init (the official init
    loop only matches Conv2d).
    """

    def __init__(self, nz: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Linear(num_classes, nz)
        self.mask_layers = nn.Sequential(
            nn.Linear(nz, nz), nn.Linear(nz, nz), nn.Linear(nz, nz), nn.BatchNorm1d(nz)
        )

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            # the official AnchorNet's LeakyReLU() (slope 0.01), unlike its encoder's and generator's 0.2
            return [nn.Conv1d(c_in, c_out, 3, padding=1), nn.BatchNorm1d(c_out), nn.LeakyReLU()]

        self.mapping = nn.Sequential(
            *conv(1, 4), *conv(4, 8), *conv(8, 4), nn.Flatten(), nn.Linear(4 * nz, nz)
        )
        _uniform_init(self, (nn.Linear,))

    def mask(self, y: Tensor) -> Tensor:
        """The class-conditional mask m(y) ∈ [0, 1/3) per latent dimension."""
        e = self.embed(F.one_hot(y, self.num_classes).float())
        return F.relu(F.softsign(torch.sigmoid(self.mask_layers(e)) - 0.5))

    def forward(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        m = self.mask(y)
        mapped = self.mapping((z * m).unsqueeze(1))
        return m * mapped + (1 - m) * z, m
