"""Image generators (methods.md §1.2). All map ``z: [N, nz]`` to ``[N, channels, image_size, image_size]``.

They share one layout, parametrised per source:

    Linear(nz → c0·(s/4)²) → reshape → BN(c0) [→ LReLU] → up×2 → conv3×3(c0→c1) → BN → LReLU(0.2)
    → up×2 → conv3×3(c1→c2) → BN → LReLU(0.2) → conv3×3(c2→channels) → head

with nearest-neighbour ×2 upsampling (``nn.Upsample`` and ``F.interpolate`` defaults are the same op).
``output_space`` tells the method whether the output is an image in [0, 1] (``"unit"``: apply the dataset
normaliser) or already in normalised space (``"normalized"``: DFAD's GeneratorA, no normaliser).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from rayoodkd.models.registry import GENERATORS

OutputSpace = Literal["unit", "normalized"]


class UpsampleGenerator(nn.Module):
    """The shared two-upsampling generator; see the module docstring for the layout."""

    output_space: ClassVar[OutputSpace] = "unit"

    def __init__(
        self,
        nz: int,
        image_size: int,
        channels: int,
        widths: tuple[int, int, int],
        head: list[nn.Module],
        conv_bias: bool = False,
        act_after_first_bn: bool = False,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise ValueError(f"image_size must be a multiple of 4 (init size image_size // 4): {image_size}")
        self.nz = nz
        self.image_size = image_size
        self.channels = channels
        self.init_size = image_size // 4
        c0, c1, c2 = widths
        self.l1 = nn.Linear(nz, c0 * self.init_size**2)
        first: list[nn.Module] = [nn.BatchNorm2d(c0)]
        if act_after_first_bn:
            first.append(nn.LeakyReLU(0.2, inplace=True))
        self.conv_blocks = nn.Sequential(
            *first,
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c0, c1, 3, stride=1, padding=1, bias=conv_bias),
            nn.BatchNorm2d(c1, eps=bn_eps),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c1, c2, 3, stride=1, padding=1, bias=conv_bias),
            nn.BatchNorm2d(c2, eps=bn_eps),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(c2, channels, 3, stride=1, padding=1),
            *head,
        )

    def forward(self, z: Tensor) -> Tensor:
        out = self.l1(z.flatten(1))
        return self.conv_blocks(out.view(out.shape[0], -1, self.init_size, self.init_size))


@GENERATORS.register("mosaickd")
class MosaicKDGenerator(UpsampleGenerator):
    """MosaicKD ``Generator`` (``engine/models/generator.py``): 4·ngf = 256 channels at init, bias-free
    hidden convs, Sigmoid output in [0, 1]."""

    def __init__(self, nz: int = 100, ngf: int = 64, image_size: int = 32, channels: int = 3) -> None:
        super().__init__(nz, image_size, channels, (4 * ngf, 2 * ngf, ngf), [nn.Sigmoid()])


@GENERATORS.register("cmi")
class CMIGenerator(UpsampleGenerator):
    """Fast-Datafree/CMI ``Generator`` (``datafree/models/generator.py``): 2·ngf = 128 channels at init,
    bias-free hidden convs, Sigmoid output. nz = 256 (DAFL scripts use 512)."""

    def __init__(self, nz: int = 256, ngf: int = 64, image_size: int = 32, channels: int = 3) -> None:
        super().__init__(nz, image_size, channels, (2 * ngf, 2 * ngf, ngf), [nn.Sigmoid()])


@GENERATORS.register("dfad")
class DFADGenerator(UpsampleGenerator):
    """DFAD ``GeneratorA`` (``network/gan.py``): 128 channels at init, convs with bias, output
    Tanh → BatchNorm2d(channels, affine=False), i.e. directly in normalised space (no normaliser)."""

    output_space: ClassVar[OutputSpace] = "normalized"

    def __init__(self, nz: int = 256, ngf: int = 64, image_size: int = 32, channels: int = 3) -> None:
        head: list[nn.Module] = [nn.Tanh(), nn.BatchNorm2d(channels, affine=False)]
        super().__init__(nz, image_size, channels, (2 * ngf, 2 * ngf, ngf), head, conv_bias=True)


@GENERATORS.register("tadfkd")
class TADFKDGenerator(UpsampleGenerator):
    """TA-DFKD ``gan.Generator`` (DAFL-style): nz = 1000, LReLU after the first BN, convs with bias,
    Sigmoid output. ``dafl_bn_eps_quirk`` keeps DAFL's ``BatchNorm2d(c, 0.8)``, which sets eps = 0.8 on the
    two BNs after the hidden convs; ``False`` uses the default eps 1e-5."""

    def __init__(
        self,
        nz: int = 1000,
        ngf: int = 64,
        image_size: int = 32,
        channels: int = 3,
        dafl_bn_eps_quirk: bool = True,
    ) -> None:
        super().__init__(
            nz,
            image_size,
            channels,
            (2 * ngf, 2 * ngf, ngf),
            [nn.Sigmoid()],
            conv_bias=True,
            act_after_first_bn=True,
            bn_eps=0.8 if dafl_bn_eps_quirk else 1e-5,
        )


@GENERATORS.register("augkd")
class AugKDGenerator(UpsampleGenerator):
    """AuG-KD ``Generator`` (the "decoder", ``models/generator.py`` with hidden dims [256,128,64], 3×3
    kernels, scales [2,2]): same layout as MosaicKD's. Unconditional. nz = 100 (README; argparse: 256)."""

    def __init__(self, nz: int = 100, ngf: int = 64, image_size: int = 32, channels: int = 3) -> None:
        super().__init__(nz, image_size, channels, (4 * ngf, 2 * ngf, ngf), [nn.Sigmoid()])


def build_generator(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered generator; kwargs: ``nz``, ``ngf``, ``image_size``, ``channels`` (+ class flags).

    Every generator exposes ``nz``, ``image_size``, ``channels`` and ``output_space``.
    """
    return GENERATORS.build(name, **kwargs)
