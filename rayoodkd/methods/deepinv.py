"""DeepInversion / ADI (Yin et al., CVPR 2020) as in the Fast-Datafree/CMI toolkit
``datafree/synthesis/deepinversion.py`` (spec/methods.md §6.5).

There is no generator: each outer iteration optimises the *pixels* of a fresh batch so that the teacher's
BN statistics, confident targets and image priors are matched and the student disagrees with the teacher
(ADI's competition term), keeps the best batch in an image pool, and distils the student on the pool.

Per outer iteration (one ``train_step``)::

    x ~ N(0, I) [B, C, H, W] (normalised space);  y = sort(randint(num_classes, B));  Adam(x) (optim.pixels)
    repeat inversion_steps times:                                                T and S in eval mode
        x̃ = flip?(roll(x, ±size/8))                                      one jitter and flip per batch
        L = bn·(L_BN^T(x̃) − student_bn·L_BN^S(x̃)) + oh·CE(T(x̃), y) − adv·jsdiv(S(x̃), T(x̃), τ=3)
            + tv·TV(x) + l2·‖x‖₂
        keep x if L is the lowest so far;  x ← Adam step;  clip x to the valid normalised range
    pool ← pool ∪ {best x as uint8 images}  (oldest dropped beyond pool_size)
    repeat kd_steps times:
        x ~ pool (B images, crop/flip augmented, normalised);  L_S = kldiv(S(x), T(x), τ)   S ← SGD step
    S scheduler step (cosine over the run, eta_min 2e-4)

Cost: one outer iteration is ``inversion_steps`` teacher+student forward/backward passes on B images (the
toolkit uses 1000 inversion steps with 400 KD steps per batch), so an outer iteration is 10²–10³× dearer than
a DFQ step; lower ``inversion_steps`` (and ``kd_steps``) for CPU demos. The pool is ``extra_state``: it
is checkpointed as uint8 (like the toolkit's PNG pool) and a resumed run continues exactly.

Deviation: the toolkit's ``best_inputs = inputs.data`` aliases the tensor Adam then updates in place, so it
keeps the post-step image; here the evaluated (best-loss) batch itself is kept.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from rayoodkd.augment import augment_batch
from rayoodkd.methods.base import Method, MethodConfig, Metrics, RunContext, Streams, kd_loss
from rayoodkd.methods.losses import (
    BNStatistics,
    BNVariant,
    jsdiv,
    l2_prior,
    require_batchnorm,
    to_unit,
    tv_prior,
)
from rayoodkd.methods.optim import OptimizerConfig, adam, sgd
from rayoodkd.methods.registry import METHODS


class DeepInvOptimizers(MethodConfig):
    """The toolkit's: the student's cosine over the run (eta_min 2e-4); the pixels' Adam, fresh for every
    synthesised batch (its schedule runs over ``inversion_steps``)."""

    student: OptimizerConfig = sgd(0.1, weight_decay=1e-4, schedule="cosine", eta_min=2e-4)
    pixels: OptimizerConfig = adam(0.1, betas=(0.5, 0.99))


class DeepInvConfig(MethodConfig):
    """DeepInversion hyper-parameters (defaults: the toolkit's DeepInv-2k script, spec §6.5)."""

    batch_size: int = Field(256, ge=2, description="images per synthesised batch and per KD step")
    inversion_steps: int = Field(
        1000, ge=1, description="pixel-optimisation iterations per synthesised batch"
    )
    kd_steps: int = Field(400, ge=1, description="student steps on the pool per synthesised batch")
    bn: float = Field(10.0, ge=0, description="weight of the BN-statistics loss (NVlabs script: 100)")
    student_bn: float = Field(
        0.001, ge=0, description="ADI: L_BN^T − student_bn·L_BN^S (0 when the student has no BN)"
    )
    oh: float = Field(1.0, ge=0, description="weight of CE(T(x), y) on the sampled targets")
    adv: float = Field(1.0, ge=0, description="ADI competition: weight of −jsdiv(S, T, τ=3)")
    adv_temperature: float = Field(3.0, gt=0)
    tv: float = Field(0.0, ge=0, description="weight of the TV prior (NVlabs CIFAR script: 2.5e-5)")
    l2: float = Field(0.0, ge=0, description="weight of ‖x‖₂")
    bn_variant: BNVariant = "sum"
    jitter: float = Field(0.125, ge=0, lt=1, description="max roll as a fraction of the image size")
    flip: bool = Field(True, description="random horizontal flip of the batch each iteration")
    pool_size: int = Field(
        51_200, ge=1, description="images kept (oldest dropped); 200 × 256 as in the toolkit"
    )
    augment: Literal["none", "crop", "crop_flip"] = Field("crop_flip", description="KD view of pool images")
    temperature: float = Field(20.0, gt=0, description="τ of the student KD")
    optim: DeepInvOptimizers = DeepInvOptimizers()


@METHODS.register("deepinv")
class DeepInversion(Method):
    """Pixel-space model inversion (BN statistics + one-hot + ADI competition) into a pool, then KD."""

    name = "deepinv"
    consumes = frozenset()
    Config = DeepInvConfig

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: DeepInvConfig, ctx: RunContext) -> None:
        super().__init__(teacher, student, cfg, ctx)
        require_batchnorm("deepinv", "bn", cfg.bn, teacher)
        self.bn_teacher = BNStatistics(teacher, cfg.bn_variant)
        self.bn_student = BNStatistics(student, cfg.bn_variant)
        self.opt_s, self.sched_s = cfg.optim.student.build(student.parameters(), ctx.max_steps)
        mean = torch.tensor(ctx.mean, device=ctx.device).view(1, -1, 1, 1)
        std = torch.tensor(ctx.std, device=ctx.device).view(1, -1, 1, 1)
        self.low, self.high = (0 - mean) / std, (1 - mean) / std
        self.pool = torch.zeros(0, ctx.channels, ctx.image_size, ctx.image_size, dtype=torch.uint8)
        self.latest: Tensor | None = None

    def players(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.opt_s}

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {"student": self.sched_s}

    def _randint(self, low: int, high: int, size: int = 1) -> Tensor:
        generator = self.ctx.generator
        return torch.randint(low, high, (size,), generator=generator, device=generator.device)

    def _jitter_flip(self, x: Tensor) -> Tensor:
        """DeepInversion ``jitter_and_flip``: one random roll (≤ ``jitter``·size) and one flip per batch."""
        cfg: DeepInvConfig = self.cfg
        lim_h, lim_w = int(x.shape[-2] * cfg.jitter), int(x.shape[-1] * cfg.jitter)
        off_h, off_w = int(self._randint(-lim_h, lim_h + 1)), int(self._randint(-lim_w, lim_w + 1))
        flip = bool(self._randint(0, 2))
        x = torch.roll(x, shifts=(off_h, off_w), dims=(2, 3))
        return x.flip(3) if cfg.flip and flip else x

    def synthesize(self) -> tuple[Tensor, Metrics]:
        """Optimise one batch of pixels for ``inversion_steps``; return the best batch (normalised) and its
        losses."""
        cfg: DeepInvConfig = self.cfg
        ctx = self.ctx
        self.student.eval()
        inputs = ctx.randn(cfg.batch_size, ctx.channels, ctx.image_size, ctx.image_size).requires_grad_()
        targets = self._randint(0, ctx.num_classes, cfg.batch_size).sort().values.to(ctx.device)
        optimizer, scheduler = cfg.optim.pixels.build([inputs], cfg.inversion_steps)
        best_cost, best_inputs, best_terms = float("inf"), inputs.detach().clone(), {}
        with ctx.no_sync(self.student):
            for _ in range(cfg.inversion_steps):
                with ctx.autocast():
                    augmented = self._jitter_flip(inputs)
                    t = self.teacher(augmented)
                    loss_bn = self.bn_teacher.loss()
                    s = self.student(augmented)
                    loss_bn_s = self.bn_student.loss()
                t, s = t.float(), s.float()
                loss_oh = F.cross_entropy(t, targets)
                loss_adv = -jsdiv(s, t, cfg.adv_temperature)
                loss_tv, loss_l2 = tv_prior(inputs), l2_prior(inputs)
                loss = (
                    cfg.bn * (loss_bn - cfg.student_bn * loss_bn_s)
                    + cfg.oh * loss_oh
                    + cfg.adv * loss_adv
                    + cfg.tv * loss_tv
                    + cfg.l2 * loss_l2
                )
                # A non-finite first cost is still recorded, so the engine's NaN stop sees it in the logged
                # losses instead of an empty dict.
                cost = loss.item()
                if cost < best_cost or not best_terms:
                    best_cost, best_inputs = cost, inputs.detach().clone()
                    best_terms = {
                        "loss/synthesis": loss.detach(),
                        "loss/bn": loss_bn.detach(),
                        "loss/bn_student": float(loss_bn_s),
                        "loss/oh": loss_oh.detach(),
                        "loss/adv": loss_adv.detach(),
                        "loss/tv": loss_tv.detach(),
                        "loss/l2": loss_l2.detach(),
                    }
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    inputs.copy_(torch.maximum(torch.minimum(inputs, self.high), self.low))
        self.student.train()
        return best_inputs, best_terms

    def add_to_pool(self, images: Tensor) -> None:
        """Append normalised images to the pool as uint8 in [0, 255], dropping the oldest beyond pool_size."""
        unit = to_unit(images, "normalized", self.ctx)
        quantised = (unit * 255).round().to(torch.uint8)
        self.pool = torch.cat([self.pool, quantised])[-self.cfg.pool_size :]

    def student_step(self) -> Metrics:
        """One KD step on a random batch of the pool."""
        cfg: DeepInvConfig = self.cfg
        ctx = self.ctx
        index = torch.randperm(len(self.pool), generator=ctx.generator, device=ctx.generator.device)
        batch = self.pool[index[: cfg.batch_size].cpu()].to(ctx.device, torch.float32) / 255
        images = ctx.normalize(augment_batch(batch, cfg.augment, ctx.generator))
        with torch.no_grad(), ctx.autocast():
            t = self.teacher(images)
        with ctx.autocast():
            s = self.student(images)
        loss = kd_loss(s.float(), t.float(), cfg.temperature)
        ctx.step(loss, self.opt_s, "student")
        return {"loss/kd": loss.detach(), "train/agreement": (s.argmax(1) == t.argmax(1)).float().mean()}

    def train_step(self, data: Streams) -> Metrics:
        cfg: DeepInvConfig = self.cfg
        best, metrics = self.synthesize()
        self.add_to_pool(best)
        self.latest = best[:64]
        self.student.train()
        for _ in range(cfg.kd_steps):
            metrics.update(self.student_step())
        self.sched_s.step()
        images = float(cfg.kd_steps * min(cfg.batch_size, len(self.pool)))
        return {
            **metrics,
            "pool/size": float(len(self.pool)),
            "lr/student": self.opt_s.param_groups[0]["lr"],
            "images": images,
        }

    def extra_state(self) -> dict[str, Any]:
        return {"pool": self.pool.clone()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.pool = state["pool"].to(torch.uint8).cpu()

    def samples(self) -> Tensor | None:
        return None if self.latest is None else to_unit(self.latest, "normalized", self.ctx)
