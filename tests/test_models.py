"""Behavioural tests for rayoodkd.models: registries, classifier interface, generators, discriminators."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from rayoodkd.models import (
    CLASSIFIERS,
    DISCRIMINATORS,
    GENERATORS,
    ConvSpec,
    build_classifier,
    build_discriminator,
    build_generator,
    plan_patch_layers,
    receptive_field,
    total_stride,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny CPU workloads: one intra-op thread avoids OpenMP spin-waiting on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Pooled penultimate feature size of every registered classifier (a new registration needs an entry).
FEATURE_DIMS = {
    "resnet8": 64,
    "resnet18": 512,
    "resnet34": 512,
    "wrn16_1": 64,
    "wrn16_2": 128,
    "wrn40_1": 64,
    "wrn40_2": 128,
    "vgg11_bn": 512,
    "lenet5": 84,
    "lenet5_half": 42,
    "cnn_small": 128,
    "lenet5_bn": 84,
    "cnn_tiny": 32,
}

# (channels, height, width) of ``forward_feature_map`` on 32 px inputs (a new registration needs an entry).
FEATURE_MAP_SHAPES_32PX = {
    "resnet8": (64, 8, 8),
    "resnet18": (512, 4, 4),
    "resnet34": (512, 4, 4),
    "wrn16_1": (64, 8, 8),
    "wrn16_2": (128, 8, 8),
    "wrn40_1": (64, 8, 8),
    "wrn40_2": (128, 8, 8),
    "vgg11_bn": (512, 4, 4),
    "lenet5": (120, 1, 1),
    "lenet5_half": (60, 1, 1),
    "cnn_small": (128, 8, 8),
    "lenet5_bn": (120, 1, 1),
    "cnn_tiny": (32, 8, 8),
}


# --------------------------------------------------------------------------------------------- registries


def test_registered_names() -> None:
    assert CLASSIFIERS.names() == sorted(FEATURE_DIMS) == sorted(FEATURE_MAP_SHAPES_32PX)
    assert GENERATORS.names() == ["augkd", "cmi", "dfad", "mosaickd", "tadfkd"]
    assert DISCRIMINATORS.names() == ["full_image", "mosaickd_official", "patch"]


@pytest.mark.parametrize(
    ("build", "kind", "registry"),
    [
        (lambda n: build_classifier(n, 10), "classifier", CLASSIFIERS),
        (build_generator, "generator", GENERATORS),
        (build_discriminator, "discriminator", DISCRIMINATORS),
    ],
)
def test_unknown_name_lists_allowed(build, kind, registry) -> None:
    with pytest.raises(ValueError, match=f"^unknown {kind} 'nope'; allowed: ") as info:
        build("nope")
    allowed = str(info.value).split("allowed: ", 1)[1].split(", ")
    assert allowed[: len(registry.names())] == registry.names()
    if kind == "classifier":
        assert allowed[len(registry.names()) :] == [
            "torchvision:<name>",
            "timm:<name>",
            "<module.path>:<ClassName>",
        ]


def test_duplicate_registration_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        CLASSIFIERS.register("resnet18")(lambda **_: nn.Identity())


# -------------------------------------------------------------------------------------------- classifiers


@pytest.mark.parametrize(("num_classes", "in_channels", "image_size"), [(10, 1, 28), (100, 3, 32)])
@pytest.mark.parametrize("name", CLASSIFIERS.names())
def test_classifier_interface(name: str, num_classes: int, in_channels: int, image_size: int) -> None:
    """Logits are ``fc(pool_features(forward_feature_map(x)))`` exactly, with the declared sizes."""
    torch.manual_seed(0)
    model = build_classifier(name, num_classes, in_channels, image_size).eval()
    x = torch.randn(2, in_channels, image_size, image_size)
    with torch.no_grad():
        feature_map = model.forward_feature_map(x)
        pooled = model.pool_features(feature_map)
        features = model.forward_features(x)
        logits = model(x)
    assert model.feature_dim == FEATURE_DIMS[name]
    assert features.shape == (2, model.feature_dim)
    assert isinstance(model.fc, nn.Linear)
    assert (model.fc.in_features, model.fc.out_features) == (model.feature_dim, num_classes)
    assert logits.shape == (2, num_classes)
    torch.testing.assert_close(logits, model.fc(features), rtol=0, atol=0)

    batch, channels, height, width = feature_map.shape
    assert (batch, channels) == (2, model.feature_map_channels)
    assert height > 0 and width > 0
    if image_size == 32:
        assert (channels, height, width) == FEATURE_MAP_SHAPES_32PX[name]
    torch.testing.assert_close(pooled, features, rtol=0, atol=0)
    torch.testing.assert_close(model.fc(pooled), logits, rtol=0, atol=0)


def test_cifar_resnet18_feature_map_is_kd3_512x4x4() -> None:
    """KD3 projects the 512×4×4 last feature maps of CIFAR ResNet-18; its features are their spatial mean."""
    torch.manual_seed(0)
    model = build_classifier("resnet18", 10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feature_map = model.forward_feature_map(x)
        features = model.forward_features(x)
    assert feature_map.shape == (3, 512, 4, 4)
    torch.testing.assert_close(features, feature_map.mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("name", "map_channels", "feature_dim"), [("resnet18", 512, 512), ("mobilenet_v3_small", 576, 1024)]
)
def test_torchvision_feature_map_splits_the_torchvision_forward(
    name: str, map_channels: int, feature_dim: int
) -> None:
    """The feature-map path reproduces torchvision's own forward exactly, dropout included in training."""
    torch.manual_seed(0)
    model = build_classifier(f"torchvision:{name}", 10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feature_map = model.forward_feature_map(x)
        logits = model(x)
        torch.testing.assert_close(model.fc(model.pool_features(feature_map)), logits, rtol=0, atol=0)
        torch.testing.assert_close(model.fc(model.backbone(x)), logits, rtol=0, atol=0)
        model.train()
        torch.manual_seed(1)
        train_logits = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(model.fc(model.backbone(x)), train_logits, rtol=0, atol=0)
    assert model.feature_map_channels == map_channels
    assert model.feature_dim == feature_dim
    assert feature_map.shape == (2, map_channels, 2, 2)


def test_torchvision_vit_has_no_feature_map() -> None:
    from rayoodkd.models.classifiers import TorchvisionClassifier

    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8, num_classes=4
    )
    model = TorchvisionClassifier(vit, "heads.head").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.fc(model.backbone(x)), rtol=0, atol=0)
    with pytest.raises(TypeError, match="VisionTransformer has no feature map"):
        model.forward_feature_map(x)
    with pytest.raises(TypeError, match="VisionTransformer has no feature map"):
        _ = model.feature_map_channels


