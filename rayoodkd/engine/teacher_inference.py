"""The frozen teacher's no-grad forwards through a copy built for inference (issue #19).

Every method calls ``teacher(x)``. Most calls run under ``torch.no_grad()`` (KD targets, sample selection,
evaluation); a few need gradients through the teacher to its input (a generator's loss). With
``teacher_inference=fused`` (the default) the first kind runs a copy of the teacher with every BatchNorm
folded into the convolution before it (``torch.fx``) and channels-last weights, compiled with inductor's
weight freezing when ``compile=true``. The second kind, the teacher's other methods (``forward_features``,
…) and hooks on its layers stay on the module as loaded. The weights are the same numbers; the arithmetic
is reassociated (logits agree to ~1e-5 in fp32).

The copy is a snapshot: the teacher must not change after routing (the engine never changes it).
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from rayoodkd.errors import one_line

# Why a teacher stays as loaded without a console line: the copy would differ only in memory format, which
# ``channels_last`` already decides (LeNet-5 has no BatchNorm).
NOTHING_TO_FOLD = "it has no BatchNorm right after a convolution"

# In float64 the fused copy gives the module's logits up to reassociation (~1e-12 of their scale); anything
# further off means the trace did not capture what the module does (Python-side state, randomness).
_AGREEMENT = 1e-6


def _class_forward(module: nn.Module) -> Any:
    return type(module).forward.__get__(module)


class NoGradRoute:
    """``teacher.forward`` while routed: no-grad calls to the inference copy, the others to the class's
    forward. A copy of the routed teacher (``copy.deepcopy``, pickling) is a plain module again."""

    def __init__(self, teacher: nn.Module, inference: nn.Module, compile: bool) -> None:
        self.teacher = weakref.ref(teacher)  # the teacher holds this object: no reference cycle
        self.inference = torch.compile(inference, options={"freezing": True}) if compile else inference
        self.grad_forward = torch.compile(type(teacher).forward) if compile else type(teacher).forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return self.grad_forward(self.teacher(), *args, **kwargs)
        return self.inference(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # copy.deepcopy registers the teacher's copy in memo before copying its __dict__ (where this lives).
        clone = memo.get(id(self.teacher()))
        return self if clone is None else _class_forward(clone)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _class_forward, (self.teacher(),)


def _without_hooks(module: nn.Module) -> nn.Module:
    """``module`` with the forward hooks its layers brought from the teacher (``fuse`` deep-copies them)
    removed: they belong to the module as loaded (``BNStatistics``)."""
    for layer in module.modules():
        for hooks in (layer._forward_hooks, layer._forward_pre_hooks, layer._forward_hooks_with_kwargs):
            hooks.clear()
    return module


def _float64_on_cpu(module: nn.Module) -> nn.Module:
    """A copy of ``module`` without hooks, in float64 on the CPU: no TF32, no device-dependent kernels."""
    return _without_hooks(copy.deepcopy(module)).to("cpu", torch.float64)


def route_no_grad_forwards(
    teacher: nn.Module, example_shape: tuple[int, ...], compile: bool = False
) -> str | None:
    """Route ``teacher``'s no-grad forwards through a fused copy (in place; the module keeps its identity,
    class, parameters and state-dict keys), channels-last when its forward allows it. ``example_shape`` is
    the shape of the small batch the copy must reproduce the module's logits on (the same batch on every
    rank). Returns None when routed, else why not (the teacher is then left as it was)."""
    try:
        inference = _without_hooks(fuse(teacher))
    except Exception as error:  # torch.fx cannot trace every module (Python control flow on the input)
        return f"torch.fx cannot trace it ({one_line(error)})"
    if _batchnorm_count(inference) == _batchnorm_count(teacher):
        return NOTHING_TO_FOLD
    example = torch.rand(example_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        try:
            expected = _float64_on_cpu(teacher)(example)
        except Exception as error:  # a teacher that runs only on its device or in its own dtype
            return f"it does not run in float64 on the CPU for the check ({one_line(error)})"
        reason = ""
        for memory_format in (torch.channels_last, torch.contiguous_format):
            inference.to(memory_format=memory_format)
            try:
                got = _float64_on_cpu(inference)(example.contiguous(memory_format=memory_format))
            except Exception as error:  # e.g. a .view() of an NHWC feature map: try NCHW, then give up
                reason = f"its traced copy does not run ({one_line(error)})"
                continue
            scale = expected.abs().max().clamp_min(1.0)
            if got.shape != expected.shape or (got - expected).abs().max() > _AGREEMENT * scale:
                return "the traced copy's logits differ from the module's"
            teacher.forward = NoGradRoute(teacher, inference, compile)
            return None
    return reason


def _batchnorm_count(module: nn.Module) -> int:
    return sum(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in module.modules())
