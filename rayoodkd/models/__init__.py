"""Networks: classifiers (shared ``forward_features``/``feature_dim``/``fc`` interface), generators and
(patch) discriminators, each behind a name registry."""

from rayoodkd.models.classifiers import (
    TIMM_PREFIX,
    TORCHVISION_PREFIX,
    Classifier,
    ModuleClassifier,
    build_classifier,
)
from rayoodkd.models.discriminators import (
    ConvSpec,
    FullImageDiscriminator,
    MosaicKDPatchDiscriminator,
    PatchDiscriminator,
    build_discriminator,
    plan_patch_layers,
    receptive_field,
    total_stride,
)
from rayoodkd.models.generators import UpsampleGenerator, build_generator
from rayoodkd.models.registry import CLASSIFIERS, DISCRIMINATORS, GENERATORS, Registry

__all__ = [
    "CLASSIFIERS",
    "DISCRIMINATORS",
    "GENERATORS",
    "TIMM_PREFIX",
    "TORCHVISION_PREFIX",
    "Classifier",
    "ConvSpec",
    "FullImageDiscriminator",
    "ModuleClassifier",
    "MosaicKDPatchDiscriminator",
    "PatchDiscriminator",
    "Registry",
    "UpsampleGenerator",
    "build_classifier",
    "build_discriminator",
    "build_generator",
    "plan_patch_layers",
    "receptive_field",
    "total_stride",
]