@pytest.mark.parametrize(("name", "params"), [("resnet18", 11_173_962), ("resnet34", 21_282_122)])
def test_cifar_resnet_parameter_counts(name: str, params: int) -> None:
    """The well-known CIFAR-10 parameter counts of the CIFAR ResNets (3×3 stem, no max-pool)."""
    model = build_classifier(name, 10)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize(
    ("name", "legacy", "in_channels"),
    [("resnet18", "linear.", 3), ("vgg11_bn", "classifier.", 3), ("lenet5", "fc2.", 1)],
)
def test_source_checkpoint_head_keys_load(name: str, legacy: str, in_channels: int) -> None:
    """State dicts with the source repository's head name (DAFL/MosaicKD) load into ``fc``."""
    torch.manual_seed(0)
    source = build_classifier(name, 10, in_channels)
    state = {(legacy + k[3:] if k.startswith("fc.") else k): v for k, v in source.state_dict().items()}
    assert any(k.startswith(legacy) for k in state)
    target = build_classifier(name, 10, in_channels)
    target.load_state_dict(state)
    x = torch.randn(2, in_channels, 32, 32)
    torch.testing.assert_close(target.eval()(x), source.eval()(x))


def test_wrn_generic_builder_and_depth_check() -> None:
    from rayoodkd.models.classifiers import wrn

    model = wrn(22, 4, num_classes=7)
    assert model.feature_dim == 256
    assert len(model.block1.layer) == 3
    with pytest.raises(ValueError, match="6n\\+4"):
        wrn(20, 1, num_classes=10)


def test_torchvision_adapter_loads_local_weights(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    saved = torch.load(path, map_location="cpu", weights_only=True)

    model = build_classifier("torchvision:resnet18", 10, in_channels=1, image_size=28, weights_path=str(path))
    loaded = model.backbone.state_dict()
    kept = [k for k in saved if not k.startswith(("conv1.", "fc."))]
    assert len(kept) > 100
    for key in kept:
        assert torch.equal(loaded[key], saved[key]), key
    assert model.backbone.conv1.in_channels == 1
    torch.testing.assert_close(model.backbone.conv1.weight, saved["conv1.weight"].sum(1, keepdim=True))
    assert (model.feature_dim, model.fc.out_features) == (512, 10)

    model.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        torch.testing.assert_close(model(x), model.fc(model.forward_features(x)), rtol=0, atol=0)


def test_torchvision_adapter_keeps_matching_head(tmp_path) -> None:
    path = tmp_path / "resnet18_c10.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), path)
    saved = torch.load(path, weights_only=True)
    model = build_classifier("torchvision:resnet18", 10, weights_path=path)
    assert torch.equal(model.fc.weight, saved["fc.weight"])
    assert torch.equal(model.backbone.conv1.weight, saved["conv1.weight"])


def test_torchvision_adapter_nested_head_and_no_download() -> None:
    model = build_classifier("torchvision:mobilenet_v3_small", 31).eval()
    assert (model.feature_dim, model.fc.out_features) == (1024, 31)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 31)
    with pytest.raises(ValueError, match="never downloaded"):
        build_classifier("torchvision:resnet18", 10, weights="DEFAULT")


