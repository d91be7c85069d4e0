"""Data-free methods (DFAD, DFQ, DeepInversion, TA-DFKD) and their shared losses, in one process on CPU."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import step_metrics
from torch import nn

from rayoodkd.config import resolve_config
from rayoodkd.engine.checkpoint import load_state
from rayoodkd.engine.loop import run_worker
from rayoodkd.engine.session import LocalSession
from rayoodkd.methods import METHODS, RunContext
from rayoodkd.methods import tadfkd as tadfkd_module
from rayoodkd.methods.base import kd_loss
from rayoodkd.methods.losses import BNStatistics, balance_loss, jsdiv, l2_prior, onehot_loss, tv_prior
from rayoodkd.methods.mosaickd import balance_loss as mosaickd_balance_loss
from rayoodkd.methods.tadfkd import Selection, fill_selected_batch, gmm_select, teacher_losses
from rayoodkd.models import build_classifier
from rayoodkd.teacher_io import load_teacher

MEAN, STD = (0.13,), (0.31,)

# Tiny settings per method: a few images per step, narrow generators.
TINY = {
    "dfad": {"batch_size": 8, "nz": 8, "ngf": 4, "kd_steps": 2},
    "dfq": {"batch_size": 8, "nz": 8, "ngf": 4, "kd_steps": 2, "temperature": 4.0},
    "deepinv": {
        "batch_size": 8,
        "inversion_steps": 3,
        "kd_steps": 2,
        "pool_size": 12,
        "augment": "crop",
    },
    "tadfkd": {"batch_size": 8, "nz": 8, "ngf": 4, "kd_steps": 2, "augment": "crop", "max_draws": 4},
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _context(seed: int = 0, max_steps: int = 10) -> RunContext:
    return RunContext(
        device=torch.device("cpu"),
        rank=0,
        world_size=1,
        generator=torch.Generator().manual_seed(seed),
        num_classes=10,
        image_size=28,
        channels=1,
        mean=MEAN,
        std=STD,
        max_steps=max_steps,
    )


def _method(name: str, teacher: nn.Module, student: nn.Module | None = None, **extra: object):
    torch.manual_seed(1)
    if student is None:
        student = build_classifier("lenet5_half", num_classes=10, in_channels=1, image_size=28)
    cls = METHODS.get(name)
    return cls(teacher, student, cls.Config(**{**TINY[name], **extra}), _context())


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


# ---------------------------------------------------------------------------------------------- losses


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    ).eval()
    for module in (net[1], net[4]):
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
        module.weight.data.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("variant", ["sum", "concat"])
def test_bn_hooks_match_manual_statistics(variant: str) -> None:
    net = _bn_net()
    hooks = BNStatistics(net, variant)
    x = torch.randn(5, 2, 9, 9)
    net(x)
    inputs = [net[0](x), net[3](net[2](net[1](net[0](x))))]
    means = [i.permute(1, 0, 2, 3).reshape(i.shape[1], -1).mean(1) for i in inputs]
    flat = [i.permute(1, 0, 2, 3).reshape(i.shape[1], -1) for i in inputs]
    unbiased = variant == "concat"
    variances = [f.var(1, unbiased=unbiased) for f in flat]
    for (mean, var), m, v in zip(hooks.stats, means, variances, strict=True):
        torch.testing.assert_close(mean, m)
        torch.testing.assert_close(var, v)
    bns = [net[1], net[4]]
    if variant == "sum":
        expected = sum(
            (v - bn.running_var).norm() + (m - bn.running_mean).norm()
            for m, v, bn in zip(means, variances, bns, strict=True)
        )
    else:
        expected = (torch.cat(means) - torch.cat([bn.running_mean for bn in bns])).norm() + (
            torch.cat(variances) - torch.cat([bn.running_var for bn in bns])
        ).norm()
    torch.testing.assert_close(hooks.loss(), expected)
    other = net(torch.randn(5, 2, 9, 9))
    assert other is not None and not torch.allclose(hooks.loss(), expected)  # overwritten by each forward
    hooks.remove()


def test_bn_variants_differ_and_no_bn_gives_zero() -> None:
    net = _bn_net()
    total = {}
    for variant in ("sum", "concat"):
        hooks = BNStatistics(net, variant)
        net(torch.randn(4, 2, 9, 9, generator=torch.Generator().manual_seed(3)))
        total[variant] = hooks.loss().item()
        hooks.remove()
    assert total["sum"] != pytest.approx(total["concat"])
    assert BNStatistics(nn.Sequential(nn.Conv2d(1, 1, 1))).loss().item() == 0.0


def test_bn_statistics_ignore_no_grad_forwards() -> None:
    net = _bn_net()
    hooks = BNStatistics(net)
    x = torch.randn(4, 2, 9, 9, generator=torch.Generator().manual_seed(3))
    net(x)
    expected = hooks.loss().item()
    with torch.no_grad():
        net(torch.randn(4, 2, 9, 9))
    with pytest.raises(RuntimeError, match="no grad-enabled forward"):
        hooks.loss()
    net(x)
    assert hooks.loss().item() == pytest.approx(expected)


def _hand_js(s: list[list[float]], t: list[list[float]], tau: float, reduction: str) -> float:
    total, batch, classes = 0.0, len(s), len(s[0])
    for s_row, t_row in zip(s, t, strict=True):
        es = [math.exp(v / tau) for v in s_row]
        et = [math.exp(v / tau) for v in t_row]
        p = [v / sum(es) for v in es]
        q = [v / sum(et) for v in et]
        m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]

        def clip(v: float) -> float:
            return min(max(v, 0.01), 0.99)

        for pc, qc, mc in zip(p, q, m, strict=True):
            mc = clip(mc)
            total += 0.5 * mc * (math.log(mc) - math.log(clip(pc)))
            total += 0.5 * mc * (math.log(mc) - math.log(clip(qc)))
    return total / (batch if reduction == "batchmean" else batch * classes)


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_jsdiv_matches_hand_computation(reduction: str) -> None:
    s = [[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 9.0, -3.0], [1.0, 1.0, 1.0, 1.0]]
    t = [[-1.0, 3.0, 0.0, 0.2], [0.0, 0.0, 0.0, 8.0], [1.0, 1.0, 1.0, 1.0]]
    for tau in (1.0, 3.0):
        got = jsdiv(torch.tensor(s), torch.tensor(t), tau, reduction).item()
        assert got == pytest.approx(_hand_js(s, t, tau, reduction), rel=1e-5)
    ratio = jsdiv(torch.tensor(s), torch.tensor(t), 3.0, "batchmean") / jsdiv(
        torch.tensor(s), torch.tensor(t), 3.0, "mean"
    )
    assert ratio.item() == pytest.approx(4.0)  # 'mean' divides by B·C instead of B


def test_priors_match_hand_computation() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(logits, 1)
    assert onehot_loss(logits).item() == pytest.approx(-math.log(p[0, 0].item()), rel=1e-5)
    mean = p.mean(0)
    assert balance_loss(logits).item() == pytest.approx(float((mean * mean.log()).sum()), rel=1e-5)
    assert balance_loss(logits, 10.0).item() == pytest.approx(float((mean * mean.log10()).sum()), rel=1e-5)
    image = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]], dtype=torch.float64)
    # horizontal (1, 2), vertical (2, 3), diagonals (1 − 2 = −1) and (0 − 4 = −4)
    expected = math.sqrt(1 + 4) + math.sqrt(4 + 9) + 1.0 + 4.0
    assert tv_prior(image).item() == pytest.approx(expected)
    assert l2_prior(image).item() == pytest.approx(math.sqrt(21.0))


def test_the_losses_through_a_very_confident_teacher_stay_finite() -> None:
    """A teacher so confident that some softmax probabilities underflow to 0 (a ResNet-8 on a generator's
    first samples): the official forms give NaN gradients to the generator (0·log 0); ours do not."""
    logits = torch.tensor([[120.0, 0.0, -5.0], [110.0, 2.0, 0.0]], requires_grad=True)
    student = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 2.0]], requires_grad=True)
    assert torch.softmax(logits, 1)[:, 1:].max() == 0  # underflowed
    for loss in (kd_loss(student, logits, 1.0), balance_loss(logits), mosaickd_balance_loss(logits)):
        logits.grad = None
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()

    def official_kd(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
        log_p, q = torch.log_softmax(s / tau, 1), torch.softmax(t / tau, 1)
        return F.kl_div(log_p, q, reduction="batchmean") * tau**2

    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=generator), 5 * torch.randn(4, 10, generator=generator)
    assert kd_loss(s, t, 4.0).item() == pytest.approx(official_kd(s, t, 4.0).item(), rel=1e-6)
    assert kd_loss(student, logits, 1.0).item() == pytest.approx(official_kd(student, logits, 1.0).item())


# ------------------------------------------------------------------------------------ TA-DFKD selection


def test_gmm_keeps_the_low_loss_half() -> None:
    generator = torch.Generator().manual_seed(0)
    confident = F.one_hot(torch.randint(0, 10, (32,), generator=generator), 10) * 12.0
    confident = confident + 0.5 * torch.randn(32, 10, generator=generator)
    unsure = 0.3 * torch.randn(32, 10, generator=generator)
    logits = torch.cat([confident, unsure])
    losses = teacher_losses(logits)
    selection = gmm_select(losses, 0.5, random_state=7)
    assert bool(selection.mask[:32].all())
    assert int(selection.mask[32:].sum()) <= 1
    assert selection.clean_mean < selection.noisy_mean
    again = gmm_select(losses, 0.5, random_state=7)
    torch.testing.assert_close(again.clean_posterior, selection.clean_posterior, rtol=0, atol=0)
    strict = gmm_select(losses, 0.999, random_state=7)
    assert int(strict.mask.sum()) <= int(selection.mask.sum())


def test_gmm_keeps_everything_when_losses_are_equal() -> None:
    selection = gmm_select(torch.full((6,), 0.3), 0.5, random_state=0)
    assert bool(selection.mask.all()) and selection.fraction == 1.0


def test_the_documented_kd_datafree_flavour_of_dfq_resolves_to_its_settings() -> None:
    """docs/methods/datafree.md's overrides for MosaicKD's kd_datafree.py, as typed on a command line."""
    flavour = [
        "dfq.generator=mosaickd",
        "dfq.nz=100",
        "dfq.bn_variant=concat",
        "dfq.balance_log_base=10",
        "dfq.temperature=1",
        "dfq.kd_steps=5",
        "dfq.batch_size=128",
        "dfq.optim.student={name: adam, lr: 0.001, weight_decay: 1e-4, schedule: cosine, eta_min: 0}",
        "dfq.optim.generator={name: adam, lr: 0.001, betas: [0.9, 0.999], schedule: cosine}",
        "dfq.student_eval_in_g_step=false",
        "dfq.generator_eval_for_kd=false",
    ]
    cfg = resolve_config("mnist-dfq", flavour).dfq
    student, generator = cfg.optim.student, cfg.optim.generator
    assert (student.name, student.weight_decay, student.schedule, student.eta_min) == (
        "adam",
        1e-4,
        "cosine",
        0,
    )
    assert (generator.name, generator.betas, generator.schedule) == ("adam", (0.9, 0.999), "cosine")
    assert cfg.balance_log_base == "10" and cfg.temperature == cfg.adv_temperature == 1.0


def test_the_whole_batch_flip_is_a_fair_coin() -> None:
    """torchvision's RandomHorizontalFlip (p = 0.5) after RandomCrop(32, padding=4), once per batch."""
    image = torch.zeros(1, 1, 32, 32)
    image[..., :16] = 1.0  # bright left half: a crop moves it by at most 4 columns, a flip to the right
    generator = torch.Generator().manual_seed(0)
    flips = 0
    for _ in range(4000):
        out = tadfkd_module.batch_crop_flip(image, "crop_flip", generator)
        left, right = out[..., :12].mean(), out[..., 20:].mean()
        assert min(left, right) == 0.0 and max(left, right) > 0.4
        flips += int(right > left)
    assert abs(flips / 4000 - 0.5) < 0.03


