"""AuG-KD (spec/methods.md §3): its networks, its stage-3 schedule and KD target, its three stages run by the
engine (a kill in stage 2 resumes there exactly), and ``init_from``/``stop_after``, which let a sweep over
stage 3 start every trial from one shared run of stages 1-2."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import logged_images, run_in_process, small_context, step_metrics
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import Tensor, nn

from rayoodkd.config import ConfigError, resolve_config
from rayoodkd.engine.checkpoint import load_state
from rayoodkd.engine.loop import InjectedFailure, Worker, run_worker
from rayoodkd.engine.session import LocalSession
from rayoodkd.launch import launch
from rayoodkd.methods.augkd import AugKD, AugKDConfig, mask_constraint, mixup_weight
from rayoodkd.models.augkd import MASK_SUPREMUM, AnchorNet
from rayoodkd.preflight import check_models, check_stages
from rayoodkd.preflight import method_stages as method_stages_of

TINY = [
    "method=augkd",
    "data.ood=null",
    "data.labelled={source: mnist5k, split: train}",
    "data.batch_size=16",
    "eval.every=3",
    "eval.topk=[1, 3, 5]",
    "log_every=1",
    "augkd.batch_size=16",
    "augkd.nz=16",
    "augkd.ngf=8",
    "augkd.encoder_width=8",
    "augkd.inner_steps=2",
    "augkd.validation_batches=2",
    "augkd.datafree_steps=4",
    "augkd.anchor_epochs=2",
    "augkd.mixup_epochs=3",
]


def _conv_net(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )


def _method(**overrides: object) -> AugKD:
    """AuG-KD on 1×8×8 images with a small BN teacher and student."""
    torch.manual_seed(0)
    cfg = AugKDConfig(nz=8, ngf=8, encoder_width=8, batch_size=32, **overrides)
    return AugKD(_conv_net(8).eval(), _conv_net(4), cfg, small_context(batch_size=16))


class _OneBatch:
    """A ``Streams`` with one fixed labelled batch."""

    def __init__(self, ctx_mean: float = 0.5, ctx_std: float = 0.25) -> None:
        generator = torch.Generator().manual_seed(1)
        self.unit = torch.rand(16, 1, 8, 8, generator=generator)
        self.labels = torch.randint(0, 10, (16,), generator=generator)
        self.image = (self.unit - ctx_mean) / ctx_std

    def next(self, stream: str, augment: bool = True) -> dict[str, Tensor]:
        return {"image": self.image, "unit": self.unit, "label": self.labels}


def test_the_encoder_learns_to_invert_the_generator_on_its_own_samples() -> None:
    method = _method(optim={"encoder": {"lr": 1e-3}})
    method.generator.eval()
    held_out = torch.randn(256, 8, generator=torch.Generator().manual_seed(5))

    def reconstruction_error() -> float:
        # With the held-out batch's own BN statistics, as E trains: its running averages trail Adam's steps,
        # and an eval-mode error swings with them (4.1, 17.4, 12.0, 6.4 at steps 90-210 on one CPU).
        with torch.no_grad():
            images = method.generator(held_out)
            labels = method.teacher(method.ctx.normalize(images)).argmax(1)
            _, mu, _ = method.encoder(images, labels)
        return (mu - held_out).pow(2).sum(1).mean().item()

    before = reconstruction_error()
    for _ in range(150):
        z = method.ctx.randn(32, 8)
        with torch.no_grad():
            images = method.generator(z)
            labels = method.teacher(method.ctx.normalize(images)).argmax(1)
        method.ctx.step(method.encoder_loss(images, z, labels), method.opt_e, "encoder")
    assert reconstruction_error() < 0.5 * before


def test_the_anchor_mask_stays_below_a_third_even_with_saturated_weights() -> None:
    anchor = AnchorNet(16, 10)
    with torch.no_grad():
        for layer in anchor.mask_layers:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(1000)
    labels = torch.arange(10).repeat(4)
    for mode in (True, False):
        mask = anchor.train(mode).mask(labels)
        assert mask.min() >= 0 and mask.max() < MASK_SUPREMUM
    anchors, mask = anchor.train()(z := torch.randn(40, 16), labels)
    unmasked = mask == 0  # A leaves the dimensions its mask does not select exactly as they are
    assert 0 < unmasked.sum() < unmasked.numel()
    torch.testing.assert_close(anchors[unmasked], z[unmasked], rtol=0, atol=0)


def _fit_mask(form: str, batch_size: int) -> Tensor:
    torch.manual_seed(0)
    anchor = AnchorNet(16, 10)
    optimizer = torch.optim.Adam(anchor.parameters(), lr=2e-2)
    labels = torch.arange(batch_size) % 10
    for _ in range(300):
        loss = mask_constraint(anchor.mask(labels), 0.5, form).mean()  # type: ignore[arg-type]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return anchor.mask(labels).sum(1)


def test_the_per_sample_mask_constraint_is_met_and_does_not_depend_on_the_batch_size() -> None:
    """Per sample: the average Σ_j m_ij / sup m → d·(1 − inv) = 8 of 16 dims (inv 0.5), at any batch size.
    The official batch-sum form meets the same target with the whole batch, so each sample's mask shrinks as
    the batch grows. (inv 0.25 asks for 12 of 16 dims, more than the ~9 whose ReLU is alive after init: a
    mask entry the ReLU zeroes gets no gradient, see docs/methods/augkd.md.)"""
    for batch_size in (10, 40):
        per_sample = _fit_mask("per_sample", batch_size) / MASK_SUPREMUM
        assert per_sample.mean().item() == pytest.approx(8, abs=0.2)
    small, large = _fit_mask("batch_sum", 10), _fit_mask("batch_sum", 40)
    assert small.sum().item() == pytest.approx(8, abs=0.2) and large.sum().item() == pytest.approx(8, abs=0.2)
    assert small.mean() > 3 * large.mean()


def test_the_mixup_scheduler_follows_the_spec() -> None:
    epochs, a, b = 200, 0.6, 0.2
    for scheduler in ("linear", "step"):
        assert mixup_weight(0, epochs, a, b, scheduler) == pytest.approx(b)
        assert mixup_weight(120, epochs, a, b, scheduler) == pytest.approx(1.0)
        assert mixup_weight(199, epochs, a, b, scheduler) == 1.0
    assert mixup_weight(60, epochs, a, b, "linear") == pytest.approx((1 + b) / 2)
    assert mixup_weight(65, epochs, a, b, "step") == pytest.approx(b + (1 - b) * 0.5)
    assert mixup_weight(59, epochs, a, b, "step") == pytest.approx(b + (1 - b) * 0.4)
    assert mixup_weight(10, epochs, 1.0, 1.0, "linear") == 1.0


@pytest.mark.parametrize("bug", [False, True])
def test_stage_three_distils_the_teacher_unless_the_code_bug_is_reproduced(bug: bool) -> None:
    method = _method(reproduce_code_bug=bug)
    method.ctx.stage, method.ctx.stage_epoch = "mixup", 0
    calls = []
    method.teacher.register_forward_hook(lambda *_: calls.append(1))
    metrics = step_metrics(method, _OneBatch())
    if bug:  # two forwards of a dropout-free student on one batch agree: the "KD" term vanishes
        assert not calls and metrics["loss/kd"] == pytest.approx(0.0, abs=1e-4)
    else:
        assert len(calls) == 1 and metrics["loss/kd"] > 1e-3
    assert metrics["mix_weight"] == pytest.approx(0.2) and metrics["images"] == 32


def test_stage_three_normalises_the_real_half_unless_the_official_mismatch_is_asked_for() -> None:
    seen: dict[bool, Tensor] = {}
    for official in (False, True):
        method = _method(official_normalization=official)
        method.ctx.stage = "mixup"
        batch = _OneBatch()

        def keep_input(_module: nn.Module, inputs: tuple[Tensor, ...], key: bool = official) -> None:
            seen.setdefault(key, inputs[0])

        method.student.register_forward_pre_hook(keep_input)
        step_metrics(method, batch)
        torch.testing.assert_close(seen[official][:16], batch.unit if official else batch.image)


def test_stage_three_warms_up_for_its_first_five_steps_not_epochs() -> None:
    """The official ConstantLR (factor 1/3, 5 iterations) is stepped per batch."""
    method = _method()
    method.ctx.stage, method.ctx.stage_epoch = "mixup", 0
    lrs = []
    for step in range(1, 8):
        method.ctx.stage_step = step
        lrs.append(step_metrics(method, _OneBatch())["lr/student"])
    lr = method.cfg.optim.mixup.lr
    assert lrs == pytest.approx([lr / 3] * 5 + [lr] * 2)


class _ValSplit:
    """An evaluation split of one normalised batch."""

    def __init__(self, batch: _OneBatch) -> None:
        self.batch = batch

    def mean(self, per_sample: Callable[[Tensor, Tensor], Tensor]) -> float:
        return float(per_sample(self.batch.image, self.batch.labels).mean())


def test_stage_two_selects_on_what_its_encoder_trained_on_unless_the_official_mismatch_is_asked_for() -> None:
    for official in (False, True):
        method = _method(official_normalization=official)
        method.ctx.stage = "anchor"
        seen: list[Tensor] = []
        method.encoder.register_forward_pre_hook(lambda _module, inputs, seen=seen: seen.append(inputs[0]))
        batch = _OneBatch()
        step_metrics(method, batch)  # training: images in [0, 1]
        method.validate(_ValSplit(batch))  # type: ignore[arg-type]
        torch.testing.assert_close(seen[0], batch.unit)
        torch.testing.assert_close(seen[1], batch.image if official else batch.unit)


def _run(run_dir: Path, teacher: Path, *extra: str, resume: bool = False) -> LocalSession:
    return run_in_process(run_dir, teacher, [*TINY, *extra], labelled=64, evaluated=32, resume=resume)


def _assert_same_players(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for player, weights in a.items():
        for name, tensor in weights.items():
            torch.testing.assert_close(b[player][name], tensor, rtol=0, atol=0)


def test_three_stages_select_on_their_own_metrics_and_a_kill_in_stage_two_resumes_there(
    tmp_path: Path, bn_teacher: Path
) -> None:
    """4 data-free steps, then 2 anchor and 3 mixup epochs of 64 labelled rows in batches of 16 (4 steps
    each); evaluations every 3 steps and at each stage's end."""
    straight = _run(tmp_path / "straight", bn_teacher)
    stages = [(r["step"], r["stage"]) for r in straight.reports]
    assert stages == [(3, 0), (4, 0), (8, 1), (12, 1), (16, 2), (20, 2), (24, 2)]  # stages 2-3: every epoch
    assert {"val/generator_loss", "val/encoder_loss", "datafree/loss/encoder"} <= set(straight.reports[1])
    assert {"val/anchor_loss", "anchor/loss/energy", "anchor/loss/mask"} <= set(straight.reports[2])
    assert {"mixup/loss/kd", "mixup/mix_weight", "test/top3"} <= set(straight.reports[-1])
    first_end = load_state(tmp_path / "straight" / "step_0000004")
    assert first_end["stage_best"]["score"] == min(r["val/generator_loss"] for r in straight.reports[:2])

    killed = tmp_path / "killed"
    with pytest.raises(InjectedFailure):
        _run(killed, bn_teacher, "debug.fail_at_step=10")
    resumed = _run(killed, bn_teacher, "debug.fail_at_step=10", resume=True)
    assert resumed.reports[0]["resumed_from_step"] == 8 and resumed.reports[0]["stage"] == 1
    _assert_same_players(
        load_state(tmp_path / "straight" / "step_0000024")["players"],
        load_state(killed / "step_0000024")["players"],
    )
    assert resumed.reports[-1]["test/top1"] == straight.reports[-1]["test/top1"]


