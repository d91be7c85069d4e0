"""The frozen teacher's no-grad forwards through a fused copy (``teacher_inference=fused``)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import Tensor, nn

from rayoodkd.engine.teacher_inference import NOTHING_TO_FOLD, NoGradRoute, route_no_grad_forwards
from rayoodkd.models import CLASSIFIERS, build_classifier


def _bn_teacher() -> nn.Module:
    torch.manual_seed(0)
    model = build_classifier("cnn_small", num_classes=10, in_channels=1, image_size=28)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 28, 28) * 2 + 0.5)  # running statistics far from (0, 1)
    return model.eval().requires_grad_(False)


def _batchnorm_calls(model: nn.Module) -> list[bool]:
    """Records, per call of the first BatchNorm layer of ``model``, whether grad was enabled."""
    calls: list[bool] = []
    first = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    first.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    return calls


def test_no_grad_forwards_run_the_fused_copy_and_agree_with_the_module_while_grad_forwards_stay() -> None:
    teacher, reference = _bn_teacher(), _bn_teacher()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        expected = reference(x)
    x_grad = x.clone().requires_grad_(True)
    reference(x_grad).square().sum().backward()
    keys = list(teacher.state_dict())

    assert route_no_grad_forwards(teacher, (2, 1, 28, 28)) is None
    calls = _batchnorm_calls(teacher)
    with torch.no_grad():
        got = teacher(x)
    assert calls == []  # the fused copy has no BatchNorm layer: the module's layers did not run
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(got, expected)  # folding reassociates the arithmetic: a different code path
    routed_grad = x.clone().requires_grad_(True)
    teacher(routed_grad).square().sum().backward()
    assert calls == [True]  # with grad: the module as loaded, hooks on its layers included
    assert torch.equal(routed_grad.grad, x_grad.grad)
    assert isinstance(teacher.forward, NoGradRoute) and list(teacher.state_dict()) == keys


def test_a_copy_or_a_pickle_of_a_routed_teacher_is_a_plain_module() -> None:
    teacher = _bn_teacher()
    assert route_no_grad_forwards(teacher, (2, 1, 28, 28)) is None
    x = torch.randn(4, 1, 28, 28)
    for clone in (copy.deepcopy(teacher), pickle.loads(pickle.dumps(teacher))):
        assert not isinstance(clone.forward, NoGradRoute) and clone.forward.__self__ is clone
        calls = _batchnorm_calls(clone)
        with torch.no_grad():
            clone(x)
        assert calls == [False]


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y  # a branch on data: torch.fx cannot trace it


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) + torch.randn(1)  # two calls never agree


def test_a_teacher_that_cannot_be_fused_faithfully_stays_as_loaded() -> None:
    torch.manual_seed(0)
    for model, reason in ((_DataDependent(), "torch.fx cannot trace it"), (_Noisy(), "differ")):
        model.eval().requires_grad_(False)
        explained = route_no_grad_forwards(model, (2, 1, 8, 8))
        assert explained is not None and reason in explained
        assert "forward" not in vars(model)


# The source's VGG applies its fourth pooling only to 64 px inputs, a branch on the input's shape.
UNTRACEABLE = {"vgg11_bn": "torch.fx cannot trace it"}


@pytest.mark.parametrize("arch", [*sorted(CLASSIFIERS.names()), "torchvision:resnet18"])
def test_every_builtin_classifier_is_fused_and_agrees_with_its_module(arch: str) -> None:
    torch.manual_seed(0)
    model = build_classifier(arch, num_classes=10, in_channels=3, image_size=32)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval().requires_grad_(False)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    reason = route_no_grad_forwards(model, (2, 3, 32, 32))
    if not any(isinstance(layer, nn.BatchNorm2d) for layer in model.modules()):
        assert reason == NOTHING_TO_FOLD and "forward" not in vars(
            model
        )  # LeNet-5: NHWC is channels_last's call
        return
    if arch in UNTRACEABLE:
        assert reason is not None and UNTRACEABLE[arch] in reason and "forward" not in vars(model)
        return
    assert reason is None
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


class _Flattening(nn.Module):
    """A LeNet-style head: ``.view`` of the feature map, which an NHWC map does not allow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.view(y.size(0), -1))


def test_a_teacher_whose_forward_needs_nchw_is_fused_in_nchw() -> None:
    torch.manual_seed(0)
    model = _Flattening().eval().requires_grad_(False)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    assert route_no_grad_forwards(model, (2, 1, 8, 8)) is None
    assert model.forward.inference.conv.weight.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_hooks_on_the_teacher_before_routing_see_only_its_grad_forwards() -> None:
    """BNStatistics hooks the teacher when the method is built, before the engine routes it; the layers of
    the fused copy that keep their BatchNorm (wrn's pre-activation bn1) must not bring the hooks along."""
    torch.manual_seed(0)
    model = (
        build_classifier("wrn16_1", num_classes=10, in_channels=3, image_size=32).eval().requires_grad_(False)
    )
    calls: list[bool] = []
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    assert route_no_grad_forwards(model, (2, 3, 32, 32)) is None
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.forward.inference.modules())
    calls.clear()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert calls == []
    model(torch.randn(2, 3, 32, 32).requires_grad_(True))
    assert calls and all(calls)
