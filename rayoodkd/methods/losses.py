"""Loss terms shared by the data-free methods (spec/methods.md §1.3, §1.4, §6.4, §6.5), exactly as coded.

* :class:`BNStatistics` — the "DeepInversion" feature-statistics regulariser: forward hooks on every
  ``nn.BatchNorm2d`` of a network, in its two coded variants (per-layer sum with the biased variance, or one
  norm over the concatenation with the unbiased variance).
* :func:`jsdiv` — Fast-Datafree/MosaicKD's "JS-like" divergence, with the batchmean reduction or TA-DFKD's
  ``nn.KLDivLoss()`` default ``'mean'``.
* Generator priors: :func:`onehot_loss` (DFQ/DAFL "oh"), :func:`balance_loss` (DAFL "information entropy"),
  :func:`tv_prior` and :func:`l2_prior` (DeepInversion image priors).
* :func:`to_unit` maps a synthetic batch back to [0, 1] for sample grids and the DeepInversion pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayoodkd.methods.base import RunContext

BNVariant = Literal["sum", "concat"]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has at least one ``nn.BatchNorm2d`` layer."""
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def require_batchnorm(method: str, key: str, weight: float, teacher: nn.Module) -> None:
    """Raise a clear error when a BN-statistics weight is positive but the teacher has no BN layer."""
    if weight > 0 and not has_batchnorm(teacher):
        raise ValueError(
            f"{method}: {key} weight > 0 needs a teacher with BatchNorm2d layers; "
            f"set {method}.{key}=0 or use a BN teacher (e.g. teacher.recipe.arch=cnn_small)"
        )


def batch_statistics(x: Tensor, unbiased: bool) -> tuple[Tensor, Tensor]:
    """Per-channel mean and variance of ``x: [N, C, H, W]`` over (N, H, W)."""
    flat = x.float().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=unbiased)


class BNStatistics:
    """L_BN of the latest forward of ``model``, from hooks on every ``nn.BatchNorm2d`` (spec §1.3).

    ``variant="sum"`` (DeepInversion, Fast-Datafree, TA-DFKD)::

        L_BN = Σ_l ( ‖σ²_l − running_var_l‖₂ + ‖μ_l − running_mean_l‖₂ )      σ² biased

    ``variant="concat"`` (MosaicKD ``kd_datafree.py``, AuG-KD)::

        L_BN = ‖cat_l μ_l − cat_l running_mean_l‖₂ + ‖cat_l σ²_l − cat_l running_var_l‖₂      σ² unbiased

    μ_l, σ²_l are the statistics of the BN layer's *input*. Every forward overwrites them, so read
    :meth:`loss` right after the forward of the batch you mean (spec §1.3 pitfall). Forwards under
    ``torch.no_grad()`` record nothing: a fused teacher (``teacher_inference=fused``) runs them on a copy
    without these hooks, and the module's own no-grad forwards clear what was recorded.
    """

    def __init__(self, model: nn.Module, variant: BNVariant = "sum") -> None:
        self.variant = variant
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.stats: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            # Only forwards that can be backpropagated feed L_BN; skipping the no-grad ones (sample
            # selection, KD targets) saves a full-activation variance per BN layer per forward.
            self.stats[index] = (
                batch_statistics(inputs[0], unbiased=self.variant == "concat")
                if torch.is_grad_enabled()
                else None
            )

        return hook

    def loss(self) -> Tensor:
        """L_BN of the latest forward (a zero scalar when the network has no BatchNorm2d layer)."""
        if not self.layers:
            return torch.zeros(())
        if any(s is None for s in self.stats):
            raise RuntimeError(
                "BNStatistics.loss(): no grad-enabled forward has run through every hooked BN layer"
            )
        means = [s[0] for s in self.stats]  # type: ignore[index]
        variances = [s[1] for s in self.stats]  # type: ignore[index]
        running_means = [layer.running_mean.detach().float() for layer in self.layers]
        running_vars = [layer.running_var.detach().float() for layer in self.layers]
        if self.variant == "sum":
            return sum(
                torch.norm(rv - v, 2) + torch.norm(rm - m, 2)
                for m, v, rm, rv in zip(means, variances, running_means, running_vars, strict=True)
            )
        return torch.norm(torch.cat(means) - torch.cat(running_means), 2) + torch.norm(
            torch.cat(variances) - torch.cat(running_vars), 2
        )

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()