# --------------------------------------------------------------------------------------------- generators

DEFAULT_NZ = {"mosaickd": 100, "cmi": 256, "dfad": 256, "tadfkd": 1000, "augkd": 100}
INIT_WIDTH = {"mosaickd": 256, "cmi": 128, "dfad": 128, "tadfkd": 128, "augkd": 256}


@pytest.mark.parametrize(("image_size", "channels"), [(28, 1), (32, 3)])
@pytest.mark.parametrize("name", sorted(DEFAULT_NZ))
def test_generator_shapes_and_ranges(name: str, image_size: int, channels: int) -> None:
    torch.manual_seed(0)
    g = build_generator(name, image_size=image_size, channels=channels)
    assert g.nz == DEFAULT_NZ[name]
    assert g.l1.out_features == INIT_WIDTH[name] * (image_size // 4) ** 2
    out = g(torch.randn(16, g.nz))
    assert out.shape == (16, channels, image_size, image_size)
    if name == "dfad":
        assert g.output_space == "normalized"
        assert out.min() < 0 < out.max()
    else:
        assert g.output_space == "unit"
        assert out.min() >= 0 and out.max() <= 1


def test_generator_nz_is_configurable_and_size_checked() -> None:
    g = build_generator("mosaickd", nz=64)
    assert g(torch.randn(4, 64)).shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_generator("cmi", image_size=30)


def test_dfad_output_is_batch_normalised_per_channel() -> None:
    torch.manual_seed(0)
    g = build_generator("dfad", channels=3).train()
    out = g(torch.randn(64, g.nz))
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), rtol=0, atol=1e-2)


def test_generator_layer_quirks() -> None:
    def convs_have_bias(name: str) -> list[bool]:
        g = build_generator(name)
        return [m.bias is not None for m in g.conv_blocks if isinstance(m, nn.Conv2d)]

    for name in ("mosaickd", "cmi", "augkd"):
        assert convs_have_bias(name) == [False, False, True]
    for name in ("dfad", "tadfkd"):
        assert convs_have_bias(name) == [True, True, True]
    tadfkd = build_generator("tadfkd")
    assert isinstance(tadfkd.conv_blocks[1], nn.LeakyReLU)
    dfad_tail = list(build_generator("dfad").conv_blocks)[-2:]
    assert isinstance(dfad_tail[0], nn.Tanh)
    assert isinstance(dfad_tail[1], nn.BatchNorm2d) and not dfad_tail[1].affine


@pytest.mark.parametrize(("quirk", "eps"), [(True, [1e-5, 0.8, 0.8]), (False, [1e-5, 1e-5, 1e-5])])
def test_tadfkd_bn_eps_quirk(quirk: bool, eps: list[float]) -> None:
    g = build_generator("tadfkd", dafl_bn_eps_quirk=quirk)
    assert [m.eps for m in g.modules() if isinstance(m, nn.BatchNorm2d)] == eps


# ----------------------------------------------------------------------------------------- discriminators


def _positive_copy(d: nn.Module) -> nn.Module:
    """Eval-mode copy with positive conv weights and zero biases: on a positive input every activation is
    positive (LeakyReLU acts as the identity, BN uses its unit running stats), so input gradients are
    strictly positive exactly on each output unit's receptive field and cannot cancel."""
    d = copy.deepcopy(d).eval()
    with torch.no_grad():
        for m in d.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
    return d


def _support(d: nn.Module, channels: int, size: int, unit: tuple[int, int]) -> tuple[int, int, int, int, int]:
    """(top, left, height, width, #pixels) of the input support of logit ``unit``."""
    x = (torch.rand(1, channels, size, size, dtype=torch.float64) + 0.5).requires_grad_()
    out = d.double()(x)
    (grad,) = torch.autograd.grad(out[0, 0, unit[0], unit[1]], x)
    mask = grad[0].abs().sum(0) > 0
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    top, left = int(rows[0]), int(cols[0])
    return top, left, int(rows[-1]) - top + 1, int(cols[-1]) - left + 1, int(mask.sum())


