"""KD3 (Tang et al., ICCV 2023): distillation from webly collected images (spec/methods.md §5).

The deployable student is its backbone, a projector P and the frozen teacher's classifier:
z_S = head_T(P(f_S)). At the start of every epoch e (``Method.begin_epoch``), over this rank's share of the
web stream, in eval mode and without augmentation (``score_augmented`` reproduces the official random crops)::

    α(e) = 1 − exp(−5·((e+1)/(4M/3) − 1)²) for e < M, else 0         (M = teacher_vote · epochs; 120 of 240)
    p_i = softmax(α(e)·z_T(x_i) + (1 − α(e))·z_S(x_i));  c_i = max_k p_ik;  ŷ_i = argmax_k p_ik
    N_k = #{i : ŷ_i = k} over all ranks;  β_k = N_k / max N;  τ_k = p_cutoff·β_k / (2 − β_k)   (FlexMatch)
    select i  ⇔  c_i > τ_ŷ_i

then, for as many steps as the smallest rank's selection fills, on a batch x of selected rows (augmented)::

    x̃ = MixDistribution(x)      per-image channel statistics mixed with a shuffled partner, λ ~ Beta(0.1, 0.1)
    w_i = sigmoid(‖z_S,i − z_T,i‖₂)  (detached)
    L_fa = mean_{i,c,h,w} w_i·(P(f_S)_i − f_T,i)²                         (weighted feature alignment)
    L_con = NT-Xent(E_S(f_S(x)), E_S(f_S(x̃)); τ) + NT-Xent(E_T(f_T(x)), E_T(f_T(x̃)); τ)
    L = L_fa + λ_mix·L_con            one SGD step on {backbone, P, E_S, E_T}

There is no KL or CE term (as in the official code). The teacher is frozen, so the E_T term trains E_T
alone and cannot reach the student; it is kept because the method specifies it. Ablation switches:
``select=false`` trains on the whole web set, ``student_vote=false`` scores with the teacher alone
(α ≡ 1), ``feature_alignment=false`` replaces L_fa by τ²·KL between shared-classifier logits,
``weighted_alignment=false`` sets w_i = 1, ``mix_distribution=false`` drops L_con.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Generator, Tensor, nn

from rayoodkd.methods.base import (
    Method,
    Metrics,
    PlayerOptions,
    RunContext,
    Stage,
    Streams,
    kd_loss,
    unwrap,
)
from rayoodkd.methods.registry import METHODS
from rayoodkd.methods.selection import EpochSelectionConfig, select_confident, selection_metrics
from rayoodkd.models.kd3 import EmbedHead, Projector, SharedClassifierStudent, SharedHead


class KD3Config(EpochSelectionConfig):
    """KD3's hyper-parameters (defaults: the official code, spec §5.4)."""

    teacher_vote: float = Field(
        0.5, gt=0, le=1, description="fraction M/epochs of the epochs in which α(e) > 0 (official: 120/240)"
    )
    score_augmented: bool = Field(False, description="score with the web stream's augmentation (official)")
    projector_factor: int = Field(2, ge=1, description="channel reduction inside the projector")
    embed_dim: int = Field(128, ge=1)
    contrastive_temperature: float = Field(0.3, gt=0)
    mix_weight: float = Field(0.001, ge=0, description="λ_mix, the weight of the contrastive loss")
    mix_alpha: float = Field(0.1, gt=0, description="MixDistribution's λ ~ Beta(mix_alpha, mix_alpha)")
    select: bool = Field(True, description="ablation: false trains every epoch on the whole web set")
    student_vote: bool = Field(True, description="ablation: false scores with the teacher alone (α ≡ 1)")
    feature_alignment: bool = Field(True, description="ablation: false aligns logits with KD instead")
    weighted_alignment: bool = Field(True, description="ablation: false weighs every sample 1")
    mix_distribution: bool = Field(True, description="ablation: false drops the contrastive term")
    kd_temperature: float = Field(4.0, gt=0, description="τ of the KD loss replacing L_fa in its ablation")


def teacher_weight(epoch: int, vote_epochs: int) -> float:
    """α of the 0-based ``epoch``: the teacher's share of the selection logits, the official
    ``time_d(epoch, max_epoch=M)`` of its training loop, which counts epochs from 1."""
    official_epoch = epoch + 1
    if official_epoch >= vote_epochs:
        return 0.0
    return 1.0 - math.exp(-5.0 * ((official_epoch + 1) / (4 * vote_epochs / 3) - 1.0) ** 2)


