"""Discriminators for MosaicKD's patch learning (methods.md §2.3, paper §3.2 "Patch Discriminator").

* ``patch``: a fully convolutional PatchGAN whose every output logit sees exactly an L×L input patch
  (``patch_size`` L = 1…any) and whose neighbouring logits are ``stride`` s pixels apart. The layer plan
  (:func:`plan_patch_layers`) is derived from the receptive-field recurrence and checked with
  :func:`receptive_field` / :func:`total_stride` on the built network.
* ``full_image``: a global DCGAN-style discriminator (one logit per image) for the "w/o patch learning"
  ablation.
* ``mosaickd_official``: the official ``PatchDiscriminator(nc=3, ndf=128)`` (RF 10, stride 4).

All return a logit map ``[N, 1, H', W']`` and expose ``effective_receptive_field`` and ``output_stride``.
Receptive fields are those of the forward path; in ``train()`` mode BatchNorm's batch statistics couple all
positions, as in any BN PatchGAN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from rayoodkd.models.registry import DISCRIMINATORS

_MAX_WIDTH_MULT = 8
_POINTWISE = (nn.BatchNorm2d, nn.LeakyReLU, nn.ReLU, nn.Identity, nn.Dropout, nn.Sigmoid, nn.Tanh)


@dataclass(frozen=True)
class ConvSpec:
    """Spatial hyper-parameters of one square convolution/pooling layer."""

    kernel: int
    stride: int = 1
    dilation: int = 1


def _square(value: int | tuple[int, ...], what: str) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"non-square {what} {value} is not supported")
    return value[0]


def _layer_specs(layers: nn.Module | Sequence[ConvSpec]) -> list[ConvSpec]:
    """ConvSpecs of a module's leaf layers in registration order (assumed to be the forward order)."""
    if not isinstance(layers, nn.Module):
        return list(layers)
    specs = []
    for m in layers.modules():
        if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            specs.append(
                ConvSpec(
                    _square(m.kernel_size, "kernel"),
                    _square(m.stride, "stride"),
                    _square(getattr(m, "dilation", 1), "dilation"),
                )
            )
        elif next(m.children(), None) is None and not isinstance(m, _POINTWISE):
            raise ValueError(f"cannot compute a receptive field through {type(m).__name__}")
    return specs


def _rf_and_jump(layers: nn.Module | Sequence[ConvSpec]) -> tuple[int, int]:
    rf, jump = 1, 1
    for spec in _layer_specs(layers):
        rf += (spec.kernel - 1) * spec.dilation * jump
        jump *= spec.stride
    return rf, jump


def receptive_field(layers: nn.Module | Sequence[ConvSpec]) -> int:
    """Theoretical receptive field (pixels per side) of a chain of square convs/pools.

    ``layers`` is a list of :class:`ConvSpec` or a module whose ``Conv2d``/``MaxPool2d``/``AvgPool2d`` leaves,
    in registration order, form the forward chain (other leaves must be pointwise, e.g. BN or activations).
    Uses ``rf = 1 + Σ_i (k_i − 1)·d_i·Π_{j<i} s_j``.
    """
    return _rf_and_jump(layers)[0]


def total_stride(layers: nn.Module | Sequence[ConvSpec]) -> int:
    """Distance in input pixels between neighbouring output units: the product of the layer strides."""
    return _rf_and_jump(layers)[1]


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