def _measure(d: nn.Module, channels: int = 3, size: int = 64) -> tuple[int, int, tuple[int, int]]:
    """Measured (receptive field, output stride, logit-map size) on a size×size input."""
    d = _positive_copy(d)
    with torch.no_grad():
        h, w = d(torch.rand(1, channels, size, size)).shape[-2:]
    i, j = h // 2, w // 2
    top, left, height, width, count = _support(d, channels, size, (i, j))
    assert height == width and count == height * width, "support is not a full square"
    stride_x = _support(d, channels, size, (i, j + 1))[1] - left
    stride_y = _support(d, channels, size, (i + 1, j))[0] - top
    assert stride_x == stride_y
    return height, stride_x, (h, w)


@pytest.mark.parametrize("stride", [1, 2, 4])
@pytest.mark.parametrize("patch_size", range(1, 33))
def test_patch_discriminator_measured_receptive_field(patch_size: int, stride: int) -> None:
    d = build_discriminator("patch", patch_size=patch_size, stride=stride, channels=3, ndf=4)
    assert receptive_field(d) == d.effective_receptive_field == patch_size
    assert total_stride(d) == d.output_stride == stride
    rf, measured_stride, (h, w) = _measure(d, channels=3, size=64)
    assert (rf, measured_stride) == (patch_size, stride)
    assert h == w == (64 - patch_size) // stride + 1


@pytest.mark.parametrize(("patch_size", "stride"), [(10, 4), (18, 4), (22, 8), (7, 3), (12, 6), (5, 16)])
def test_patch_discriminator_other_strides(patch_size: int, stride: int) -> None:
    d = build_discriminator("patch", patch_size=patch_size, stride=stride, ndf=4, image_size=64)
    assert _measure(d)[:2] == (patch_size, stride)


def test_patch_discriminator_logit_maps_on_32px() -> None:
    x = torch.rand(4, 3, 32, 32)
    d = build_discriminator("patch", patch_size=10, stride=4, ndf=8).train()
    assert d(x).shape == (4, 1, 6, 6)
    whole = build_discriminator("patch", patch_size=32, stride=4, ndf=8)
    assert whole(x).shape == (4, 1, 1, 1)
    with pytest.raises(ValueError, match="exceeds image_size"):
        build_discriminator("patch", patch_size=33, stride=1)
    with pytest.raises(ValueError, match="smaller than the patch size"):
        whole(torch.rand(1, 3, 28, 28))


def test_official_mosaickd_discriminator() -> None:
    d = build_discriminator("mosaickd_official")
    assert (d.effective_receptive_field, d.output_stride) == (10, 4)
    assert d(torch.rand(2, 3, 32, 32)).shape == (2, 1, 8, 8)
    small = build_discriminator("mosaickd_official", ndf=4)
    assert _measure(small)[:2] == (10, 4)
    sub = build_discriminator("mosaickd_official", ndf=4, map_subsample=2)
    assert sub.output_stride == 8
    assert sub(torch.rand(2, 3, 32, 32)).shape == (2, 1, 4, 4)
    assert _measure(sub)[:2] == (10, 8)


@pytest.mark.parametrize(("image_size", "channels"), [(28, 1), (32, 3)])
def test_full_image_discriminator_sees_every_pixel(image_size: int, channels: int) -> None:
    d = build_discriminator("full_image", channels=channels, image_size=image_size, ndf=4)
    assert d(torch.rand(2, channels, image_size, image_size)).shape == (2, 1, 1, 1)
    assert d.effective_receptive_field == image_size
    *_, count = _support(_positive_copy(d), channels, image_size, (0, 0))
    assert count == image_size**2
    with pytest.raises(ValueError, match="expected"):
        d(torch.rand(1, channels, 64, 64))


def test_receptive_field_function() -> None:
    official = [ConvSpec(4, 2), ConvSpec(4, 2), ConvSpec(1)]
    assert (receptive_field(official), total_stride(official)) == (10, 4)
    assert receptive_field([ConvSpec(3, 1, 4)]) == 9
    # MosaicKD's ablation D named "psize22" (three 3×3 stride-2 convs + 1×1) has a theoretical RF of 15.
    official_psize22 = nn.Sequential(*[nn.Conv2d(1, 1, 3, 2, 1) for _ in range(3)], nn.Conv2d(1, 1, 1))
    assert (receptive_field(official_psize22), total_stride(official_psize22)) == (15, 8)
    with pytest.raises(ValueError, match="Flatten"):
        receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten(), nn.Linear(1, 1)))


def test_plan_is_gap_free_when_patches_cover_the_stride() -> None:
    """For L >= s every tap spacing is at most the RF accumulated so far (hole-free support)."""
    for patch_size in range(1, 65):
        for stride in (1, 2, 3, 4, 8):
            if patch_size < stride:
                continue
            rf, jump = 1, 1
            for spec in plan_patch_layers(patch_size, stride):
                assert spec.dilation * jump <= rf or spec.kernel == 1
                rf += (spec.kernel - 1) * spec.dilation * jump
                jump *= spec.stride
            assert (rf, jump) == (patch_size, stride)