def test_fill_fills_exactly_and_stops_at_its_bound() -> None:
    generator = torch.Generator().manual_seed(0)
    calls = []

    def draw(selected: int):
        def fn() -> tuple[torch.Tensor, torch.Tensor]:
            calls.append(1)
            mask = torch.zeros(8, dtype=torch.bool)
            mask[:selected] = True
            return torch.arange(8.0).view(8, 1) + 10 * len(calls), mask

        return fn

    full = fill_selected_batch(draw(5), batch_size=8, max_draws=10, generator=generator)
    assert (len(full.images), full.draws, full.bound_hit) == (8, 2, False)
    assert full.images[:5, 0].tolist() == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert set(full.images[5:, 0].tolist()) <= {20.0, 21.0, 22.0, 23.0, 24.0}  # random subsample of draw 2
    calls.clear()
    short = fill_selected_batch(draw(1), batch_size=8, max_draws=3, generator=generator)
    assert (len(short.images), short.draws, short.bound_hit, len(calls)) == (3, 3, True, 3)


def test_tadfkd_reports_the_bound_and_falls_back_when_nothing_is_selected(
    bn_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def select_none(losses: torch.Tensor, threshold: float, random_state: int) -> Selection:
        mask = torch.zeros(len(losses), dtype=torch.bool)
        return Selection(mask, mask.float(), 0.1, 0.9)

    monkeypatch.setattr(tadfkd_module, "gmm_select", select_none)
    method = _method("tadfkd", load_teacher(bn_teacher)[0], max_draws=2)
    with pytest.warns(RuntimeWarning, match="max_draws"):
        metrics = step_metrics(method, None)
    assert metrics["select/bound_hit"] == 2.0 and metrics["select/empty_fallback"] == 2.0
    assert metrics["select/fraction"] == 0.0 and metrics["images"] == 16.0
    assert metrics["select/g_batch"] == 8.0


# ----------------------------------------------------------------------------------- the methods, one step


@pytest.mark.parametrize("name", ["dfad", "dfq", "deepinv", "tadfkd"])
def test_one_step_trains_student_and_synthesis_not_teacher(name: str, bn_teacher: Path) -> None:
    teacher = load_teacher(bn_teacher)[0]
    method = _method(name, teacher)
    teacher_before, student_before = _snapshot(teacher), _snapshot(method.student)
    generator = getattr(method, "generator", None)
    generator_before = _snapshot(generator) if generator is not None else None
    metrics = step_metrics(method, None)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["images"] > 0
    assert _changed(student_before, method.student)
    assert not _changed(teacher_before, teacher)
    if generator_before is not None:
        assert _changed(generator_before, generator)
    else:
        assert len(method.pool) == TINY[name]["batch_size"] and method.pool.dtype == torch.uint8
    samples = method.samples()
    assert samples is not None and samples.device.type == "cpu" and not samples.requires_grad
    assert samples.shape[1:] == (1, 28, 28) and float(samples.min()) >= 0 and float(samples.max()) <= 1


ADVERSARIAL = {"dfad": "loss/generator", "dfq": "loss/adv", "deepinv": "loss/adv", "tadfkd": "loss/js"}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_term_uses_the_real_student(name: str, tiny_teacher: Path) -> None:
    """With a student identical to the teacher (what the toolkit's ``student=teacher`` bug amounts to) the
    adversarial term is 0; with the real student it is not, so the term is computed on the student."""
    teacher = load_teacher(tiny_teacher)[0]
    extra = {"optim": {"student": {"lr": 1e-30}}} | ({} if name == "dfad" else {"bn": 0.0})
    twin = copy.deepcopy(teacher).requires_grad_(True)
    twin_metrics = step_metrics(_method(name, teacher, twin, **extra), None)
    real_metrics = step_metrics(_method(name, teacher, **extra), None)
    assert abs(twin_metrics[ADVERSARIAL[name]]) < 1e-6
    assert abs(real_metrics[ADVERSARIAL[name]]) > 1e-5


def test_deepinv_reports_a_synthesis_cost_that_is_never_finite(bn_teacher: Path) -> None:
    """A NaN cost at every inversion step is still in the step's losses, where the engine's NaN stop sees
    it (no step is ever "best", which used to leave the losses empty)."""
    teacher = load_teacher(bn_teacher)[0]
    next(m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)).running_var.fill_(float("nan"))
    _, terms = _method("deepinv", teacher).synthesize()
    assert math.isnan(float(terms["loss/synthesis"])) and math.isnan(float(terms["loss/bn"]))


