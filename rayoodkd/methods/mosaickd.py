"""MosaicKD — "Mosaicking to Distill" (Fang et al., NeurIPS 2021), as coded in ``zju-vipa/MosaicKD``.

A generator G learns to assemble in-domain images from *local patches* of an out-of-domain (OOD) corpus: a
patch discriminator D, whose every logit sees one L×L patch, keeps the patches OOD-authentic (Eqn. 3), the
frozen teacher T makes the whole image in-domain (label-space aligning, Eqn. 4), and G plays a DRO game
against the student S by maximising the teacher–student discrepancy (Eqn. 7). S is distilled on the
synthetic images *and* the raw OOD images (appendix). One :meth:`MosaicKD.train_step` is one outer
iteration of ``kd_mosaic.py`` (spec methods.md §2.5), with B = ``synthetic_batch_size`` (default: the OOD
batch size)::

    x_real ~ OOD (un-augmented view);  z ~ N(0, I_nz);  x̂ = normalize(G(z))        (one graph, reused)
    D step:  L_D = λ_local · [Σ_patches BCE(D(x̂.detach()), 0) + Σ_patches BCE(D(x_real), 1)] / 2B
    G step:  t = T(x̂), s = S(x̂), p = softmax(t), p̄ = mean_i p_i
             L_local   = Σ_patches BCE(D(x̂), 1) / B                   (Eqn. 3, fool the patch discriminator)
             L_align   = mean_i H(p_i), natural log                    (Eqn. 4, label-space aligning)
             L_adv     = −τ²·KL(softmax(t/τ) ‖ softmax(s/τ)), τ = 1     (Eqn. 7, DRO; nothing detached)
             L_balance = Σ_c p̄_c log₂ p̄_c                              (appendix, against mode collapse)
             L_G = λ_adv·L_adv + λ_align·L_align + λ_local·L_local + λ_balance·L_balance
    kd_steps × S step:  X = concat[normalize(G(z')) (no grad), x_ood (augmented view)]
             L_S = τ_kd²·KL(softmax(T(X)/τ_kd) ‖ softmax(S(X)/τ_kd))
    step the three cosine schedulers (over max_steps)

T stays in ``eval()``; S, G and D stay in ``train()`` throughout (official), so S's BatchNorm statistics also
see the G-step forward. The patch size L is D's exact receptive field and s its output stride
(``rayoodkd.models.discriminators``); ``discriminator=full_image`` (one logit per image) is the paper's
"w/o patch learning" ablation, ``use_discriminator=false`` "w/o disc." and ``use_adversarial=false``
"w/o adv." (Table 5).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from rayoodkd.methods.base import Method, MethodConfig, Metrics, RunContext, Streams, kd_loss
from rayoodkd.methods.optim import OptimizerConfig, adam, sgd
from rayoodkd.methods.registry import METHODS
from rayoodkd.models import build_discriminator, build_generator

_DISCRIMINATORS = {"patch": "patch", "full_image": "full_image", "official": "mosaickd_official"}
_OFFICIAL_PATCH = (10, 4)
_MAX_SAMPLES = 64


class MosaicKDOptimizers(MethodConfig):
    """The official optimizers: cosine annealing per outer iteration over max_steps (the official lr_d is
    lr_g)."""

    student: OptimizerConfig = sgd(0.1, weight_decay=1e-4, schedule="cosine")
    generator: OptimizerConfig = adam(1e-3, betas=(0.5, 0.999), schedule="cosine")
    discriminator: OptimizerConfig = adam(1e-3, betas=(0.5, 0.999), schedule="cosine")


class MosaicKDConfig(MethodConfig):
    """Hyper-parameters of MosaicKD (defaults: the official README command, spec methods.md §2.7)."""

    # players
    nz: int = Field(100, ge=1, description="latent size of G (z_dim)")
    ngf: int = Field(64, ge=1, description="G width: 4·ngf channels at the first resolution")
    discriminator: Literal["patch", "full_image", "official"] = Field(
        "patch",
        description="patch: PatchGAN with receptive field exactly patch_size and output stride patch_stride; "
        "full_image: one logit per image (the 'w/o patch learning' ablation, receptive field = image size); "
        "official: the official PatchDiscriminator(ndf) (RF 10, stride 4, zero-padded borders)",
    )
    patch_size: int = Field(
        10,
        ge=1,
        le=32,
        description="L: D's effective receptive field in pixels (the MLflow param derived.d/receptive_field)",
    )
    patch_stride: int = Field(4, ge=1, description="s: pixels between neighbouring patch logits")
    ndf: int = Field(128, ge=1, description="D width of the first conv")
    # loss terms and ablations
    adv_weight: float = Field(1.0, ge=0, description="λ_adv (L_adv, Eqn. 7)")
    align_weight: float = Field(1.0, ge=0, description="λ_align (L_align, Eqn. 4)")
    local_weight: float = Field(1.0, ge=0, description="λ_local (L_local, Eqn. 3; also scales L_D)")
    balance_weight: float = Field(10.0, ge=0, description="λ_balance (L_balance, appendix)")
    use_discriminator: bool = Field(True, description="false: no D, no D step, no L_local ('w/o disc.')")
    use_adversarial: bool = Field(True, description="false: no L_adv, G ignores S ('w/o adv.')")
    local_reduction: Literal["sum", "mean"] = Field(
        "sum",
        description="sum (official): L_D and L_local sum the patch BCEs and divide by the batch; mean: "
        "divide by the number of patch logits too (rescales λ_local by 1/#patches)",
    )
    # student distillation
    kd_steps: int = Field(5, ge=1, description="student steps per outer iteration (hard-coded 5 officially)")
    kd_temperature: float = Field(1.0, gt=0, description="τ of the student's KD loss")
    synthetic_batch_size: int | None = Field(
        None, ge=1, description="B, synthetic images per G/D/S step; None = the OOD batch size"
    )
    ood_kd_normalizer: tuple[tuple[float, ...], tuple[float, ...]] | None = Field(
        None,
        description="None: the OOD KD images use the teacher's normaliser like the synthetic ones (shared "
        "normaliser); (mean, std): re-normalise them with these statistics, the official quirk "
        "(CIFAR-10's own statistics while synthetic images use CIFAR-100's)",
    )
    optim: MosaicKDOptimizers = MosaicKDOptimizers()

    @model_validator(mode="after")
    def _check(self) -> MosaicKDConfig:
        if self.discriminator == "official" and (self.patch_size, self.patch_stride) != _OFFICIAL_PATCH:
            raise ValueError(
                "discriminator=official has a fixed receptive field 10 and stride 4; set patch_size=10 "
                "patch_stride=4, or use discriminator=patch for other patch sizes"
            )
        if self.ood_kd_normalizer is not None and len(self.ood_kd_normalizer[0]) != len(
            self.ood_kd_normalizer[1]
        ):
            raise ValueError("ood_kd_normalizer: mean and std need one value per channel each")
        return self


def entropy(logits: Tensor) -> Tensor:
    """Per-row entropy (nats) of ``softmax(logits)``."""
    return -(torch.softmax(logits, dim=1) * torch.log_softmax(logits, dim=1)).sum(1)


def patch_bce(logits: Tensor, real: bool, denominator: int, reduction: str = "sum") -> Tensor:
    """Σ over every patch logit of BCE-with-logits(logit, 1 if ``real`` else 0) / ``denominator`` (official:
    the batch size for L_local, twice it for each half of L_D); ``reduction="mean"`` also divides by the
    number of patch logits per image."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / denominator
    return loss / logits[0].numel() if reduction == "mean" else loss