def test_stage_three_breaks_ties_on_top1_by_acc3_then_acc5(
    tmp_path: Path, bn_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The official selection: Acc, then Acc@3, then Acc@5; stage 3 evaluates at steps 16, 20 and 24."""
    scripted = iter([(50.0, 70.0, 80.0), (50.0, 75.0, 80.0), (50.0, 75.0, 85.0)])
    evaluate_on = Worker.evaluate_on

    def scripted_val(worker: Worker, name: str, model: nn.Module) -> dict[str, float]:
        figures = evaluate_on(worker, name, model)
        if name == "val" and worker.ctx.stage == "mixup":
            figures.update(zip(("top1", "top3", "top5"), next(scripted), strict=True))
        return figures

    monkeypatch.setattr(Worker, "evaluate_on", scripted_val)
    session = _run(tmp_path / "run", bn_teacher)
    assert [(r["step"], r["best_val/step"]) for r in session.reports[-3:]] == [(16, 16), (20, 20), (24, 24)]


def test_a_run_can_stop_after_a_stage_and_another_start_at_the_next_from_it(
    tmp_path: Path, bn_teacher: Path
) -> None:
    prefix = _run(tmp_path / "prefix", bn_teacher, "stop_after=anchor")
    assert prefix.reports[-1]["step"] == 12 and "test/top1" in prefix.reports[-1]
    end = load_state(tmp_path / "prefix" / "step_0000012")
    selected = end["stage_best"]["players"]

    cfg = resolve_config("demo", [f"teacher.checkpoint={bn_teacher}", *TINY, "stop_after=anchor"])
    method_stages = method_stages_of(cfg, bn_teacher)
    check_stages(cfg, method_stages, end["teacher_hash"])
    with pytest.raises(ConfigError, match="stop_after: 'augkd' has no stage 'anchors'"):
        check_stages(cfg.model_copy(update={"stop_after": "anchors"}), method_stages, end["teacher_hash"])
    starts = [
        ({"checkpoint": str(tmp_path / "prefix"), "stage": "datafree"}, "not a later stage"),
        (
            {"checkpoint": str(tmp_path / "prefix" / "step_0000008"), "stage": "mixup"},
            "end of stage 'anchor'",
        ),
        (
            {"checkpoint": str(tmp_path / "prefix" / "step_0000003"), "stage": "anchor"},
            "end of stage 'datafree'",
        ),
    ]
    for init_from, message in starts:
        bad = resolve_config("demo", [f"teacher.checkpoint={bn_teacher}", *TINY, f"init_from={init_from}"])
        with pytest.raises(ConfigError, match=message):
            check_stages(bad, method_stages, end["teacher_hash"])
    good = f"init_from={{checkpoint: {tmp_path / 'prefix'}, stage: mixup}}"
    with pytest.raises(ConfigError, match="another teacher"):
        check_stages(resolve_config("demo", [*TINY, good]), method_stages, "0" * 64)
    changed = resolve_config("demo", [f"teacher.checkpoint={bn_teacher}", *TINY, good, "augkd.a=0.3"])
    [note] = check_models(changed, bn_teacher)
    assert "differs in augkd.a" in note and "augkd.b" not in note
    with pytest.raises(ConfigError, match="its generator does not fit"):
        check_models(
            resolve_config("demo", [f"teacher.checkpoint={bn_teacher}", *TINY, good, "augkd.nz=8"]),
            bn_teacher,
        )
    # The prefix ended its stages by its own budgets: a run that would give them more still starts from it.
    longer = resolve_config(
        "demo",
        [
            f"teacher.checkpoint={bn_teacher}",
            *TINY,
            good,
            "augkd.datafree_steps=40",
            "augkd.anchor_epochs=20",
        ],
    )
    [note] = check_stages(longer, method_stages_of(longer, bn_teacher), end["teacher_hash"])
    assert "augkd.anchor_epochs, augkd.datafree_steps" in note
    resumed = [f"storage_path={tmp_path}", "run_name=prefix", "init_from={checkpoint: /gone, stage: mixup}"]
    assert check_stages(resolve_config("demo", [*TINY, *resumed]), method_stages, "0" * 64) == []

    tail = _run(
        tmp_path / "tail", bn_teacher, f"init_from={{checkpoint: {tmp_path / 'prefix'}, stage: mixup}}"
    )
    assert [(r["step"], r["stage"]) for r in tail.reports] == [(4, 2), (8, 2), (12, 2)]
    after = load_state(tmp_path / "tail" / "step_0000012")["players"]
    frozen = ("generator", "encoder", "anchor")
    _assert_same_players({k: selected[k] for k in frozen}, {k: after[k] for k in frozen})
    assert any(not torch.equal(after["student"][k], selected["student"][k]) for k in selected["student"])


def _tiny_preset(tmp_path: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        f"teacher.checkpoint={teacher}",
        f"storage_path={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        *[item for item in TINY if not item.startswith(("method", "data."))],
        "data.batch_size=16",
        "eval.every=4",
        *extra,
    ]


@pytest.mark.ray
def test_two_workers_run_the_three_stages_with_per_stage_metrics_and_sample_grids(
    tmp_path: Path, bn_teacher: Path, ray_local
) -> None:
    """mnist2uci-augkd on 2 workers with tiny budgets: 10 labelled UCI digits per class, 50 per rank, so 3
    steps per anchor/mixup epoch; 4 + 2·3 + 3·3 = 19 steps."""
    cfg = resolve_config(
        "mnist2uci-augkd",
        _tiny_preset(
            tmp_path,
            bn_teacher,
            "num_workers=2",
            "run_name=augkd2",
            "augkd.eval_epochs=1",
            "augkd.mixup_from_datafree_student=false",  # rank 0's initial student on every rank
        ),
    )
    summary = launch(cfg)
    assert summary.steps == 19
    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ddp/replicas_identical"] == "true"
    steps = {
        key: [m.step for m in client.get_metric_history(summary.mlflow_run_id, key)]
        for key in ("datafree/loss/encoder", "anchor/loss/anchor", "mixup/loss/kd", "val/anchor_loss")
    }
    assert steps["datafree/loss/encoder"] == [1, 2, 3, 4]
    assert steps["anchor/loss/anchor"] == list(range(5, 11))
    assert steps["mixup/loss/kd"] == list(range(11, 20))
    assert steps["val/anchor_loss"] == [7, 10]  # every anchor epoch
    assert {"test/top1", "test/top3", "test/top5"} <= set(run.data.metrics)
    grids = logged_images(client, summary.mlflow_run_id, "samples")
    assert {4, 19} <= set(grids)
    sizes = {}
    for step in (4, 19):
        path = client.download_artifacts(summary.mlflow_run_id, grids[step], str(tmp_path))
        sizes[step] = Image.open(path).size
    # 28-px images in a grid of 8 per row with 2-px padding: 16 generator samples in stage 1; in stage 3
    # 5 rows (s = 0, 0.25, 0.5, 0.75, 1) of mixups of the same 8 real images
    assert sizes == {4: (242, 62), 19: (242, 152)}


class _WholeSet(_OneBatch):
    """A ``Streams`` whose labelled set is the one batch: scanned whole, selected whole."""

    def scan(self, stream: str, batch_size: int = 512) -> Iterator[dict[str, Tensor]]:
        yield {"image": self.image, "unit": self.unit, "label": self.labels}

    def use_selection(self, stream: str, unit: Tensor, labels: Tensor, epoch: int) -> int:
        return 1


def test_the_ablation_switches_remove_the_anchors_and_the_data_free_initialisation() -> None:
    for use_anchors in (True, False):
        method = _method(use_anchors=use_anchors)
        method.ctx.stage = "mixup"
        calls: list[int] = []
        method.anchor.register_forward_hook(lambda *_, seen=calls: seen.append(1))
        step_metrics(method, _OneBatch())
        assert len(calls) == int(use_anchors)

    for from_datafree in (True, False):
        method = _method(mixup_from_datafree_student=from_datafree)
        initial = {k: v.clone() for k, v in method.student.state_dict().items()}
        method.ctx.stage = "datafree"
        step_metrics(method, _WholeSet())
        method.ctx.stage = "mixup"
        method.begin_epoch(_WholeSet(), 0)  # type: ignore[arg-type]
        same = all(torch.equal(v, initial[k]) for k, v in method.student.state_dict().items())
        assert same is not from_datafree


def test_the_paper_scale_preset_builds_and_runs_a_few_steps_on_fake_data(tmp_path: Path) -> None:
    """office31-aw-d-augkd: a torchvision resnet34 teacher (31 classes, 32 px, ImageNet normaliser) and a
    mobilenet_v3_small student from a local 1000-class state dict, whose head is replaced for 31 classes."""
    import torchvision

    from rayoodkd.models import build_classifier
    from rayoodkd.teacher_io import TeacherInfo, save_teacher

    torch.manual_seed(0)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    teacher = build_classifier("torchvision:resnet34", num_classes=31, in_channels=3, image_size=32)
    teacher_path = save_teacher(
        tmp_path / "teacher.pt", teacher, TeacherInfo("torchvision:resnet34", 31, 3, 32, *imagenet)
    )
    weights = tmp_path / "mobilenet_v3_small-imagenet.pth"
    imagenet_like = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    imagenet_like["classifier.0.bias"].fill_(7.0)  # recognisable after a few Adam steps of lr 1e-3
    torch.save(imagenet_like, weights)

    def fake(n: int, seed: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(n, 3, 32, 32, generator=generator), torch.randint(0, 31, (n,), generator=generator)

    session = LocalSession(
        streams={"labelled": fake(400, 1)},  # DSLR's 80 % split: ~400 images, one batch of 384 per epoch
        eval_sets={"val": fake(16, 2), "test": fake(16, 3)},
        checkpoint_root=tmp_path / "run",
    )
    cfg = resolve_config(
        "office31-aw-d-augkd",
        [
            f"teacher.checkpoint={teacher_path}",
            f"student.kwargs.weights_path={weights}",
            "use_gpu=false",
            "augkd.batch_size=8",
            "augkd.inner_steps=1",
            "augkd.validation_batches=1",
            "augkd.datafree_steps=2",
            "augkd.anchor_epochs=1",
            "augkd.mixup_epochs=1",
        ],
    )
    run_worker({"config": cfg.model_dump(mode="json"), "teacher_path": str(teacher_path)}, session)
    assert [(r["step"], r["stage"]) for r in session.reports] == [(2, 0), (3, 1), (4, 2)]
    final = session.reports[-1]
    assert {"test/top1", "test/top3", "test/top5", "val/top5"} <= set(final)
    student = load_state(tmp_path / "run" / "step_0000004")["players"]["student"]
    assert student["fc.weight"].shape == (31, 1024)
    torch.testing.assert_close(
        student["backbone.classifier.0.bias"], torch.full((1024,), 7.0), atol=0.05, rtol=0
    )
