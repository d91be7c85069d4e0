"""DFAD — Data-Free Adversarial Distillation (Fang et al. 2019; ``VainF/Data-Free-Adversarial-Distillation``
``DFAD_cifar.py``, spec/methods.md §6.3).

A generator G and the student S play a min-max game on the teacher–student logit discrepancy: S minimises
the mean absolute logit difference on G's images, G maximises it. No real image, no prior, no BN term.

Per outer iteration (one ``train_step``)::

    repeat kd_steps (5) times:
        z ~ N(0, I_nz);  x = G(z).detach();  t = T(x);  s = S(x)
        L_S = L1(s, t) = mean |s − t|                 S ← SGD step
    z ~ N(0, I_nz);  x = G(z);  t = T(x);  s = S(x)    (t not detached: gradients reach G through T and S)
    L_G = −L1(s, t)                                    G ← Adam step
    schedulers step (MultiStepLR ×0.1 at 20 % and 40 % of the run = epochs 100/200 of 500)

G is ``GeneratorA`` (Tanh → affine-free BN: its output is already in the teacher's normalised space). G and
S stay in train mode throughout, as in the official script.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from rayoodkd.methods.base import Method, MethodConfig, Metrics, RunContext, Streams
from rayoodkd.methods.losses import to_unit
from rayoodkd.methods.optim import OptimizerConfig, adam, sgd
from rayoodkd.methods.registry import METHODS
from rayoodkd.models import build_generator


class DFADOptimizers(MethodConfig):
    """The official ``--scheduler``: both learning rates × 0.1 at 20 % and 40 % of max_steps (100/500,
    200/500 epochs)."""

    student: OptimizerConfig = sgd(0.1, weight_decay=5e-4, schedule="multistep", milestones=(0.2, 0.4))
    generator: OptimizerConfig = adam(1e-3, schedule="multistep", milestones=(0.2, 0.4))


class DFADConfig(MethodConfig):
    """DFAD hyper-parameters (defaults: ``DFAD_cifar.py`` with ``--scheduler``, spec §6.3)."""

    generator: str = Field("dfad", description="registered generator; 'dfad' is GeneratorA")
    nz: int = Field(256, ge=1)
    ngf: int = Field(64, ge=1)
    batch_size: int = Field(256, ge=2, description="synthetic images per G and S step (per worker)")
    kd_steps: int = Field(5, ge=1, description="S steps per G step")
    optim: DFADOptimizers = DFADOptimizers()


@METHODS.register("dfad")
class DFAD(Method):
    """Data-free adversarial distillation: L1 logit matching against a logit-discrepancy-maximising G."""

    name = "dfad"
    consumes = frozenset()
    Config = DFADConfig

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: DFADConfig, ctx: RunContext) -> None:
        super().__init__(teacher, student, cfg, ctx)
        self.generator = build_generator(
            cfg.generator, nz=cfg.nz, ngf=cfg.ngf, image_size=ctx.image_size, channels=ctx.channels
        ).to(ctx.device)
        self.output_space = self.generator.output_space
        self.opt_s, self.sched_s = cfg.optim.student.build(student.parameters(), ctx.max_steps)
        self.opt_g, self.sched_g = cfg.optim.generator.build(self.generator.parameters(), ctx.max_steps)
        self.latest: Tensor | None = None

    def players(self) -> dict[str, nn.Module]:
        return {"student": self.student, "generator": self.generator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.opt_s, "generator": self.opt_g}

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {"student": self.sched_s, "generator": self.sched_g}

    def _synthesize(self) -> Tensor:
        images = self.generator(self.ctx.randn(self.cfg.batch_size, self.cfg.nz))
        return self.ctx.normalize(images) if self.output_space == "unit" else images

    def train_step(self, data: Streams) -> Metrics:
        cfg: DFADConfig = self.cfg
        self.student.train()
        self.generator.train()
        for _ in range(cfg.kd_steps):
            with torch.no_grad(), self.ctx.autocast():
                images = self._synthesize()
                t = self.teacher(images)
            with self.ctx.autocast():
                s = self.student(images)
            loss_s = F.l1_loss(s.float(), t.float())
            self.ctx.step(loss_s, self.opt_s, "student")

        with self.ctx.no_sync(self.student):
            with self.ctx.autocast():
                images = self._synthesize()
                t = self.teacher(images)
                s = self.student(images)
            loss_g = -F.l1_loss(s.float(), t.float())
            self.ctx.step(loss_g, self.opt_g, "generator")
        self.latest = images[:64].detach()
        self.sched_s.step()
        self.sched_g.step()
        return {
            "loss/student": loss_s.detach(),
            "loss/generator": loss_g.detach(),
            "train/agreement": (s.argmax(1) == t.argmax(1)).float().mean(),
            "lr/student": self.opt_s.param_groups[0]["lr"],
            "lr/generator": self.opt_g.param_groups[0]["lr"],
            "images": float(cfg.kd_steps * cfg.batch_size),
        }

    def samples(self) -> Tensor | None:
        return None if self.latest is None else to_unit(self.latest, self.output_space, self.ctx)