def align_loss(teacher_logits: Tensor) -> Tensor:
    """L_align (Eqn. 4): the teacher's mean prediction entropy, natural log."""
    return entropy(teacher_logits).mean()


def balance_loss(teacher_logits: Tensor) -> Tensor:
    """L_balance (appendix): Σ_c p̄_c log₂ p̄_c of the batch-mean teacher prediction p̄ (its negative
    entropy in bits; minimising it spreads the classes)."""
    p_mean = torch.softmax(teacher_logits, dim=1).mean(0)
    # Clamped inside the log: a class no sample gives any probability adds 0, not 0·log 0 = NaN.
    return (p_mean * torch.log2(p_mean.clamp_min(torch.finfo(p_mean.dtype).tiny))).sum()


@torch.no_grad()
def select_ood_subset(teacher: nn.Module, images: Tensor, n: int, batch_size: int = 512) -> Tensor:
    """Indices of the ``n`` images the teacher is least sure about (highest prediction entropy), most
    uncertain first: the official ``--ood_subset`` (``prepare_ood_data``, spec §2.6), used for ImageNet-32 /
    Places365-32 with n = |ID train set|. ``images`` are in the teacher's input space (normalised, no
    augmentation)."""
    teacher.eval()
    scores = torch.cat(
        [entropy(teacher(images[i : i + batch_size]).float()) for i in range(0, len(images), batch_size)]
    )
    return torch.argsort(scores, descending=True, stable=True)[:n]