def plan_patch_layers(patch_size: int, stride: int) -> list[ConvSpec]:
    """Hidden-layer plan with receptive field exactly ``patch_size`` and total stride exactly ``stride``.

    Let L = patch_size, s = stride = f_1·…·f_m (prime factors, ascending).

    * L < s: one conv with kernel L and stride f_1, then 1×1 convs with strides f_2…f_m (patches do not
      overlap and leave gaps).
    * L ≥ s: downsampling convs with kernel f_i and stride f_i (RF s, gap-free); the extra L − s = q·s + r is
      added by stride-1 3×3 convs at the output resolution with dilations 1, 2, 4, … (each adds 2·d·s) and one
      final 2-tap conv with dilation q' for the rest q'·s of q, and r (< s) is added to the downsampling
      kernels, deepest first (each kernel grows by < f_i).

    Every tap spacing is at most the receptive field accumulated before it, so the input support of each
    output unit is a full, hole-free L×L square. With no layer at all (L = s = 1) a single 1×1 conv is used.
    """
    if patch_size < 1 or stride < 1:
        raise ValueError(f"patch_size and stride must be >= 1, got {patch_size} and {stride}")
    factors = _prime_factors(stride)
    if patch_size < stride:
        return [ConvSpec(patch_size, factors[0])] + [ConvSpec(1, f) for f in factors[1:]]
    kernels = list(factors)
    context: list[ConvSpec] = []
    q, r = divmod(patch_size - stride, stride)
    dilation = 1
    while q >= 2 * dilation:
        context.append(ConvSpec(3, 1, dilation))
        q -= 2 * dilation
        dilation *= 2
    if q > 0:
        context.append(ConvSpec(2, 1, q))
    jumps = [1]
    for f in factors[:-1]:
        jumps.append(jumps[-1] * f)
    for i in reversed(range(len(factors))):
        grow, r = divmod(r, jumps[i])
        kernels[i] += grow
    specs = [ConvSpec(k, f) for k, f in zip(kernels, factors, strict=True)] + context
    return specs or [ConvSpec(1)]


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) with an exact receptive field, as MosaicKD's patch discriminator.

    Hidden layers follow :func:`plan_patch_layers`; as in the official MosaicKD D, the first conv has a
    bias and no norm, later ones are bias-free with BatchNorm, all followed by LeakyReLU(0.2), and a 1×1
    bias-free conv gives one logit per patch. Widths start at ``ndf`` and double at each downsampling layer
    after the first (up to 8·ndf).

    Convs are unpadded ("valid"), so every logit sees a genuine L×L patch of the image and never zero
    padding: on an H×W input the map has ``(H − L) // s + 1`` × ``(W − L) // s + 1`` logits (L = H gives a
    single whole-image logit). This differs from the official D, which zero-pads its borders.
    """

    def __init__(
        self,
        patch_size: int = 10,
        stride: int = 4,
        channels: int = 3,
        ndf: int = 128,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        if patch_size > image_size:
            raise ValueError(f"patch_size {patch_size} exceeds image_size {image_size}")
        layers: list[nn.Module] = []
        prev, width = channels, ndf
        for i, spec in enumerate(plan_patch_layers(patch_size, stride)):
            if i > 0 and spec.stride > 1:
                width = min(2 * width, _MAX_WIDTH_MULT * ndf)
            conv = nn.Conv2d(prev, width, spec.kernel, spec.stride, dilation=spec.dilation, bias=i == 0)
            layers += [conv] if i == 0 else [conv, nn.BatchNorm2d(width)]
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            prev = width
        layers.append(nn.Conv2d(prev, 1, 1, bias=False))
        self.main = nn.Sequential(*layers)
        self.effective_receptive_field = receptive_field(self.main)
        self.output_stride = total_stride(self.main)
        if (self.effective_receptive_field, self.output_stride) != (patch_size, stride):
            raise RuntimeError(
                f"built RF/stride {self.effective_receptive_field}/{self.output_stride} "
                f"!= requested {patch_size}/{stride}"
            )

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < self.effective_receptive_field:
            size = tuple(x.shape[-2:])
            raise ValueError(f"input {size} is smaller than the patch size {self.effective_receptive_field}")
        return self.main(x)


class FullImageDiscriminator(nn.Module):
    """Global discriminator for the "w/o patch learning" ablation (DCGAN, Radford et al. 2016, style).

    4×4 stride-2 convs (padding 1; widths ndf, 2·ndf, 4·ndf, …; BN after the first) until the map is at most
    4×4, then one conv whose kernel covers the whole remaining map: a single logit ``[N, 1, 1, 1]`` that
    depends on every pixel. ``effective_receptive_field`` and ``output_stride`` are both ``image_size``
    (one patch = the whole image).
    """

    def __init__(self, channels: int = 3, ndf: int = 64, image_size: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev, width, size = channels, ndf, image_size
        while size > 4:
            first = not layers
            layers.append(nn.Conv2d(prev, width, 4, 2, 1, bias=first))
            if not first:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            prev, width, size = width, min(2 * width, _MAX_WIDTH_MULT * ndf), (size - 2) // 2 + 1
        layers.append(nn.Conv2d(prev, 1, size, bias=False))
        self.main = nn.Sequential(*layers)
        self.image_size = image_size
        self.effective_receptive_field = image_size
        self.output_stride = image_size

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            size = tuple(x.shape[-2:])
            raise ValueError(f"expected {self.image_size}×{self.image_size} inputs, got {size}")
        return self.main(x)


class MosaicKDPatchDiscriminator(nn.Module):
    """The official MosaicKD ``PatchDiscriminator(nc, ndf=128)``: conv4×4/2 (bias) → LReLU → conv4×4/2 →
    BN → LReLU → conv1×1 → 1. RF 10, stride 4 (8×8 logits on 32 px, zero-padded borders).

    ``map_subsample`` is the official ``output_stride`` argument (subsampling of the logit map, default 1,
    as used by ``kd_mosaic.py``); ``output_stride`` here is in input pixels, ``4 · map_subsample``.
    ``image_size`` is accepted for a uniform interface only.
    """

    def __init__(
        self, channels: int = 3, ndf: int = 128, map_subsample: int = 1, image_size: int = 32
    ) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(channels, ndf, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 1, 1, 0, bias=False),
        )
        self.map_subsample = map_subsample
        self.effective_receptive_field = receptive_field(self.main)
        self.output_stride = total_stride(self.main) * map_subsample

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)[..., :: self.map_subsample, :: self.map_subsample]


DISCRIMINATORS.register("patch")(PatchDiscriminator)
DISCRIMINATORS.register("full_image")(FullImageDiscriminator)
DISCRIMINATORS.register("mosaickd_official")(MosaicKDPatchDiscriminator)


def build_discriminator(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered discriminator; all accept ``channels`` and ``image_size`` (+ their own options)."""
    return DISCRIMINATORS.build(name, **kwargs)
