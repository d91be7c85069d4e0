"""TA-DFKD — "Teacher as a Lenient Expert" (Shin & Choi, arXiv 2402.12406; ``bigdata-inha/TA-DFKD-Official``
``TA-DFKD-main-CIFAR.py`` and ``Sample_Selection.py``; spec/methods.md §4).

Adversarial data-free KD whose generator has **no class-prior (one-hot) loss**. The teacher instead acts as
a lenient expert: a 2-component GMM over its per-sample losses keeps only the samples it finds "clean"
(DivideMix-style), and only those feed the student and the generator's adversarial term.

Selection (``split``, §4.3) of a generated batch x = G(z) ∈ [0, 1]::

    ℓ_i = CE(T(N(x_i)), argmax T(N(x_i))) = −log max_c p_ic          testing view: normalise only
    ℓ ← (ℓ − min ℓ)/(max ℓ − min ℓ);  GMM(2, max_iter 10, tol 1e-2, reg_covar 5e-4).fit(ℓ)
    keep i  ⇔  P(clean component | ℓ_i) > gmm_threshold              clean = the component with smaller mean

Per outer iteration (one ``train_step``, §4.2)::

    repeat kd_steps (10) times:
        fill a batch of B selected training-view images: draw z, x = G(z).detach(), select, accumulate;
        the draw that overflows B is subsampled at random (at most max_draws draws; a warning past that)
        L_S = L1(S(x_sel), T(x_sel))  (official; or kldiv with student_loss=kl)      S ← SGD step
    z ~ N(0, I_1000);  x = G(z);  x_tr = N(aug(x));  select once (no filling)
    t = T(x_tr[sel]);  s = S(x_tr[sel])       (BN statistics read from this forward: the selected samples)
    L_G = adv·(1 − clamp(JS_τ3(s, t), 0, 1)) + bn·L_BN + tv·TV(x_tr) + l2·‖x_tr‖₂           G ← Adam step
    S scheduler step (cosine over the run)

The training view ``aug`` is RandomCrop(pad size/8) (+ flip) applied to the *whole batch* at once, as the
official ``transforms`` on a 4-D tensor (``augment_whole_batch``). The GMM's ``random_state`` is drawn from
the rank's generator, so a resumed run selects exactly what an uninterrupted one would.

Deviations, each documented in docs/methods/datafree.md: the selection loop is bounded (``max_draws``); the
teacher scores a draw in one forward instead of chunks of 32 (the same values in eval mode); when no sample
is selected, the whole draw is used (so every rank still steps, which DDP needs); the student's cosine
schedule runs per outer iteration instead of per 36-iteration epoch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
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
from rayoodkd.models import build_generator

# DivideMix's GMM settings, as used by TA-DFKD ``Sample_Selection.split`` (spec §4.3).
GMM_SETTINGS = {"n_components": 2, "max_iter": 10, "tol": 1e-2, "reg_covar": 5e-4}


class TADFKDOptimizers(MethodConfig):
    """The official: the student's cosine over the run, G's lr constant."""

    student: OptimizerConfig = sgd(0.01, weight_decay=5e-4, schedule="cosine")
    generator: OptimizerConfig = adam(1e-3)


class TADFKDConfig(MethodConfig):
    """TA-DFKD hyper-parameters (defaults: the official CIFAR script and README, spec §4.4)."""

    nz: int = Field(1000, ge=1)
    ngf: int = Field(64, ge=1)
    dafl_bn_eps_quirk: bool = Field(True, description="DAFL's BatchNorm2d(c, 0.8): eps = 0.8 (spec §1.2)")
    batch_size: int = Field(1024, ge=2, description="selected images per student step (README: 1024)")
    kd_steps: int = Field(10, ge=1, description="S steps per G step")
    student_loss: Literal["l1", "kl"] = Field("l1", description="'l1' on logits (official) or kldiv")
    temperature: float = Field(1.0, gt=0, description="τ of kldiv when student_loss=kl")
    adv: float = Field(1.0, ge=0, description="weight of 1 − JSD(T, S)")
    bn: float = Field(10.0, ge=0, description="weight of the BN-statistics loss ('BNS')")
    tv: float = Field(1.5e-5, ge=0, description="R_tv (spec §4.5: possibly swapped with R_l2)")
    l2: float = Field(6e-3, ge=0, description="R_l2")
    bn_variant: BNVariant = "sum"
    js_temperature: float = Field(3.0, gt=0)
    js_reduction: Literal["mean", "batchmean"] = Field(
        "mean", description="'mean' over B·C as the official nn.KLDivLoss(), or 'batchmean'"
    )
    gmm_threshold: float = Field(0.5, gt=0, lt=1, description="keep samples with clean posterior above this")
    max_draws: int = Field(16, ge=1, description="bound on generator draws to fill one student batch")
    augment: Literal["none", "crop", "crop_flip"] = "crop_flip"
    augment_whole_batch: bool = Field(True, description="one crop/flip for the whole batch (official)")
    optim: TADFKDOptimizers = TADFKDOptimizers()


@dataclass
class Selection:
    """The outcome of :func:`gmm_select` on one batch."""

    mask: Tensor
    clean_posterior: Tensor
    clean_mean: float
    noisy_mean: float

    @property
    def fraction(self) -> float:
        return float(self.mask.float().mean())


def teacher_losses(teacher_logits: Tensor) -> Tensor:
    """Per-sample CE of the teacher against its own prediction: −log max_c p_ic."""
    return F.cross_entropy(teacher_logits.float(), teacher_logits.argmax(1), reduction="none")


def gmm_select(losses: Tensor, threshold: float, random_state: int) -> Selection:
    """TA-DFKD/DivideMix selection: fit a 2-component GMM on min-max normalised losses and keep the samples
    whose posterior of the smaller-mean ("clean") component exceeds ``threshold``.

    A batch whose losses are all equal (or of one sample) carries no evidence to split on: all are kept.
    """
    values = losses.detach().double().cpu().numpy()
    span = float(values.max() - values.min()) if len(values) else 0.0
    if len(values) < 2 or span <= 1e-12:
        ones = torch.ones(len(values), dtype=torch.bool, device=losses.device)
        return Selection(ones, ones.float(), 0.0, 0.0)
    # Imported here: scikit-learn takes ~1 s to import, in the driver and every worker of any method.
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    normalised = ((values - values.min()) / span).reshape(-1, 1)
    gmm = GaussianMixture(**GMM_SETTINGS, random_state=random_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(normalised)
    clean = int(np.argmin(gmm.means_[:, 0]))
    posterior = torch.from_numpy(gmm.predict_proba(normalised)[:, clean]).float().to(losses.device)
    return Selection(
        posterior > threshold, posterior, float(gmm.means_[clean, 0]), float(gmm.means_[1 - clean, 0])
    )


@dataclass
class FilledBatch:
    """A student batch assembled from selected samples of one or more generator draws."""

    images: Tensor
    draws: int
    bound_hit: bool


def fill_selected_batch(
    draw: Callable[[], tuple[Tensor, Tensor]],
    batch_size: int,
    max_draws: int,
    generator: torch.Generator,
) -> FilledBatch:
    """Accumulate the selected images of ``draw()`` (→ images, keep-mask) until exactly ``batch_size``.

    The draw that would overflow the batch is subsampled at random (official ``TA-DFKD-main``); after
    ``max_draws`` draws the batch is returned as it is (possibly short or empty) with ``bound_hit``.
    """
    chosen: list[Tensor] = []
    count = 0
    for draws in range(1, max_draws + 1):
        images, mask = draw()
        picked = images[mask]
        if count + len(picked) > batch_size:
            order = torch.randperm(len(picked), generator=generator, device=generator.device)
            picked = picked[order[: batch_size - count].to(picked.device)]
        chosen.append(picked)
        count += len(picked)
        if count == batch_size:
            return FilledBatch(torch.cat(chosen), draws, False)
    return FilledBatch(torch.cat(chosen), max_draws, True)


def batch_crop_flip(images: Tensor, mode: str, generator: torch.Generator) -> Tensor:
    """torchvision RandomCrop(size, padding=size/8) (+ RandomHorizontalFlip) on a 4-D tensor: one crop
    offset and one flip decision for the whole batch (zero padding)."""
    if mode == "none":
        return images
    height, width = images.shape[-2:]
    pad = max(1, height // 8)
    # One draw (one host sync on a GPU) of two offsets in [0, 2·pad], each with a fair coin in its lowest bit.
    draws = torch.randint(0, 2 * (2 * pad + 1), (2,), generator=generator, device=generator.device).tolist()
    top, left, flip = draws[0] // 2, draws[1] // 2, draws[1] % 2
    out = F.pad(images, (pad, pad, pad, pad))[:, :, top : top + height, left : left + width]
    return out.flip(3) if mode == "crop_flip" and flip else out


@METHODS.register("tadfkd")
class TADFKD(Method):
    """Teacher-agnostic DFKD: no class prior on G, GMM selection of clean samples by the teacher."""

    name = "tadfkd"
    consumes = frozenset()
    Config = TADFKDConfig

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: TADFKDConfig, ctx: RunContext) -> None:
        super().__init__(teacher, student, cfg, ctx)
        require_batchnorm("tadfkd", "bn", cfg.bn, teacher)
        self.generator = build_generator(
            "tadfkd",
            nz=cfg.nz,
            ngf=cfg.ngf,
            image_size=ctx.image_size,
            channels=ctx.channels,
            dafl_bn_eps_quirk=cfg.dafl_bn_eps_quirk,
        ).to(ctx.device)
        self.bn_stats = BNStatistics(teacher, cfg.bn_variant)
        self.opt_s, self.sched_s = cfg.optim.student.build(student.parameters(), ctx.max_steps)
        self.opt_g, self.sched_g = cfg.optim.generator.build(self.generator.parameters(), ctx.max_steps)
        self.selections: list[Selection] = []
        self.latest: Tensor | None = None

    def players(self) -> dict[str, nn.Module]:
        return {"student": self.student, "generator": self.generator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.opt_s, "generator": self.opt_g}

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {"student": self.sched_s, "generator": self.sched_g}

    def _views(self, fake: Tensor) -> tuple[Tensor, Tensor]:
        """(training view, testing view) of a generated batch in [0, 1]."""
        cfg: TADFKDConfig = self.cfg
        augment = batch_crop_flip if cfg.augment_whole_batch else augment_batch
        train = self.ctx.normalize(augment(fake, cfg.augment, self.ctx.generator))
        return train, self.ctx.normalize(fake)

    def select(self, test_view: Tensor) -> Selection:
        """GMM selection on the teacher's losses for ``test_view`` (recorded for the step's metrics)."""
        generator = self.ctx.generator
        random_state = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        with torch.no_grad(), self.ctx.autocast():
            logits = self.teacher(test_view)
        selection = gmm_select(teacher_losses(logits), self.cfg.gmm_threshold, random_state)
        self.selections.append(selection)
        return selection

    def _draw(self) -> tuple[Tensor, Tensor]:
        with torch.no_grad(), self.ctx.autocast():
            fake = self.generator(self.ctx.randn(self.cfg.batch_size, self.cfg.nz))
        train_view, test_view = self._views(fake.float())
        return train_view, self.select(test_view).mask

    def student_loss(self, s: Tensor, t: Tensor) -> Tensor:
        cfg: TADFKDConfig = self.cfg
        if cfg.student_loss == "kl":
            return kd_loss(s, t, cfg.temperature)
        return F.l1_loss(s, t)

    def student_step(self) -> Metrics:
        """Fill a batch of selected samples and take one student step on it."""
        cfg: TADFKDConfig = self.cfg
        filled = fill_selected_batch(self._draw, cfg.batch_size, cfg.max_draws, self.ctx.generator)
        images, fallback = filled.images, 0.0
        if filled.bound_hit:
            warnings.warn(
                "tadfkd: a student batch was not filled within max_draws generator draws; it trains on the "
                "samples selected so far (raise tadfkd.max_draws or lower tadfkd.gmm_threshold)",
                RuntimeWarning,
                stacklevel=2,
            )
            if len(images) == 0:
                images, fallback = self._draw()[0], 1.0
        with torch.no_grad(), self.ctx.autocast():
            t = self.teacher(images)
        with self.ctx.autocast():
            s = self.student(images)
        loss = self.student_loss(s.float(), t.float())
        self.ctx.step(loss, self.opt_s, "student")
        return {
            "loss/student": loss.detach(),
            "images": float(len(images)),
            "select/draws": float(filled.draws),
            "select/bound_hit": float(filled.bound_hit),
            "select/empty_fallback": fallback,
            "train/agreement": (s.argmax(1) == t.argmax(1)).float().mean(),
        }

    def generator_step(self) -> Metrics:
        """One G step: adversarial 1 − JSD on the selected samples, BN statistics, TV and L2 priors."""
        cfg: TADFKDConfig = self.cfg
        with self.ctx.no_sync(self.student):
            with self.ctx.autocast():
                fake = self.generator(self.ctx.randn(cfg.batch_size, cfg.nz)).float()
            train_view, test_view = self._views(fake)
            mask = self.select(test_view.detach()).mask
            selected = train_view[mask] if bool(mask.any()) else train_view
            with self.ctx.autocast():
                t = self.teacher(selected)
                loss_bn = self.bn_stats.loss()
                s = self.student(selected)
            js = jsdiv(s.float(), t.float(), cfg.js_temperature, cfg.js_reduction)
            loss_adv = 1 - js.clamp(0, 1)
            loss_tv, loss_l2 = tv_prior(train_view), l2_prior(train_view)
            loss = cfg.adv * loss_adv + cfg.bn * loss_bn + cfg.tv * loss_tv + cfg.l2 * loss_l2
            self.ctx.step(loss, self.opt_g, "generator")
        self.latest = fake[:64].detach()
        return {
            "loss/generator": loss.detach(),
            "loss/adv": loss_adv.detach(),
            "loss/js": js.detach(),
            "loss/bn": loss_bn.detach(),
            "loss/tv": loss_tv.detach(),
            "loss/l2": loss_l2.detach(),
            "select/g_batch": float(len(selected)),
        }

    def train_step(self, data: Streams) -> Metrics:
        cfg: TADFKDConfig = self.cfg
        self.student.train()
        self.generator.train()
        self.selections = []
        steps = [self.student_step() for _ in range(cfg.kd_steps)]
        metrics = self.generator_step()
        self.sched_s.step()
        self.sched_g.step()
        for key in ("loss/student", "select/draws", "train/agreement"):
            metrics[key] = sum(step[key] for step in steps) / len(steps)
        for key in ("images", "select/bound_hit", "select/empty_fallback"):
            metrics[key] = sum(step[key] for step in steps)
        metrics["select/fraction"] = float(np.mean([sel.fraction for sel in self.selections]))
        metrics["select/gmm_mean_clean"] = float(np.mean([sel.clean_mean for sel in self.selections]))
        metrics["select/gmm_mean_noisy"] = float(np.mean([sel.noisy_mean for sel in self.selections]))
        metrics["lr/student"] = self.opt_s.param_groups[0]["lr"]
        return metrics

    def samples(self) -> Tensor | None:
        return None if self.latest is None else to_unit(self.latest, "unit", self.ctx)
