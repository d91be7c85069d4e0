"""MosaicKD (``method=mosaickd``): one outer iteration, patch sizes, reductions, ablations, resumption."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from helpers import step_metrics
from torch import Tensor, nn

from rayoodkd.config import ConfigError, resolve_config
from rayoodkd.engine.checkpoint import load_state
from rayoodkd.engine.loop import run_worker
from rayoodkd.engine.session import LocalSession
from rayoodkd.methods import RunContext
from rayoodkd.methods.mosaickd import (
    MosaicKD,
    MosaicKDConfig,
    align_loss,
    balance_loss,
    patch_bce,
    select_ood_subset,
)
from rayoodkd.models import build_classifier, receptive_field, total_stride

SIZE = 16
TINY = {"nz": 8, "ngf": 4, "ndf": 4, "kd_steps": 2}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny CPU workloads: one intra-op thread avoids OpenMP spin-waiting on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeStreams:
    """An endless OOD stream of random images in [0, 1] (normalised like the engine does); counts draws."""

    def __init__(self, ctx: RunContext, batch: int = 8) -> None:
        self.ctx, self.batch = ctx, batch
        self.draws: list[bool] = []
        self.generator = torch.Generator().manual_seed(0)

    def next(self, stream: str, augment: bool = True) -> dict[str, Tensor]:
        assert stream == "ood"
        self.draws.append(augment)
        images = torch.rand(self.batch, self.ctx.channels, SIZE, SIZE, generator=self.generator)
        label = torch.full((self.batch,), -1)
        return {"image": self.ctx.normalize(images), "unit": images, "label": label}


def _context(num_classes: int = 10) -> RunContext:
    return RunContext(
        device=torch.device("cpu"),
        rank=0,
        world_size=1,
        generator=torch.Generator().manual_seed(0),
        num_classes=num_classes,
        image_size=SIZE,
        channels=1,
        mean=(0.5,),
        std=(0.25,),
        max_steps=10,
    )


def _method(num_classes: int = 10, **overrides: object) -> MosaicKD:
    torch.manual_seed(0)
    ctx = _context(num_classes)
    teacher = build_classifier("lenet5", num_classes=num_classes, in_channels=1, image_size=SIZE)
    student = build_classifier("lenet5_half", num_classes=num_classes, in_channels=1, image_size=SIZE)
    cfg = MosaicKDConfig(**{**TINY, **overrides})
    return MosaicKD(teacher.eval().requires_grad_(False), student, cfg, ctx)


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _measured_receptive_field(discriminator: nn.Module) -> int:
    """Side of the input region that the central logit depends on, found by backpropagation (eval mode, so
    BatchNorm does not couple positions)."""
    probe = copy.deepcopy(discriminator).eval()
    x = torch.randn(1, 1, SIZE, SIZE, requires_grad=True)
    out = probe(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    assert rows.max() - rows.min() == cols.max() - cols.min()
    return int(rows.max() - rows.min() + 1)


# ------------------------------------------------------------------------------------------ one iteration


def test_one_outer_iteration_updates_g_d_s_and_leaves_teacher_untouched() -> None:
    method = _method()
    before = {name: _snapshot(m) for name, m in {**method.players(), "teacher": method.teacher}.items()}
    data = FakeStreams(method.ctx)
    metrics = step_metrics(method, data)
    assert set(method.players()) == {"generator", "discriminator", "student"}
    for name in ("generator", "discriminator", "student"):
        params = dict(method.players()[name].named_parameters())
        changed = [k for k, p in params.items() if not torch.equal(p, before[name][k])]
        assert changed == list(params), f"{name}: unchanged {sorted(set(params) - set(changed))}"
    for key, value in method.teacher.state_dict().items():
        assert torch.equal(value, before["teacher"][key])
    assert all(p.grad is None for p in method.teacher.parameters())
    # one un-augmented D view, then one augmented OOD batch per KD step
    assert data.draws == [False] + [True] * TINY["kd_steps"]
    assert metrics["images"] == TINY["kd_steps"] * (8 + 8)
    for key in ("loss/d", "loss/g", "loss/local", "loss/align", "loss/adv", "loss/balance", "loss/kd"):
        assert math.isfinite(metrics[key]), key
    assert 0 <= metrics["g/class_entropy"] <= math.log(10) + 1e-6
    assert 0.1 <= metrics["g/max_class_fraction"] <= 1
    samples = method.samples()
    assert samples is not None and samples.shape == (8, 1, SIZE, SIZE) and samples.device.type == "cpu"
    assert samples.min() >= 0 and samples.max() <= 1 and not samples.requires_grad


def test_schedulers_step_once_per_outer_iteration() -> None:
    method = _method(optim={"student": {"lr": 0.1}})
    step_metrics(method, FakeStreams(method.ctx))
    expected = 0.1 * (1 + math.cos(math.pi / 10)) / 2  # cosine with T_max = max_steps = 10
    assert method.optimizer_s.param_groups[0]["lr"] == pytest.approx(expected)
    assert {s.last_epoch for s in method.schedulers().values()} == {1}


# ------------------------------------------------------------------------------------------- patch size


@pytest.mark.parametrize(("patch_size", "stride"), [(1, 1), (3, 2), (7, 4), (10, 4), (16, 2)])
def test_discriminator_receptive_field_is_the_configured_patch_size(patch_size: int, stride: int) -> None:
    method = _method(patch_size=patch_size, patch_stride=stride)
    assert method.discriminator is not None
    assert _measured_receptive_field(method.discriminator) == patch_size
    assert receptive_field(method.discriminator) == patch_size
    assert total_stride(method.discriminator) == stride
    assert method.facts() == {"d/receptive_field": patch_size, "d/patch_stride": stride}


@pytest.mark.parametrize(("patch_size", "stride"), [(10, 4), (4, 2), (5, 3)])
def test_every_pixel_is_judged_once_the_patch_grid_has_cycled_through_its_offsets(
    patch_size: int, stride: int
) -> None:
    method = _method(patch_size=patch_size, patch_stride=stride)
    remainder = (SIZE - patch_size) % stride
    discriminator = method.discriminator.eval()

    def judged(step: int) -> Tensor:
        method.ctx.stage_step = step
        images = torch.zeros(1, 1, SIZE, SIZE, requires_grad=True)
        discriminator(method._patch_grid_view(images)).sum().backward()
        return images.grad[0, 0] != 0

    cycle = [judged(step) for step in range(1, (remainder + 1) ** 2 + 1)]
    assert torch.stack(cycle).any(0).all()
    if remainder:  # one grid leaves the far rows and columns out
        assert not cycle[0].all()


def test_full_image_and_official_discriminators() -> None:
    full = _method(discriminator="full_image")
    assert full.receptive_field == SIZE and full.discriminator(torch.zeros(2, 1, SIZE, SIZE)).numel() == 2
    official = _method(discriminator="official")
    assert (official.receptive_field, official.output_stride) == (10, 4)
    assert _measured_receptive_field(official.discriminator) == 10


def test_patch_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="discriminator=official has a fixed receptive field 10"):
        resolve_config(
            "demo", ["method=mosaickd", "mosaickd.discriminator=official", "mosaickd.patch_size=8"]
        )
    with pytest.raises(ConfigError, match=r"mosaickd\.patch_size"):
        resolve_config("demo", ["method=mosaickd", "mosaickd.patch_size=33"])
    with pytest.raises(ValueError, match=r"mosaickd\.patch_size=20 exceeds the teacher's image size 16"):
        _method(patch_size=20)


# --------------------------------------------------------------------------------------------- reductions


def test_loss_reductions_match_hand_computation() -> None:
    logits = torch.tensor([[[[0.0, 1.0], [-1.0, 2.0]]], [[[3.0, 0.0], [0.0, -2.0]]]])  # B=2, 2×2 patches

    def softplus(v: float) -> float:  # BCE(l, 1) = softplus(−l), BCE(l, 0) = softplus(l)
        return math.log1p(math.exp(v))

    values = logits.flatten().tolist()
    assert patch_bce(logits, True, 2).item() == pytest.approx(sum(softplus(-v) for v in values) / 2)
    assert patch_bce(logits, False, 4).item() == pytest.approx(sum(softplus(v) for v in values) / 4)
    assert patch_bce(logits, True, 2, "mean").item() == pytest.approx(sum(softplus(-v) for v in values) / 8)

    teacher_logits = torch.tensor([[0.0, 0.0], [math.log(1 / 4), math.log(3 / 4)]])
    h1, h2 = math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert align_loss(teacher_logits).item() == pytest.approx((h1 + h2) / 2)  # natural log
    p_mean = [(0.5 + 0.25) / 2, (0.5 + 0.75) / 2]
    assert balance_loss(teacher_logits).item() == pytest.approx(sum(p * math.log2(p) for p in p_mean))


class _Fixed(nn.Module):
    """Returns fixed logits (row i of the batch gets row i mod len), kept in the graph of the input."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x: Tensor) -> Tensor:
        index = torch.arange(len(x)) % len(self.logits)
        return self.logits[index] + 0 * x.sum()