def test_bn_methods_refuse_a_teacher_without_batchnorm(tiny_teacher: Path) -> None:
    teacher = load_teacher(tiny_teacher)[0]
    for name in ("dfq", "deepinv", "tadfkd"):
        with pytest.raises(ValueError, match=rf"{name}: bn weight > 0 needs a teacher with BatchNorm2d"):
            _method(name, teacher)
        step_metrics(_method(name, teacher, bn=0.0), None)


def test_every_registered_method_builds_from_its_default_config(bn_teacher: Path) -> None:
    teacher = load_teacher(bn_teacher)[0]
    for name in METHODS.names():
        cls = METHODS.get(name)
        student = build_classifier("lenet5_half", num_classes=10, in_channels=1, image_size=28)
        method = cls(teacher, student, cls.Config(), _context())
        assert method.players() and method.optimizers()


# ------------------------------------------------------------------------------------ exact resumption


def _run_config(teacher: Path, method: str) -> dict:
    overrides = [
        f"method={method}",
        "max_steps=4",
        "eval.every=2",
        "log_every=1",
        "data.ood=null",
        f"teacher.checkpoint={teacher}",
    ] + [f"{method}.{k}={v}" for k, v in TINY[method].items()]
    return {
        "config": resolve_config("demo", overrides).model_dump(mode="json"),
        "teacher_path": str(teacher),
        "tracking_uri": None,
        "mlflow_run_id": None,
    }