@METHODS.register("mosaickd")
class MosaicKD(Method):
    """MosaicKD: patch-level GAN on OOD data + teacher alignment + DRO against the student."""

    name = "mosaickd"
    consumes = frozenset({"ood"})
    Config = MosaicKDConfig

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: MosaicKDConfig, ctx: RunContext) -> None:
        super().__init__(teacher, student, cfg, ctx)
        device = ctx.device
        self.generator = build_generator(
            "mosaickd", nz=cfg.nz, ngf=cfg.ngf, image_size=ctx.image_size, channels=ctx.channels
        ).to(device)
        self.optimizer_s, self.scheduler_s = cfg.optim.student.build(student.parameters(), ctx.max_steps)
        self.optimizer_g, self.scheduler_g = cfg.optim.generator.build(
            self.generator.parameters(), ctx.max_steps
        )
        self.discriminator: nn.Module | None = None
        self.receptive_field = self.output_stride = self.grid_remainder = 0
        if cfg.use_discriminator:
            self.discriminator = self._build_discriminator(cfg, ctx).to(device)
            self.receptive_field = int(self.discriminator.effective_receptive_field)
            self.output_stride = int(self.discriminator.output_stride)
            if cfg.discriminator == "patch":  # unpadded: its grid of patches may not reach the far edges
                self.grid_remainder = (ctx.image_size - self.receptive_field) % self.output_stride
            self.optimizer_d, self.scheduler_d = cfg.optim.discriminator.build(
                self.discriminator.parameters(), ctx.max_steps
            )
        self._samples: Tensor | None = None

    @staticmethod
    def _build_discriminator(cfg: MosaicKDConfig, ctx: RunContext) -> nn.Module:
        kwargs: dict[str, int] = {"channels": ctx.channels, "ndf": cfg.ndf, "image_size": ctx.image_size}
        if cfg.discriminator == "patch":
            if cfg.patch_size > ctx.image_size:
                raise ValueError(
                    f"mosaickd.patch_size={cfg.patch_size} exceeds the teacher's image size "
                    f"{ctx.image_size}; allowed: 1..{ctx.image_size}"
                )
            kwargs.update(patch_size=cfg.patch_size, stride=cfg.patch_stride)
        return build_discriminator(_DISCRIMINATORS[cfg.discriminator], **kwargs)

    # ------------------------------------------------------------------------------------------- contract

    def players(self) -> dict[str, nn.Module]:
        players = {"generator": self.generator, "student": self.student}
        if self.discriminator is not None:
            players["discriminator"] = self.discriminator
        return players

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers = {"generator": self.optimizer_g, "student": self.optimizer_s}
        if self.discriminator is not None:
            optimizers["discriminator"] = self.optimizer_d
        return optimizers

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        schedulers = {"generator": self.scheduler_g, "student": self.scheduler_s}
        if self.discriminator is not None:
            schedulers["discriminator"] = self.scheduler_d
        return schedulers

    def samples(self) -> Tensor | None:
        return None if self._samples is None else self._samples.float().cpu()

    def facts(self) -> dict[str, float | int | str]:
        if self.discriminator is None:
            return {}
        return {"d/receptive_field": self.receptive_field, "d/patch_stride": self.output_stride}

    # ------------------------------------------------------------------------------------------- losses

    def _synthesize(self, batch: int) -> tuple[Tensor, Tensor]:
        """(G(z) in [0, 1], normalize(G(z))) for fresh z of this rank."""
        with self.ctx.autocast():
            unit = self.generator(self.ctx.randn(batch, self.cfg.nz))
        return unit, self.ctx.normalize(unit.float())

    def _patch_grid_view(self, images: Tensor) -> Tensor:
        """``images`` cropped by r = (H − L) mod s rows and columns so that D's unpadded grid of L×L patches
        at stride s fits exactly, with the crop's origin cycling through the (r + 1)² offsets with the step:
        a fixed grid would never judge the last r rows and columns, and G would be free there (Eqn. 3 asks
        every local pattern of G(z) to look like the OOD data's)."""
        r = self.grid_remainder
        if r == 0:
            return images
        step = self.ctx.stage_step
        top, left = step % (r + 1), step // (r + 1) % (r + 1)
        height, width = images.shape[-2:]
        return images[..., top : top + height - r, left : left + width - r]

    def _ood_for_kd(self, data: Streams) -> Tensor:
        batch = data.next("ood")
        if self.cfg.ood_kd_normalizer is None:
            return batch["image"]
        unit = batch["unit"]
        mean, std = (
            torch.tensor(v, device=unit.device).view(1, -1, 1, 1) for v in self.cfg.ood_kd_normalizer
        )
        return (unit - mean) / std

    # ------------------------------------------------------------------------------------------- one step

    def train_step(self, data: Streams) -> Metrics:
        cfg: MosaicKDConfig = self.cfg
        ctx = self.ctx
        self.student.train()
        self.generator.train()
        metrics: Metrics = {}

        # The un-augmented OOD view paces the outer loop (the official train_loader) and feeds D, normalised
        # as the synthetic images are (the stream's own normaliser may differ: data.transforms.ood).
        real = ctx.normalize(data.next("ood", augment=False)["unit"]).contiguous(
            memory_format=ctx.memory_format
        )
        batch = cfg.synthetic_batch_size or len(real)
        unit, images = self._synthesize(batch)
        self._samples = unit.detach()[:_MAX_SAMPLES]  # copied to the host only when a grid is logged

        # Patch discrimination (Eqn. 3, D's side): fake patches -> 0, real OOD patches -> 1.
        if self.discriminator is not None:
            self.discriminator.train()
            with ctx.autocast():
                d_fake = self.discriminator(self._patch_grid_view(images.detach()))
                d_real = self.discriminator(self._patch_grid_view(real))
            d_fake, d_real = d_fake.float(), d_real.float()
            loss_d = cfg.local_weight * (
                patch_bce(d_fake, False, 2 * len(d_fake), cfg.local_reduction)
                + patch_bce(d_real, True, 2 * len(d_fake), cfg.local_reduction)
            )
            ctx.step(loss_d, self.optimizer_d, "discriminator")
            metrics.update(
                {
                    "loss/d": loss_d.detach(),
                    "d/real_prob": torch.sigmoid(d_real).mean().detach(),
                    "d/fake_prob": torch.sigmoid(d_fake).mean().detach(),
                }
            )

        # Generation: D's and S's gradients from L_G are discarded (zeroed before their own steps), so
        # their DDP all-reduce is skipped.
        with ctx.no_sync(*(m for m in (self.discriminator, self.student) if m is not None)):
            with ctx.autocast():
                teacher_logits = self.teacher(images).float()
            loss_align = align_loss(teacher_logits)  # Eqn. 4: label-space aligning
            loss_balance = balance_loss(teacher_logits)  # appendix: alleviating mode collapse
            loss_g = cfg.align_weight * loss_align + cfg.balance_weight * loss_balance
            if self.discriminator is not None:
                with ctx.autocast():
                    d_fake = self.discriminator(self._patch_grid_view(images)).float()
                loss_local = patch_bce(d_fake, True, len(d_fake), cfg.local_reduction)  # Eqn. 3
                loss_g = loss_g + cfg.local_weight * loss_local
                metrics["loss/local"] = loss_local.detach()
            if cfg.use_adversarial:
                with ctx.autocast():
                    student_logits = self.student(images).float()
                loss_adv = -kd_loss(student_logits, teacher_logits, 1.0)  # Eqn. 7 (DRO)
                loss_g = loss_g + cfg.adv_weight * loss_adv
                metrics["loss/adv"] = loss_adv.detach()
            ctx.step(loss_g, self.optimizer_g, "generator")
        p_mean = torch.softmax(teacher_logits.detach(), dim=1).mean(0)
        counts = torch.bincount(teacher_logits.argmax(1), minlength=ctx.num_classes)
        metrics.update(
            {
                "loss/g": loss_g.detach(),
                "loss/align": loss_align.detach(),
                "loss/balance": loss_balance.detach(),
                "g/class_entropy": -torch.special.xlogy(p_mean, p_mean).sum().detach(),
                "g/max_class_fraction": (counts.max() / batch).detach(),
            }
        )

        # Knowledge distillation on synthetic + raw OOD images.
        loss_kd_sum, images_seen = 0.0, 0
        for _ in range(cfg.kd_steps):
            with torch.no_grad():
                x = torch.cat([self._synthesize(batch)[1], self._ood_for_kd(data)])
                with ctx.autocast():
                    teacher_logits = self.teacher(x).float()
            with ctx.autocast():
                student_logits = self.student(x).float()
            loss_kd = kd_loss(student_logits, teacher_logits, cfg.kd_temperature)
            ctx.step(loss_kd, self.optimizer_s, "student")
            loss_kd_sum += loss_kd.detach()
            images_seen += len(x)

        for scheduler in self.schedulers().values():
            scheduler.step()
        return {
            **metrics,
            "loss/kd": loss_kd_sum / cfg.kd_steps,
            "lr/student": self.optimizer_s.param_groups[0]["lr"],
            "images": float(images_seen),
        }
