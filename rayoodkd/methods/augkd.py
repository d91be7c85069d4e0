"""AuG-KD — anchor-based mixup generation for out-of-domain KD (Tang et al., ICLR 2024; spec/methods.md §3).

The teacher T was trained on a teacher domain; the student S must work on a student domain of which only a
small labelled set is available (``data.labelled``). Three stages, run in order:

**1. ``datafree``** (``datafree_steps`` iterations; G, S and the encoder E train together)::

    z ~ N(0, I);  x = G(z) ∈ [0, 1];  t = T(N(x));  s = S(N(x));  p̄ = mean_i softmax(t_i)
    L_G = −kldiv(s, t, 1) + CE(t, argmax t) + 20·Σ_c p̄_c log₁₀ p̄_c + L_BN(concat)          G ← Adam
    repeat inner_steps (5): fresh z, x = G(z), t = T(N(x)) without grad
        L_S = kldiv(S(N(x)), t, 1)                                                          S ← Adam
        (ẑ, μ, log σ²) = E(x, argmax t);  L_E = ‖ẑ − z‖² + 0.00025·KL(N(μ, σ²) ‖ N(0, I))    E ← Adam

  Selection (``reload_best``): the lowest G loss on a fixed pool of latents (``val/generator_loss``).

**2. ``anchor``** (``anchor_epochs`` epochs of the labelled set; only the AnchorNet A trains)::

    z = E(x, y);  (z_a, m) = A(z, y);  t = T(N(G(z_a)))
    L_A = energy(t) + mask_constraint(m) + 0.1·CE(t, y)          energy(t) = −τ·logsumexp(t/τ), τ = 1

  so that A maps student-domain latents to anchors the teacher is certain about. Selection: the lowest
  ``val/anchor_loss`` on ``data.val`` (the student-domain validation split).

**3. ``mixup``** (``mixup_epochs`` epochs; only S trains, from the stage-1 student)::

    s = f(epoch; a, b)   linear: min((1−b)·epoch/(a·E) + b, 1);  step: min(b + (1−b)·⌊10·epoch/(a·E)⌋/10, 1)
    z = E(x, y);  z_mix = (1 − s)·A(z, y) + s·z;  x_mix = (1 − s)·G(z_mix) + s·x
    inputs = [N(x), N(x_mix)], labels [y, y]
    L = u·CE(S(inputs), labels) + (1 − u)·kldiv(S(inputs), T(inputs), τ)      u = 0.5, τ = 10

  Early on (s ≈ b) the student mostly sees teacher-domain anchors; from epoch a·E on, only real images.
  Selection: ``val/top1``, ties broken by Acc@3 and then Acc@5 (the official rule), where measured.

Fidelity flags (spec §3.5): ``reproduce_code_bug`` takes the KD target from a second student forward, as the
official code does, instead of the teacher; ``official_normalization`` feeds the real half unnormalised and
stage 2's model selection normalised images (its encoder trained on images in [0, 1]);
``mask_constraint=batch_sum`` is the official ``|Σ_batch m − d(1 − inv)|``, whose per-sample target is met by
the batch sum (default ``per_sample``: the average sample's Σ_j m_ij / sup m held at d·(1 − inv); sup m = 1/3,
so the official per-sample target on the raw mask would be out of reach).
Schedules are functions of the stage's progress (exact on resumption): G and S cosine over stage 1 (the
official steps them per 200-iteration epoch), A cosine over stage 2's epochs (the official steps its
epoch-length cosine every batch, so its lr oscillates), stage 3 Adam with PyTorch ConstantLR's default
(lr/3 for the first 5 epochs); E's lr is constant (its official scheduler is never stepped).

Ablations: ``use_anchors=false`` mixes the real image with G(E(x)) instead of the anchor G(A(E(x)));
``b=1`` trains stage 3 on real images only (no mixup); ``mixup_from_datafree_student=false`` starts stage 3
from the student's initial weights instead of stage 1's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from rayoodkd.methods.base import Method, MethodConfig, Metrics, RunContext, Stage, Streams, kd_loss, unwrap
from rayoodkd.methods.losses import BNStatistics, balance_loss, onehot_loss, require_batchnorm

if TYPE_CHECKING:
    from rayoodkd.engine.evaluation import EvalSet
from rayoodkd.methods.optim import OptimizerConfig, adam
from rayoodkd.methods.registry import METHODS
from rayoodkd.models import build_generator
from rayoodkd.models.augkd import MASK_SUPREMUM, AnchorNet, CVAEEncoder, gaussian_kl

SAMPLE_MIX_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
SAMPLE_IMAGES = 8


def mixup_weight(epoch: int, epochs: int, a: float, b: float, scheduler: Literal["linear", "step"]) -> float:
    """f(epoch; a, b): the share of the real student-domain image in stage 3 (spec §3.3, Module 3)."""
    progress = epoch / (a * epochs)
    if scheduler == "step":
        return min(b + (1 - b) * math.trunc(10 * progress) / 10, 1.0)
    return min((1 - b) * progress + b, 1.0)


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """The energy score −τ·logsumexp(t/τ) per sample (Energy-OOD): low means the teacher is certain."""
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


def mask_constraint(mask: Tensor, invariant: float, form: Literal["per_sample", "batch_sum"]) -> Tensor:
    """The mask-size term, as a value per sample whose batch mean is the term (spec §3.5.3).

    ``per_sample``: |mean_i Σ_j m_ij / sup m − d(1 − inv)|, the average sample's share of the mask's range
    held at 1 − inv whatever the batch size. ``batch_sum`` (official): |Σ_ij m_ij − d(1 − inv)| / B, a
    per-sample target compared with a batch sum, so each sample's mask shrinks as the batch grows.
    """
    target = mask.shape[1] * (1 - invariant)
    if form == "per_sample":
        term = (mask.sum(1).mean() / MASK_SUPREMUM - target).abs()
    else:
        term = (mask.sum() - target).abs() / len(mask)
    return term.expand(len(mask))


class AugKDOptimizers(MethodConfig):
    """The official README's, one optimizer per player and stage: stage 1 (generator, student, encoder),
    stage 2 (anchor: cosine over its epochs), stage 3 (mixup: the student again, after ``warmup_steps``)."""

    generator: OptimizerConfig = adam(1e-3, schedule="cosine")
    student: OptimizerConfig = adam(1e-3, weight_decay=1e-4, schedule="cosine")
    encoder: OptimizerConfig = adam(1e-4)
    anchor: OptimizerConfig = adam(1e-3, schedule="cosine")
    mixup: OptimizerConfig = adam(1e-3, weight_decay=1e-4)


class AugKDConfig(MethodConfig):
    """AuG-KD hyper-parameters (defaults: the official README for Office-31, spec §3.4, except the
    synthetic batch: 256 per worker here, 2048 in the README)."""

    nz: int = Field(100, ge=1, description="latent size d shared by G, E and A")
    ngf: int = Field(64, ge=1, description="generator width (AuG-KD's G = MosaicKD's layout)")
    encoder_width: int = Field(64, ge=1)
    batch_size: int = Field(
        256, ge=2, description="synthetic images per stage-1 step (per worker; official 2048, a GPU's)"
    )
    # stage 1
    datafree_steps: int = Field(40_000, ge=1, description="stage-1 iterations (official: 200 epochs × 200)")
    inner_steps: int = Field(5, ge=1, description="S and E steps per G step")
    adv: float = Field(1.0, ge=0, description="weight of −kldiv(s, t, 1) in L_G")
    oh: float = Field(1.0, ge=0)
    balance: float = Field(20.0, ge=0, description="weight of Σ p̄ log₁₀ p̄ in L_G")
    bn: float = Field(1.0, ge=0, description="weight of the teacher BN-statistics term (concat variant)")
    kl_prior: float = Field(2.5e-4, ge=0, description="weight of the encoder's KL to N(0, I)")
    validation_batches: int = Field(10, ge=1, description="stage-1 selection pool: this many × batch_size")
    # stage 2
    anchor_epochs: int = Field(200, ge=1)
    invariant: float = Field(0.25, ge=0, lt=1, description="'inv': share of latent dims A leaves")
    anchor_ce: float = Field(0.1, ge=0)
    energy_temperature: float = Field(1.0, gt=0)
    mask_constraint: Literal["per_sample", "batch_sum"] = "per_sample"
    # stage 3
    mixup_epochs: int = Field(200, ge=1)
    warmup_steps: int = Field(
        5,
        ge=0,
        description="stage 3: first steps at optim.mixup.lr/3 (PyTorch ConstantLR's default, per batch)",
    )
    scheduler: Literal["linear", "step"] = "linear"
    a: float = Field(0.6, gt=0, description="f reaches 1 at epoch a·mixup_epochs")
    b: float = Field(0.2, ge=0, le=1, description="f at epoch 0")
    temperature: float = Field(10.0, gt=0)
    ce_weight: float = Field(0.5, ge=0, le=1, description="u: CE weight; the KD term gets 1 − u")
    reproduce_code_bug: bool = Field(False, description="KD from a 2nd student forward (official)")
    official_normalization: bool = Field(
        False, description="real half unnormalised, stage-2 selection normalised (official)"
    )
    scan_batch_size: int = Field(512, ge=1)
    eval_epochs: int = Field(1, ge=1, description="stages 2-3: evaluate (and select) every this many epochs")
    # ablations
    use_anchors: bool = Field(True, description="false: stage 3 mixes G(E(x)) instead of G(A(E(x)))")
    mixup_from_datafree_student: bool = Field(
        True, description="false: stage 3 starts from the student's initial weights, not stage 1's"
    )
    optim: AugKDOptimizers = AugKDOptimizers()


@METHODS.register("augkd")
class AugKD(Method):
    """Data-free G + E, then an AnchorNet, then anchor/real mixup learning (module docstring)."""

    name = "augkd"
    consumes = frozenset({"labelled"})
    Config = AugKDConfig
    best_val_order = ("top1", "top3", "top5")  # the official selection: Acc, then Acc@3, then Acc@5

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: AugKDConfig, ctx: RunContext) -> None:
        super().__init__(teacher, student, cfg, ctx)
        require_batchnorm("augkd", "bn", cfg.bn, teacher)
        self.generator = build_generator(
            "mosaickd", nz=cfg.nz, ngf=cfg.ngf, image_size=ctx.image_size, channels=ctx.channels
        ).to(ctx.device)
        self.encoder = CVAEEncoder(
            cfg.nz, ctx.num_classes, ctx.image_size, ctx.channels, cfg.encoder_width
        ).to(ctx.device)
        self.anchor = AnchorNet(cfg.nz, ctx.num_classes).to(ctx.device)
        self.bn_stats = BNStatistics(teacher, "concat")
        optim = cfg.optim
        self.opt_g, self.sched_g = optim.generator.build(self.generator.parameters(), cfg.datafree_steps)
        self.opt_s, self.sched_s = optim.student.build(student.parameters(), cfg.datafree_steps)
        self.opt_e, self.sched_e = optim.encoder.build(self.encoder.parameters(), cfg.datafree_steps)
        self.opt_a = optim.anchor.optimizer(self.anchor.parameters())
        self.opt_mix = optim.mixup.optimizer(student.parameters())
        self.initial_student = {k: v.detach().clone() for k, v in student.state_dict().items()}
        self.labelled_rows: tuple[Tensor, Tensor] | None = None
        self.latest: Tensor | None = None
        self.latest_real: tuple[Tensor, Tensor] | None = None

    def stages(self) -> list[Stage]:
        cfg: AugKDConfig = self.cfg
        return [
            Stage(
                "datafree",
                cfg.datafree_steps,
                trains=("student", "generator", "encoder"),
                select="val/generator_loss",
                mode="min",
                reload_best=True,
            ),
            Stage(
                "anchor",
                epochs=cfg.anchor_epochs,
                trains=("anchor",),
                select="val/anchor_loss",
                mode="min",
                reload_best=True,
                eval_every_epochs=cfg.eval_epochs,
            ),
            Stage("mixup", epochs=cfg.mixup_epochs, trains=("student",), eval_every_epochs=cfg.eval_epochs),
        ]

    def players(self) -> dict[str, nn.Module]:
        return {
            "student": self.student,
            "generator": self.generator,
            "encoder": self.encoder,
            "anchor": self.anchor,
        }

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {
            "generator": self.opt_g,
            "student": self.opt_s,
            "encoder": self.opt_e,
            "anchor": self.opt_a,
            "mixup": self.opt_mix,
        }

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {"generator": self.sched_g, "student": self.sched_s, "encoder": self.sched_e}

    # ----------------------------------------------------------------------------------- stage 1: data-free

    def generator_loss(
        self, z: Tensor, generator: nn.Module, student: nn.Module
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """L_G on latents ``z`` (AuG-KD ``DecoderLoss``: the DAFL/DFQ terms, per-sample means), its terms and
        the images G(z). The teacher softmax is not clipped at 1e-8 as in the official KL: a no-op for
        these terms' finite values."""
        cfg: AugKDConfig = self.cfg
        with self.ctx.autocast():
            images = generator(z)
            normalized = self.ctx.normalize(images)
            t = self.teacher(normalized)
            loss_bn = self.bn_stats.loss()
            s = student(normalized)
        t, s = t.float(), s.float()
        terms = {
            "adv": -kd_loss(s, t, 1.0),
            "oh": onehot_loss(t),
            "balance": balance_loss(t, 10.0),
            "bn": loss_bn,
        }
        loss = (
            cfg.adv * terms["adv"] + cfg.oh * terms["oh"] + cfg.balance * terms["balance"] + cfg.bn * loss_bn
        )
        return loss, terms, images

    def encoder_loss(
        self,
        images: Tensor,
        z: Tensor,
        labels: Tensor,
        encoder: nn.Module | None = None,
        noise: torch.Generator | None = None,
    ) -> Tensor:
        """L_E: E inverts G on its own samples — latent reconstruction plus a weak N(0, I) prior. ``encoder``
        (default: the trained one) and ``noise`` (default: the rank's RNG) let validation use its own."""
        encoder = self.encoder if encoder is None else encoder
        recon, mu, log_var = encoder(images, labels, generator=noise or self.ctx.generator)
        per_sample = (recon - z).pow(2).sum(1) + self.cfg.kl_prior * gaussian_kl(mu, log_var)
        return per_sample.mean()

    def datafree_step(self) -> Metrics:
        cfg: AugKDConfig = self.cfg
        self.generator.train()
        self.student.train()
        self.encoder.train()
        with self.ctx.no_sync(self.student):
            loss_g, terms, images = self.generator_loss(
                self.ctx.randn(cfg.batch_size, cfg.nz), self.generator, self.student
            )
            self.ctx.step(loss_g, self.opt_g, "generator")
        self.latest = images[:64].detach()
        for _ in range(cfg.inner_steps):
            z = self.ctx.randn(cfg.batch_size, cfg.nz)
            with torch.no_grad(), self.ctx.autocast():
                images = self.generator(z).float()
                t = self.teacher(self.ctx.normalize(images)).float()
            with self.ctx.autocast():
                s = self.student(self.ctx.normalize(images)).float()
            loss_s = kd_loss(s, t, 1.0)
            self.ctx.step(loss_s, self.opt_s, "student")
            loss_e = self.encoder_loss(images, z, t.argmax(1))
            self.ctx.step(loss_e, self.opt_e, "encoder")
        self.sched_g.step()
        self.sched_s.step()
        self.sched_e.step()
        return {
            "loss/generator": loss_g.detach(),
            **{f"loss/{name}": value.detach() for name, value in terms.items()},
            "loss/kd": loss_s.detach(),
            "loss/encoder": loss_e.detach(),
            "train/agreement": 100 * (s.argmax(1) == t.argmax(1)).float().mean(),
            "lr/student": self.opt_s.param_groups[0]["lr"],
            "images": float(cfg.inner_steps * cfg.batch_size),
        }

    # ------------------------------------------------------------------------------------- stage 2: anchors

    def anchor_loss(
        self, unit: Tensor, labels: Tensor, anchor: nn.Module, noise: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample L_A of student-domain images ``unit`` ∈ [0, 1] (AuG-KD ``AnchorLoss``); ``noise``
        draws the encoder's ε."""
        cfg: AugKDConfig = self.cfg
        with torch.no_grad():
            z, _, _ = unwrap(self.encoder)(unit, labels, generator=noise)
        anchors, mask = anchor(z, labels)
        with self.ctx.autocast():
            t = self.teacher(self.ctx.normalize(unwrap(self.generator)(anchors))).float()
        terms = {
            "energy": energy(t, cfg.energy_temperature),
            "mask": mask_constraint(mask, cfg.invariant, cfg.mask_constraint),
            "ce": F.cross_entropy(t, labels, reduction="none"),
        }
        return terms["energy"] + terms["mask"] + cfg.anchor_ce * terms["ce"], terms

    def anchor_step(self, data: Streams) -> Metrics:
        batch = data.next("labelled")
        self.generator.eval()
        self.encoder.eval()
        self.anchor.train()
        per_sample, terms = self.anchor_loss(batch["unit"], batch["label"], self.anchor, self.ctx.generator)
        loss = per_sample.mean()
        self.ctx.step(loss, self.opt_a, "anchor")
        return {
            "loss/anchor": loss.detach(),
            **{f"loss/{name}": value.mean().detach() for name, value in terms.items()},
            "lr/anchor": self.opt_a.param_groups[0]["lr"],
            "images": 0.0,
        }

    # -------------------------------------------------------------------------------------- stage 3: mixup

    def mixup_lr(self) -> float:
        """Stage 3's lr at this step: a third of it for the first ``warmup_steps`` (the official ConstantLR,
        stepped per batch)."""
        cfg: AugKDConfig = self.cfg
        lr = cfg.optim.mixup.lr_at(self.ctx.stage_epoch, cfg.mixup_epochs)
        return lr / 3 if self.ctx.stage_step <= cfg.warmup_steps else lr

    def mix_weight(self) -> float:
        cfg: AugKDConfig = self.cfg
        return mixup_weight(self.ctx.stage_epoch, cfg.mixup_epochs, cfg.a, cfg.b, cfg.scheduler)

    @torch.no_grad()
    def mix(self, unit: Tensor, labels: Tensor, weight: float, noise: torch.Generator) -> Tensor:
        """x_mix = (1 − s)·G((1 − s)·A(z, y) + s·z) + s·x with z = E(x, y), in [0, 1] (``noise``: E's ε)."""
        encoder, anchor, generator = unwrap(self.encoder), unwrap(self.anchor), unwrap(self.generator)
        z, _, _ = encoder(unit, labels, generator=noise)
        anchors = anchor(z, labels)[0] if self.cfg.use_anchors else z
        generated = generator((1 - weight) * anchors + weight * z)
        return (1 - weight) * generated + weight * unit

    def mixup_step(self, data: Streams) -> Metrics:
        cfg: AugKDConfig = self.cfg
        batch = data.next("labelled")
        unit, labels = batch["unit"], batch["label"]
        for module in (self.generator, self.encoder, self.anchor):
            module.eval()
        for group in self.opt_mix.param_groups:
            group["lr"] = self.mixup_lr()
        weight = self.mix_weight()
        mixed = self.mix(unit, labels, weight, self.ctx.generator)
        real = unit if cfg.official_normalization else batch["image"]
        inputs, targets = torch.cat([real, self.ctx.normalize(mixed)]), torch.cat([labels, labels])
        self.student.train()
        with self.ctx.autocast():
            logits = self.student(inputs).float()
            if cfg.reproduce_code_bug:
                target_logits = self.student(inputs).float()
            else:
                with torch.no_grad():
                    target_logits = self.teacher(inputs).float()
        loss_ce = F.cross_entropy(logits, targets)
        loss_kd = kd_loss(logits, target_logits, cfg.temperature)
        loss = cfg.ce_weight * loss_ce + (1 - cfg.ce_weight) * loss_kd
        self.ctx.step(loss, self.opt_mix, "mixup")
        self.latest_real = (unit[:SAMPLE_IMAGES].detach(), labels[:SAMPLE_IMAGES].detach())
        return {
            "loss/total": loss.detach(),
            "loss/ce": loss_ce.detach(),
            "loss/kd": loss_kd.detach(),
            "mix_weight": weight,
            "train/top1": 100 * (logits.argmax(1) == targets).float().mean(),
            "lr/student": self.opt_mix.param_groups[0]["lr"],
            "images": float(len(inputs)),
        }

    # ------------------------------------------------------------------------------------ engine interface

    def begin_epoch(self, data: Streams, epoch: int) -> tuple[int, dict[str, float]]:
        """Stages 2 and 3 pass over the whole labelled set once per epoch; stage 2's lr is a function of it
        (stage 3's is set per step, :meth:`mixup_lr`)."""
        cfg: AugKDConfig = self.cfg
        if self.ctx.stage == "anchor":
            for group in self.opt_a.param_groups:
                group["lr"] = cfg.optim.anchor.lr_at(epoch, cfg.anchor_epochs)
        elif epoch == 0 and not cfg.mixup_from_datafree_student:
            # rank 0's initial weights (each rank built its student from its own seed; DDP's broadcast at
            # wrapping time has already happened)
            initial = {k: self.ctx.broadcast(v) for k, v in self.initial_student.items()}
            unwrap(self.student).load_state_dict(initial)
        if self.labelled_rows is None:  # the same rows every epoch: scanned once per process
            units, labels = [], []
            for batch in data.scan("labelled", cfg.scan_batch_size):
                units.append((batch["unit"] * 255).round().to(torch.uint8).cpu())
                labels.append(batch["label"].cpu())
            self.labelled_rows = torch.cat(units), torch.cat(labels)
        return data.use_selection("labelled", *self.labelled_rows, epoch), {}

    def extra_state(self) -> dict[str, Any]:
        """This rank's labelled rows, so that a resumed run's epochs draw from the same rows."""
        return {} if self.labelled_rows is None else {"labelled_rows": list(self.labelled_rows)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        rows = state.get("labelled_rows")
        self.labelled_rows = None if rows is None else (rows[0], rows[1])

    def train_step(self, data: Streams) -> Metrics:
        if self.ctx.stage == "datafree":
            return self.datafree_step()
        if self.ctx.stage == "anchor":
            return self.anchor_step(data)
        return self.mixup_step(data)

    @torch.no_grad()
    def validate(self, val: EvalSet) -> dict[str, float]:
        """Stage 1: G and E losses on a fixed pool of latents; stage 2: L_A on the validation split, whose
        images reach E in [0, 1] as in training (the official selection normalises them, spec §3.5.2)."""
        pool = torch.Generator(device=self.ctx.device).manual_seed(0)
        was_training = {name: unwrap(p).training for name, p in self.players().items()}
        for player in self.players().values():
            unwrap(player).eval()
        try:
            if self.ctx.stage == "datafree":
                return self._validate_datafree(pool)
            if self.ctx.stage == "anchor":
                anchor = unwrap(self.anchor)

                def anchor_loss(images: Tensor, labels: Tensor) -> Tensor:
                    if not self.cfg.official_normalization:  # the encoder trained on images in [0, 1]
                        images = self.ctx.denormalize(images).clamp(0, 1)
                    return self.anchor_loss(images, labels, anchor, pool)[0]

                return {"anchor_loss": val.mean(anchor_loss)}
            return {}
        finally:
            for name, player in self.players().items():
                unwrap(player).train(was_training[name])

    def _validate_datafree(self, pool: torch.Generator) -> dict[str, float]:
        cfg: AugKDConfig = self.cfg
        generator, encoder = unwrap(self.generator), unwrap(self.encoder)
        losses_g, losses_e = [], []
        for _ in range(cfg.validation_batches):
            z = torch.randn(cfg.batch_size, cfg.nz, generator=pool, device=self.ctx.device)
            with torch.enable_grad():  # the BN-statistics hooks record grad-enabled forwards only
                loss_g, _, _ = self.generator_loss(z, generator, unwrap(self.student))
            losses_g.append(loss_g.item())
            images = generator(z)
            t = self.teacher(self.ctx.normalize(images))
            losses_e.append(self.encoder_loss(images, z, t.argmax(1), encoder, pool).item())
        return {
            "generator_loss": sum(losses_g) / len(losses_g),
            "encoder_loss": sum(losses_e) / len(losses_e),
        }

    def samples(self) -> Tensor | None:
        """Stage 1: G(z); stage 3: mixup images of a few real ones at s = 0, 0.25, ..., 1 (a row per s)."""
        if self.ctx.stage == "mixup" and self.latest_real is not None:
            unit, labels = self.latest_real
            noise = torch.Generator(device=self.ctx.device)  # not the training RNG: grids never change a run
            rows = [self.mix(unit, labels, weight, noise.manual_seed(0)) for weight in SAMPLE_MIX_WEIGHTS]
            return torch.cat(rows).clamp(0, 1).cpu()
        return None if self.latest is None else self.latest.float().clamp(0, 1).cpu()