def jsdiv(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: Literal["batchmean", "mean"] = "batchmean",
) -> Tensor:
    """The "JS-like" divergence as coded (Fast-Datafree ``jsdiv``, MosaicKD ``criterions.jsdiv``; §1.4).

    P = softmax(s/τ), Q = softmax(t/τ), M = (P + Q)/2, then P, Q, M clamped to [0.01, 0.99] and
    ``0.5·kl_div(log P, M) + 0.5·kl_div(log Q, M)``, i.e. KL(M‖P) and KL(M‖Q). ``reduction="mean"`` is
    TA-DFKD's ``nn.KLDivLoss()`` default: an average over B·C elements (≈ C× smaller than batchmean).
    """
    p = F.softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    m = 0.5 * (p + q)
    p, q, m = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99), m.clamp(0.01, 0.99)
    # 'mean' spelled out: PyTorch warns that kl_div's 'mean' will turn into 'batchmean' in a future release.
    divisor = p.shape[0] if reduction == "batchmean" else p.numel()
    total = F.kl_div(p.log(), m, reduction="sum") + F.kl_div(q.log(), m, reduction="sum")
    return 0.5 * total / divisor


def onehot_loss(teacher_logits: Tensor) -> Tensor:
    """DAFL/DFQ one-hot loss: CE(t, argmax t), the teacher's confidence in its own prediction."""
    return F.cross_entropy(teacher_logits, teacher_logits.argmax(1))


def balance_loss(teacher_logits: Tensor, log_base: float = math.e) -> Tensor:
    """DAFL information-entropy term Σ_c p̄_c log p̄_c (p̄ = batch-mean softmax); minimising spreads classes.

    The toolkit (Fast-Datafree) uses the natural log, MosaicKD ``kd_datafree.py`` log₁₀, MosaicKD log₂.
    """
    p = F.softmax(teacher_logits, dim=1).mean(0)
    # A class no sample gives any probability (p̄_c underflows to 0 with very confident teachers) adds
    # 0·log 0 = 0, not NaN, and no NaN gradient: the log is taken of p̄ clamped to the smallest normal.
    return (p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum() / math.log(log_base)


def tv_prior(images: Tensor) -> Tensor:
    """DeepInversion ``get_image_prior_losses`` (the L2 one): Frobenius norms of the horizontal, vertical
    and both diagonal pixel-difference maps, summed over the whole batch."""
    diff_w = images[:, :, :, :-1] - images[:, :, :, 1:]
    diff_h = images[:, :, :-1, :] - images[:, :, 1:, :]
    diff_d1 = images[:, :, 1:, :-1] - images[:, :, :-1, 1:]
    diff_d2 = images[:, :, :-1, :-1] - images[:, :, 1:, 1:]
    return torch.norm(diff_w) + torch.norm(diff_h) + torch.norm(diff_d1) + torch.norm(diff_d2)


def l2_prior(images: Tensor) -> Tensor:
    """‖x‖₂ of the whole batch (DeepInversion/TA-DFKD ``torch.norm(inputs, 2)``)."""
    return torch.norm(images, 2)


def to_unit(images: Tensor, space: Literal["unit", "normalized"], ctx: RunContext) -> Tensor:
    """A synthetic batch as images in [0, 1] on the CPU: ``normalized`` ones are mapped back with the
    teacher's mean/std and clamped."""
    images = images.detach().float()
    if space == "normalized":
        mean = torch.tensor(ctx.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(ctx.std, device=images.device).view(1, -1, 1, 1)
        images = images * std + mean
    return images.clamp(0, 1).cpu()
