"""The frozen teacher's no-grad forwards through a copy built for inference (issue #19).

Every method calls ``teacher(x)``. Most calls run under ``torch.no_grad()`` (KD targets, sample selection,
evaluation); a few need gradients through the teacher to its input (a generator's loss). With
``teacher_inference=fused`` (the default) the first kind runs a copy of the teacher with every BatchNorm
folded into the convolution before it (``torch.fx``) and channels-last weights, compiled with inductor's
weight freezing when ``compile=true``. The second kind, the teacher's other methods (``forward_features``,
…) and hooks on its layers stay on the module as loaded. The weights are the same numbers; the arithmetic
is reassociated (logits agree to ~1e-5 in fp32).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse

# The fused copy must give the loaded teacher's logits up to reassociation; anything further off means the
# trace did not capture what the module does (Python-side state, data-dependent branches).
_AGREEMENT = 1e-3


def _class_forward(module: nn.Module) -> Callable[..., Any]:
    return types.MethodType(type(module).forward, module)


class NoGradRoute:
    """``teacher.forward`` while routed: no-grad calls to the inference copy, the others to the class's
    forward. A copy of the routed teacher (``copy.deepcopy``, pickling) is a plain module again."""

    def __init__(self, teacher: nn.Module, inference: Callable[..., Any], grad_forward: Callable[..., Any]):
        self.teacher = teacher
        self.inference = inference
        self.grad_forward = grad_forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return self.grad_forward(*args, **kwargs)
        return self.inference(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # copy.deepcopy registers the teacher's copy in memo before copying its __dict__ (where this lives).
        clone = memo.get(id(self.teacher))
        return self if clone is None else _class_forward(clone)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _class_forward, (self.teacher,)


def route_no_grad_forwards(teacher: nn.Module, example: Tensor, compile: bool = False) -> str | None:
    """Route ``teacher``'s no-grad forwards through a fused, channels-last copy (in place; the module keeps
    its identity, class, parameters and state-dict keys). ``example`` is a small input batch for the
    agreement check. Returns None when routed, else why not (the teacher is then left as it was)."""
    try:
        inference = fuse(teacher).to(memory_format=torch.channels_last)
    except Exception as error:  # torch.fx cannot trace every module; any failure leaves the module as is
        return f"torch.fx cannot trace it ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    with torch.no_grad():
        expected, got = teacher(example).float(), inference(example).float()
    tolerance = _AGREEMENT * expected.abs().max().clamp_min(1.0)
    if expected.shape != got.shape or (got - expected).abs().max() > tolerance:
        return "the traced copy's logits differ from the module's (its forward is not a static graph)"
    grad_forward = _class_forward(teacher)
    if compile:
        inference = torch.compile(inference, options={"freezing": True})
        grad_forward = torch.compile(grad_forward)
    teacher.forward = NoGradRoute(teacher, inference, grad_forward)
    return None