@pytest.mark.parametrize(("reduction", "patches"), [("sum", 1), ("mean", 4)])
def test_train_step_wires_the_reductions_and_weights(reduction: str, patches: int) -> None:
    method = _method(num_classes=2, local_weight=0.5, align_weight=2.0, local_reduction=reduction)
    patch_logits = torch.tensor([[[[0.0, 1.0], [-1.0, 2.0]]]])
    teacher_logits = torch.tensor([[0.0, 0.0], [math.log(1 / 4), math.log(3 / 4)]])
    method.discriminator = _Fixed(patch_logits)
    method.teacher = _Fixed(teacher_logits)
    method.student = _Fixed(teacher_logits)  # S = T on every image: L_adv = 0, L_kd = 0
    metrics = step_metrics(method, FakeStreams(method.ctx, batch=4))
    d = patch_logits.expand(4, 1, 2, 2)
    assert metrics["loss/local"] == pytest.approx(patch_bce(d, True, 4).item() / patches)
    expected_d = 0.5 * (patch_bce(d, False, 8) + patch_bce(d, True, 8)).item() / patches
    assert metrics["loss/d"] == pytest.approx(expected_d)
    assert metrics["loss/align"] == pytest.approx(align_loss(teacher_logits).item())
    assert metrics["loss/balance"] == pytest.approx(balance_loss(teacher_logits).item())
    assert metrics["loss/adv"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["loss/kd"] == pytest.approx(0.0, abs=1e-7)
    expected_g = 2.0 * metrics["loss/align"] + 0.5 * metrics["loss/local"] + 10.0 * metrics["loss/balance"]
    assert metrics["loss/g"] == pytest.approx(expected_g)


def test_the_discriminator_sees_real_and_synthetic_images_in_one_colour_space() -> None:
    """A stream normalised otherwise (data.transforms.ood.normalizer) must not tell D real from fake."""

    class OtherlyNormalised(FakeStreams):
        def next(self, stream: str, augment: bool = True) -> dict[str, Tensor]:
            batch = super().next(stream, augment)
            return {**batch, "image": (batch["unit"] - 0.1) / 0.9}

    method = _method(patch_size=4, patch_stride=2)  # a grid that covers 16 px: D sees whole images
    data = OtherlyNormalised(method.ctx)
    seen: list[Tensor] = []
    method.discriminator.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0]))
    method.train_step(data)
    data.generator.manual_seed(0)
    unit = torch.rand(8, 1, SIZE, SIZE, generator=data.generator)
    torch.testing.assert_close(seen[1], method.ctx.normalize(unit))  # the D step's real half