def sample_beta(alpha: float, n: int, generator: Generator, device: torch.device) -> Tensor:
    """``n`` draws of Beta(α, α) from ``generator`` (Jöhnk's rejection method, in log space so that small α
    such as KD3's 0.1 neither underflows nor rejects often)."""
    draws = torch.empty(0, device=device)
    while len(draws) < n:
        log_u = torch.rand(2 * n, generator=generator, device=device).clamp_min(1e-30).log() / alpha
        log_v = torch.rand(2 * n, generator=generator, device=device).clamp_min(1e-30).log() / alpha
        log_sum = torch.logaddexp(log_u, log_v)
        accepted = log_sum <= 0
        draws = torch.cat([draws, (log_u - log_sum)[accepted].exp()])
    return draws[:n]


def mix_distribution(images: Tensor, generator: Generator, alpha: float, eps: float = 1e-6) -> Tensor:
    """MixStyle in input space: each image keeps its normalised content and takes statistics mixed with a
    random partner's, μ̃ = λμ_i + (1−λ)μ_j, σ̃ = λσ_i + (1−λ)σ_j, λ ~ Beta(α, α) (§5.2 item 3)."""
    n = len(images)
    mean = images.mean(dim=(2, 3), keepdim=True).detach()
    std = (images.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    lam = sample_beta(alpha, n, generator, images.device).view(n, 1, 1, 1).to(images.dtype)
    partner = torch.randperm(n, generator=generator, device=images.device)
    mixed_mean = lam * mean + (1 - lam) * mean[partner]
    mixed_std = lam * std + (1 - lam) * std[partner]
    return (images - mean) / std * mixed_std + mixed_mean


def nt_xent(first: Tensor, second: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent over 2B L2-normalised embeddings: the positive of view i is the other view of the
    same image, the 2B − 2 other embeddings are its negatives."""
    embeddings = torch.cat([first, second])
    similarity = embeddings @ embeddings.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = len(first)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(embeddings.device)
    return F.cross_entropy(similarity, positives)


@METHODS.register("kd3")
class KD3(Method):
    """Dynamic teacher+student selection, a shared teacher classifier with weighted feature alignment, and
    MixDistribution contrastive learning, re-selecting the web images every epoch."""

    name = "kd3"
    consumes = frozenset({"web"})
    Config = KD3Config

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: KD3Config, ctx: RunContext) -> None:
        super().__init__(teacher, student, cfg, ctx)
        probe = torch.zeros(2, ctx.channels, ctx.image_size, ctx.image_size, device=ctx.device)
        with torch.no_grad():
            teacher_map = teacher.forward_feature_map(probe)
            student_map = student.forward_feature_map(probe)
        map_size = min(teacher_map.shape[-1], student_map.shape[-1])
        projector = Projector(
            student.feature_map_channels, teacher.feature_map_channels, cfg.projector_factor
        )
        head = SharedHead(teacher, teacher_map)
        self.student = SharedClassifierStudent(student, projector, head, map_size).to(ctx.device)
        self.embed_student = EmbedHead(student.feature_dim, cfg.embed_dim).to(ctx.device)
        self.embed_teacher = EmbedHead(teacher.feature_dim, cfg.embed_dim).to(ctx.device)
        trainable = [
            p
            for module in (self.student, self.embed_student, self.embed_teacher)
            for p in module.parameters()
            if p.requires_grad
        ]
        self.optimizer = cfg.optim.student.optimizer(trainable)
        self.vote_epochs = max(round(cfg.teacher_vote * cfg.epochs), 1)

    def stages(self) -> list[Stage]:
        return [self.cfg.stage()]

    def players(self) -> dict[str, nn.Module]:
        return {
            "student": self.student,
            "embed_student": self.embed_student,
            "embed_teacher": self.embed_teacher,
        }

    def player_options(self) -> dict[str, PlayerOptions]:
        # Without the contrastive term the student's pooled features (LeNet's hidden layer) feed no loss.
        return {"student": PlayerOptions(find_unused_parameters=not self.cfg.mix_distribution)}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.optimizer}

    def selection_weight(self, epoch: int) -> float:
        """α(e), or 1 when the student has no vote (the DFND-style ablation)."""
        return teacher_weight(epoch, self.vote_epochs) if self.cfg.student_vote else 1.0

    @torch.no_grad()
    def begin_epoch(self, data: Streams, epoch: int) -> tuple[int, dict[str, float]]:
        cfg: KD3Config = self.cfg
        alpha = self.selection_weight(epoch)
        student = unwrap(self.student).eval()
        units, origins, confidences, predictions = [], [], [], []
        for batch in data.scan("web", cfg.scan_batch_size, augment=cfg.score_augmented):
            images = batch["augmented"] if cfg.score_augmented else batch["image"]
            with self.ctx.autocast():
                logits = alpha * self.teacher(images).float()
                if alpha < 1:
                    logits = logits + (1 - alpha) * student(images).float()
            confidence, prediction = torch.softmax(logits, 1).max(1)
            confidences.append(confidence)
            predictions.append(prediction)
            units.append((batch["unit"] * 255).round().to(torch.uint8).cpu())
            origins.append(batch["label"])
        confidence, prediction, labels = torch.cat(confidences), torch.cat(predictions), torch.cat(origins)
        if cfg.select:
            keep, thresholds = select_confident(
                confidence, prediction, cfg.p_cutoff, cfg.class_adaptive, self.ctx
            )
        else:
            keep, thresholds = torch.ones_like(prediction, dtype=torch.bool), confidence.new_zeros(1)
        selected_steps = data.use_selection("web", torch.cat(units)[keep.cpu()], labels[keep].cpu(), epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(epoch)
        steps = cfg.epoch_steps(selected_steps)
        return steps, {
            **selection_metrics(keep, prediction, labels, self.ctx),
            "select/alpha": alpha,
            "select/threshold_min": float(thresholds.min()),
            "select/steps": float(steps),
            "student/extra_parameters": float(student.extra_parameters()),
        }

    def train_step(self, data: Streams) -> Metrics:
        cfg: KD3Config = self.cfg
        images = data.next("web")["image"]
        for module in (self.student, self.embed_student, self.embed_teacher):
            module.train()
        with torch.no_grad(), self.ctx.autocast():
            teacher_map = self.teacher.forward_feature_map(images)
            teacher_features = self.teacher.pool_features(teacher_map)
            teacher_logits = self.teacher.fc(teacher_features).float()
        with self.ctx.autocast():
            student_logits, student_features, projected = self.student(images, features=True)
            student_logits, projected = student_logits.float(), projected.float()
        metrics: Metrics = {}
        if cfg.feature_alignment:
            loss = self._alignment_loss(projected, teacher_map.float(), student_logits, teacher_logits)
            metrics["loss/feature_alignment"] = loss.detach()
        else:
            loss = kd_loss(student_logits, teacher_logits, cfg.kd_temperature)
            metrics["loss/kd"] = loss.detach()
        if cfg.mix_distribution:
            contrastive = self._contrastive_loss(images, student_features.float(), teacher_features.float())
            loss = loss + cfg.mix_weight * contrastive
            metrics["loss/contrastive"] = contrastive.detach()
        self.ctx.step(loss, self.optimizer, "student")
        agreement = (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean()
        return {
            **metrics,
            "loss/total": loss.detach(),
            "train/agreement": agreement.detach(),
            "lr/student": self.optimizer.param_groups[0]["lr"],
            "images": float(len(images)),
        }

    def _alignment_loss(
        self, projected: Tensor, teacher_map: Tensor, student_logits: Tensor, teacher_logits: Tensor
    ) -> Tensor:
        """L_fa = mean w_i·(P(f_S)_i − f_T,i)², w_i = sigmoid(‖z_S,i − z_T,i‖₂) detached (§5.2 item 2)."""
        if teacher_map.shape[-1] > projected.shape[-1]:
            teacher_map = F.adaptive_avg_pool2d(teacher_map, projected.shape[-2:])
        squared = (projected - teacher_map).pow(2)
        if not self.cfg.weighted_alignment:
            return squared.mean()
        weights = torch.sigmoid((student_logits - teacher_logits).norm(dim=1)).detach()
        return (weights.view(-1, 1, 1, 1) * squared).mean()

    def _contrastive_loss(self, images: Tensor, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """NT-Xent between each image and its MixDistribution view, on both networks' embeddings."""
        cfg: KD3Config = self.cfg
        mixed = mix_distribution(images, self.ctx.generator, cfg.mix_alpha)
        with torch.no_grad(), self.ctx.autocast():
            teacher_mixed = self.teacher.pool_features(self.teacher.forward_feature_map(mixed)).float()
        with self.ctx.autocast():
            student_mixed = self.student(mixed, pooled_only=True)
            student_term = nt_xent(
                self.embed_student(student_features),
                self.embed_student(student_mixed.float()),
                cfg.contrastive_temperature,
            )
            teacher_term = nt_xent(
                self.embed_teacher(teacher_features),
                self.embed_teacher(teacher_mixed),
                cfg.contrastive_temperature,
            )
        return student_term.float() + teacher_term.float()
