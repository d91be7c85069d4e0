"""DFQ-style adversarial data-free KD (Choi et al. 2020 as in the Fast-Datafree/CMI toolkit
``scripts/dfq_cifar.sh``, and MosaicKD ``kd_datafree.py``; spec/methods.md §6.4).

A generator is trained to produce images the teacher is confident on (one-hot), whose classes are balanced,
whose feature statistics match the teacher's BN running statistics, and on which the student disagrees with
the teacher (adversarial). The student then distils the teacher on fresh generator samples.

Per outer iteration (one ``train_step``; the toolkit's ``synthesize()`` + ``train()`` block)::

    repeat generator_steps (1) times:                             S in eval mode (toolkit), G in train mode
        z ~ N(0, I_nz);  x = N(G(z));  t = T(x);  s = S(x);  p̄ = mean_i softmax(t_i)
        L_G = −adv·kldiv(s, t, τ) + oh·CE(t, argmax t) + balance·Σ_c p̄_c log p̄_c + bn·L_BN
        G ← Adam step
    repeat kd_steps (10) times:                              G in eval mode (toolkit ``sample()``)
        z ~ N(0, I_nz);  x = N(G(z)) (no grad);  L_S = kldiv(S(x), T(x), τ)    S ← SGD step
    S scheduler step (cosine over the run, eta_min 2e-4)

Toolkit defaults: adv 1, bn 1 (per-layer sum, §1.3), oh 1, balance 20 (natural log), τ 1, nz 256, the CMI
generator (τ: for DFQ the toolkit's ``datafree_kd.py`` replaces its ``KLDiv(T=args.T)`` with ``KLDiv()``, so
the ``--T 20`` of its scripts never reaches the student or the adversarial term). The toolkit builds its
synthesizer with ``student=teacher`` (spec §6.7), which makes the adversarial term identically 0; here the
real student is used, as in MosaicKD ``kd_datafree.py``.

MosaicKD ``kd_datafree.py`` flavour (README: oh 1, ie 20, bn 1, adv 1): ``generator=mosaickd nz=100
bn_variant=concat balance_log_base=10 temperature=1 generator_steps=1 kd_steps=5 batch_size=128
optim.student='{name: adam, lr: 1e-3, weight_decay: 1e-4, schedule: cosine, eta_min: 0}'
optim.generator='{name: adam, lr: 1e-3, betas: [0.9, 0.999], schedule: cosine}' student_eval_in_g_step=false
generator_eval_for_kd=false`` (its cosines step per epoch, here per iteration).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from rayoodkd.methods.base import Method, MethodConfig, Metrics, RunContext, Streams, kd_loss
from rayoodkd.methods.losses import (
    BNStatistics,
    BNVariant,
    balance_loss,
    onehot_loss,
    require_batchnorm,
    to_unit,
)
from rayoodkd.methods.optim import OptimizerConfig, adam, sgd
from rayoodkd.methods.registry import METHODS
from rayoodkd.models import build_generator


class DFQOptimizers(MethodConfig):
    """The toolkit's: the student's cosine runs over the data-free budget to eta_min 2e-4; G's lr is
    constant."""

    student: OptimizerConfig = sgd(0.1, weight_decay=1e-4, schedule="cosine", eta_min=2e-4)
    generator: OptimizerConfig = adam(1e-3, betas=(0.5, 0.999))


class DFQConfig(MethodConfig):
    """DFQ hyper-parameters (defaults: the toolkit's ``dfq_cifar.sh``, spec §6.4)."""

    generator: str = "cmi"
    nz: int = Field(256, ge=1)
    ngf: int = Field(64, ge=1)
    batch_size: int = Field(256, ge=2, description="synthetic images per G and S step (per worker)")
    generator_steps: int = Field(1, ge=0, description="G steps per outer iteration")
    kd_steps: int = Field(10, ge=1, description="student steps per outer iteration")
    adv: float = Field(1.0, ge=0, description="weight of −kldiv(s, t, adv_temperature) (real student, §6.7)")
    bn: float = Field(1.0, ge=0, description="weight of the teacher BN-statistics loss")
    oh: float = Field(1.0, ge=0, description="weight of CE(t, argmax t)")
    balance: float = Field(20.0, ge=0, description="weight of Σ_c p̄_c log p̄_c ('ie' in MosaicKD)")
    bn_variant: BNVariant = Field("sum", description="'sum' (toolkit) or 'concat' (MosaicKD), spec §1.3")
    balance_log_base: Literal["e", "10"] = Field("e", description="'e' (toolkit) or '10' (MosaicKD)")
    temperature: float = Field(1.0, gt=0, description="τ of the student KD (toolkit: 1, see the module doc)")
    adv_temperature: float = Field(1.0, gt=0, description="τ of the adversarial term (toolkit, MosaicKD: 1)")
    optim: DFQOptimizers = DFQOptimizers()
    student_eval_in_g_step: bool = Field(True, description="toolkit: S.eval() while synthesising")
    generator_eval_for_kd: bool = Field(
        True, description="CMI's sample(): G.eval() (BN running stats); Fast-Datafree's keeps G in train mode"
    )

    @field_validator("balance_log_base", mode="before")
    @classmethod
    def _base_as_text(cls, value: object) -> object:
        """``balance_log_base=10`` on the command line arrives as the number 10."""
        return "10" if isinstance(value, int) and value == 10 else value


@METHODS.register("dfq")
class DFQ(Method):
    """Adversarial DFKD with DAFL/DeepInversion generator priors (DFQ as benchmarked by the DFKD toolkit)."""

    name = "dfq"
    consumes = frozenset()
    Config = DFQConfig

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: DFQConfig, ctx: RunContext) -> None:
        super().__init__(teacher, student, cfg, ctx)
        require_batchnorm("dfq", "bn", cfg.bn, teacher)
        self.generator = build_generator(
            cfg.generator, nz=cfg.nz, ngf=cfg.ngf, image_size=ctx.image_size, channels=ctx.channels
        ).to(ctx.device)
        self.output_space = self.generator.output_space
        self.bn_stats = BNStatistics(teacher, cfg.bn_variant)
        self.log_base = math.e if cfg.balance_log_base == "e" else 10.0
        self.opt_s, self.sched_s = cfg.optim.student.build(student.parameters(), self.datafree_steps())
        self.opt_g, self.sched_g = cfg.optim.generator.build(
            self.generator.parameters(), self.datafree_steps()
        )
        self.latest: Tensor | None = None

    def datafree_steps(self) -> int:
        """The outer iterations the schedules anneal over."""
        return self.ctx.max_steps

    def players(self) -> dict[str, nn.Module]:
        return {"student": self.student, "generator": self.generator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.opt_s, "generator": self.opt_g}

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {"student": self.sched_s, "generator": self.sched_g}

    def _synthesize(self) -> Tensor:
        images = self.generator(self.ctx.randn(self.cfg.batch_size, self.cfg.nz))
        return self.ctx.normalize(images) if self.output_space == "unit" else images

    def generator_step(self) -> Metrics:
        """One G step on the DFQ objective (module docstring); returns its loss terms."""
        cfg: DFQConfig = self.cfg
        self.generator.train()
        self.student.train(not cfg.student_eval_in_g_step)
        with self.ctx.no_sync(self.student):
            with self.ctx.autocast():
                images = self._synthesize()
                t = self.teacher(images)
                loss_bn = self.bn_stats.loss()
                s = self.student(images)
            t, s = t.float(), s.float()
            loss_adv = -kd_loss(s, t, cfg.adv_temperature)
            loss_oh = onehot_loss(t)
            loss_balance = balance_loss(t, self.log_base)
            loss = cfg.adv * loss_adv + cfg.bn * loss_bn + cfg.oh * loss_oh + cfg.balance * loss_balance
            self.ctx.step(loss, self.opt_g, "generator")
        self.student.train()
        self.latest = images[:64].detach()
        return {
            "loss/generator": loss.detach(),
            "loss/adv": loss_adv.detach(),
            "loss/bn": loss_bn.detach(),
            "loss/oh": loss_oh.detach(),
            "loss/balance": loss_balance.detach(),
        }

    def student_step(self) -> Metrics:
        """One KD step of the student on fresh generator samples."""
        cfg: DFQConfig = self.cfg
        self.generator.train(not cfg.generator_eval_for_kd)
        with torch.no_grad(), self.ctx.autocast():
            images = self._synthesize()
            t = self.teacher(images)
        with self.ctx.autocast():
            s = self.student(images)
        loss = kd_loss(s.float(), t.float(), cfg.temperature)
        self.ctx.step(loss, self.opt_s, "student")
        self.generator.train()
        agreement = (s.argmax(1) == t.argmax(1)).float().mean()
        return {"loss/kd": loss.detach(), "train/agreement": agreement}

    def train_step(self, data: Streams) -> Metrics:
        cfg: DFQConfig = self.cfg
        metrics: Metrics = {}
        for _ in range(cfg.generator_steps):
            metrics.update(self.generator_step())
        for _ in range(cfg.kd_steps):
            metrics.update(self.student_step())
        self.sched_s.step()
        self.sched_g.step()
        return {
            **metrics,
            "lr/student": self.opt_s.param_groups[0]["lr"],
            "images": float(cfg.kd_steps * cfg.batch_size),
        }

    def samples(self) -> Tensor | None:
        return None if self.latest is None else to_unit(self.latest, self.output_space, self.ctx)