def test_ood_kd_normalizer_renormalises_the_kd_view_only() -> None:
    method = _method(ood_kd_normalizer=((0.2,), (0.5,)))
    data = FakeStreams(method.ctx)
    kd_view = method._ood_for_kd(data)
    data.generator.manual_seed(0)
    unit = torch.rand(8, 1, SIZE, SIZE, generator=data.generator)
    torch.testing.assert_close(kd_view, (unit - 0.2) / 0.5)
    with pytest.raises(ConfigError, match="one value per channel"):
        resolve_config("demo", ["method=mosaickd", "mosaickd.ood_kd_normalizer=[[0.1, 0.2], [0.3]]"])


# ---------------------------------------------------------------------------------------------- ablations


def _count_forwards(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_without_discriminator_there_is_no_d_step_and_no_local_term() -> None:
    method = _method(use_discriminator=False)
    assert method.discriminator is None
    assert "discriminator" not in method.players() | method.optimizers() | method.schedulers()
    metrics = step_metrics(method, FakeStreams(method.ctx))
    assert not {"loss/d", "loss/local", "d/real_prob"} & set(metrics) and method.facts() == {}
    assert metrics["loss/g"] == pytest.approx(
        metrics["loss/align"] + 10 * metrics["loss/balance"] + metrics["loss/adv"], rel=1e-5
    )


@pytest.mark.parametrize("use_adversarial", [True, False])
def test_without_adversarial_the_generator_ignores_the_student(use_adversarial: bool) -> None:
    method = _method(use_adversarial=use_adversarial)
    student_calls = _count_forwards(method.student)
    metrics = step_metrics(method, FakeStreams(method.ctx))
    assert student_calls[0] == TINY["kd_steps"] + int(use_adversarial)
    assert ("loss/adv" in metrics) is use_adversarial
    if not use_adversarial:
        assert metrics["loss/g"] == pytest.approx(
            metrics["loss/align"] + metrics["loss/local"] + 10 * metrics["loss/balance"], rel=1e-5
        )


# --------------------------------------------------------------------------------------- OOD subset, resume


def test_select_ood_subset_keeps_the_highest_entropy_images() -> None:
    confidence = torch.tensor([5.0, 0.0, 2.0, 0.5, 9.0, 1.0, 0.1])  # logit gap: smaller = higher entropy
    logits = torch.stack([confidence, torch.zeros_like(confidence), torch.zeros_like(confidence)], 1)
    images = logits.view(-1, 1, 1, 3)
    index = select_ood_subset(nn.Flatten(), images, n=3, batch_size=2)
    assert index.tolist() == [1, 6, 3]


def _blobs(n: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def _session(tmp_path: Path, resume_from: Path | None = None) -> LocalSession:
    return LocalSession(
        streams={"ood": (_blobs(96, 1)[0], torch.full((96,), -1))},
        eval_sets={"val": _blobs(32, 3), "test": _blobs(32, 4)},
        checkpoint_root=tmp_path,
        resume_from=resume_from,
    )


def _config(teacher: Path) -> dict:
    overrides = [
        "method=mosaickd",
        "max_steps=4",
        "eval.every=2",
        "log_every=1",
        "data.batch_size=16",
        f"teacher.checkpoint={teacher}",
        *(f"mosaickd.{k}={v}" for k, v in TINY.items()),
    ]
    return {
        "config": resolve_config("demo", overrides).model_dump(mode="json"),
        "teacher_path": str(teacher),
        "tracking_uri": None,
        "mlflow_run_id": None,
    }


def test_resumed_run_equals_uninterrupted(tmp_path: Path, tiny_teacher: Path) -> None:
    straight = _session(tmp_path / "a")
    run_worker(_config(tiny_teacher), straight)
    resumed = _session(tmp_path / "b", resume_from=straight.checkpoints[0])
    run_worker(_config(tiny_teacher), resumed)
    assert resumed.reports[-1]["resumed_from_step"] == 2
    for key in ("loss/kd", "loss/g", "loss/d", "val/top1", "test/top1"):
        assert resumed.reports[-1][key] == pytest.approx(straight.reports[-1][key], rel=1e-6)
    final_a, final_b = load_state(straight.checkpoints[-1]), load_state(resumed.checkpoints[-1])
    for player in ("student", "generator", "discriminator"):
        for name, tensor in final_a["players"][player].items():
            torch.testing.assert_close(final_b["players"][player][name], tensor, rtol=0, atol=0)