def _session(tmp_path: Path, resume_from: Path | None = None) -> LocalSession:
    generator = torch.Generator().manual_seed(3)
    images, labels = (
        torch.rand(32, 1, 28, 28, generator=generator),
        torch.randint(0, 10, (32,), generator=generator),
    )
    return LocalSession(
        streams={},
        eval_sets={"val": (images, labels), "test": (images, labels)},
        checkpoint_root=tmp_path,
        resume_from=resume_from,
    )


@pytest.mark.parametrize("method", ["tadfkd", "dfq", "deepinv"])
def test_resumed_run_equals_uninterrupted(tmp_path: Path, bn_teacher: Path, method: str) -> None:
    straight = _session(tmp_path / "a")
    run_worker(_run_config(bn_teacher, method), straight)
    resumed = _session(tmp_path / "b", resume_from=straight.checkpoints[0])
    run_worker(_run_config(bn_teacher, method), resumed)
    assert resumed.reports[-1]["resumed_from_step"] == 2
    final_a, final_b = load_state(straight.checkpoints[-1]), load_state(resumed.checkpoints[-1])
    for player in final_a["players"]:
        for name, tensor in final_a["players"][player].items():
            torch.testing.assert_close(final_b["players"][player][name], tensor, rtol=0, atol=0)
    if method == "deepinv":
        pool_a, pool_b = final_a["ranks"][0]["method"]["pool"], final_b["ranks"][0]["method"]["pool"]
        assert len(pool_a) > 0 and torch.equal(pool_a, pool_b)
    assert resumed.reports[-1]["test/top1"] == straight.reports[-1]["test/top1"]
