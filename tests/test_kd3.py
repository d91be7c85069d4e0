"""KD3 (issue #17): its formulas, its selection on a corpus with a known clean subset, MixDistribution,
NT-Xent, the deployable student sharing the teacher's classifier, exact resumption, and 2 Ray ranks."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ray_run_config, small_context, step_metrics
from mlflow.tracking import MlflowClient
from torch import Tensor, nn

from rayoodkd.config import BaseRunConfig, DataConfig, build_section, resolve_config
from rayoodkd.data.builtin import WEB_MIX, WEB_ORIGIN_LABELS, builtin_arrays
from rayoodkd.engine.checkpoint import load_state
from rayoodkd.engine.loop import InjectedFailure, run_worker
from rayoodkd.engine.session import LocalSession
from rayoodkd.engine.streams import DeviceStreams, tensor_source
from rayoodkd.launch import launch
from rayoodkd.methods.kd3 import KD3, KD3Config, mix_distribution, nt_xent, sample_beta, teacher_weight
from rayoodkd.models import build_classifier
from rayoodkd.models.classifiers.base import Classifier
from rayoodkd.teacher_io import load_teacher

KD3_RUN = [
    "method=kd3",
    "data.ood=null",
    "data.web={source: letters, num_images: 800, labelled: false}",
    "data.batch_size=16",
    "log_every=1",
    "kd3.epochs=2",
    "kd3.scan_batch_size=64",
    # The untrained test teacher and student are near-uniform over 10 classes: a cut at 0.1 keeps the rows
    # of the most predicted class and most of the others.
    "kd3.p_cutoff=0.1",
]


def test_alpha_schedule_is_the_official_time_d() -> None:
    """The official loop's first epoch is epoch 1: time_d(1, 120) = 1 − exp(−5·(2/160 − 1)²)."""
    assert teacher_weight(0, 120) == pytest.approx(1 - math.exp(-5 * (2 / 160 - 1) ** 2))
    assert teacher_weight(0, 120) == pytest.approx(0.9924, abs=1e-4)
    assert teacher_weight(118, 120) == pytest.approx(1 - math.exp(-5 * (120 / 160 - 1) ** 2))
    assert teacher_weight(118, 120) == pytest.approx(0.268, abs=1e-3)
    assert teacher_weight(119, 120) == 0.0 and teacher_weight(239, 120) == 0.0  # official epochs 120 and 240
    weights = [teacher_weight(e, 120) for e in range(119)]
    assert all(a > b for a, b in itertools.pairwise(weights))
    # Scaled to a short run: M = teacher_vote · epochs keeps the same curve.
    assert teacher_weight(0, 12) == pytest.approx(1 - math.exp(-5 * (2 / 16 - 1) ** 2))


class QuadrantTeacher(Classifier):
    """A fixed teacher for 1×8×8 images of 4 classes: class k lights quadrant k. Feature map: the four
    quadrant means as channels (1×1); a bright quadrant gives a confident prediction, a flat grey image a
    uniform one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        with torch.no_grad():
            self.fc.weight.copy_(20 * torch.eye(4) - 5)
            self.fc.bias.zero_()
        self.feature_map_channels = self.feature_dim = 4

    def forward_feature_map(self, x: Tensor) -> Tensor:
        quadrants = x.unfold(2, 4, 4).unfold(3, 4, 4).mean(dim=(-1, -2))  # [N, 1, 2, 2]
        return quadrants.flatten(1)[:, :, None, None]


def _quadrant_corpus() -> tuple[Tensor, Tensor]:
    """40 clean images (quadrant k bright, label k) interleaved with 60 flat grey ones (label -1)."""
    clean = torch.zeros(40, 1, 8, 8)
    for i in range(40):
        k = i % 4
        clean[i, :, 4 * (k // 2) : 4 * (k // 2) + 4, 4 * (k % 2) : 4 * (k % 2) + 4] = 1.0
    images = torch.cat([clean, torch.full((60, 1, 8, 8), 0.5)])
    labels = torch.cat([torch.arange(40) % 4, torch.full((60,), -1)])
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    return images[order], labels[order]


def _quadrant_kd3(**overrides: object) -> tuple[KD3, DeviceStreams, Tensor, Tensor]:
    ctx = small_context(batch_size=8)
    ctx.num_classes = 4
    torch.manual_seed(0)
    student = build_classifier("cnn_tiny", num_classes=4, in_channels=1, image_size=8)
    method = KD3(QuadrantTeacher().eval(), student, KD3Config(epochs=4, **overrides), ctx)
    images, labels = _quadrant_corpus()
    streams = DeviceStreams(
        {"web": tensor_source(images, labels, batch_size=8, seed=0)},
        ctx,
        {"web": build_section(DataConfig, {}).transform("web")},
    )
    return method, streams, images, labels


def test_the_selection_keeps_the_clean_subset_and_reports_its_precision_and_recall() -> None:
    method, streams, _, _ = _quadrant_kd3()
    steps, metrics = method.begin_epoch(streams, epoch=0)
    assert metrics["select/alpha"] == pytest.approx(teacher_weight(0, 2))
    assert metrics["select/size"] == 40 and metrics["select/scanned"] == 100
    assert metrics["select/precision"] == 1.0 and metrics["select/recall"] == 1.0
    assert metrics["select/label_accuracy"] == 1.0
    assert steps == 40 // 8
    drawn = torch.cat([streams.next("web", augment=False)["label"] for _ in range(steps)])
    assert sorted(drawn.tolist()) == sorted((torch.arange(40) % 4).tolist())  # the epoch is the clean rows

    fixed, _ = _quadrant_kd3(steps_per_epoch=7)[0].begin_epoch(_quadrant_kd3()[1], epoch=0)
    assert fixed == 7
    everything, _ = _quadrant_kd3(select=False)[0].begin_epoch(_quadrant_kd3()[1], epoch=0)
    assert everything == 100 // 8


def test_once_the_teacher_has_no_vote_the_student_alone_selects() -> None:
    method, streams, _, _ = _quadrant_kd3()
    _, metrics = method.begin_epoch(streams, epoch=2)  # M = 0.5 · 4 = 2: α(2) = 0
    assert metrics["select/alpha"] == 0.0
    # The untrained student is unsure of everything: its own predictions pick another subset.
    assert metrics["select/precision"] < 1.0 or metrics["select/recall"] < 1.0
    teacher_only, streams = _quadrant_kd3(student_vote=False)[:2]
    _, metrics = teacher_only.begin_epoch(streams, epoch=2)
    assert metrics["select/alpha"] == 1.0 and metrics["select/precision"] == 1.0


def test_the_mixed_view_passes_the_backbone_but_not_the_projector() -> None:
    """Spec §5.3: the projector and the teacher's head run on the clean images only, so the projector's
    batch-norm statistics (which the deployed student keeps) never see a MixDistribution view."""
    method, streams, _, _ = _quadrant_kd3()
    method.begin_epoch(streams, epoch=0)

    def batches_seen(module: torch.nn.Module) -> list[int]:
        return [int(m.num_batches_tracked) for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    projector, backbone = batches_seen(method.student.projector), batches_seen(method.student.backbone)
    assert projector and backbone
    method.train_step(streams)
    assert batches_seen(method.student.projector) == [n + 1 for n in projector]
    assert batches_seen(method.student.backbone) == [n + 2 for n in backbone]  # the clean and the mixed view


def test_beta_draws_have_the_moments_of_beta_0_1() -> None:
    draws = sample_beta(0.1, 40_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert draws.min() >= 0 and draws.max() <= 1
    assert draws.mean().item() == pytest.approx(0.5, abs=0.01)
    assert draws.var().item() == pytest.approx(0.01 / (0.04 * 1.2), abs=0.01)  # αβ / ((α+β)²(α+β+1))
    assert ((draws < 0.05) | (draws > 0.95)).float().mean() > 0.7  # U-shaped: mostly near 0 or 1


def test_mix_distribution_mixes_per_image_channel_statistics() -> None:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(6, 3, 8, 8, generator=generator) * torch.rand(6, 3, 1, 1, generator=generator) * 3
    images = images + torch.randn(6, 3, 1, 1, generator=generator)
    mixed = mix_distribution(images, torch.Generator().manual_seed(11), alpha=0.1)
    assert mixed.shape == images.shape

    replay = torch.Generator().manual_seed(11)
    lam = sample_beta(0.1, 6, replay, images.device).view(6, 1)
    partner = torch.randperm(6, generator=replay)
    mean, std = images.mean(dim=(2, 3)), (images.var(dim=(2, 3)) + 1e-6).sqrt()
    torch.testing.assert_close(mixed.mean(dim=(2, 3)), lam * mean + (1 - lam) * mean[partner])
    torch.testing.assert_close(
        mixed.std(dim=(2, 3)), lam * std + (1 - lam) * std[partner], rtol=1e-4, atol=1e-4
    )
    # The content (the standardised image) is kept.
    standardise = lambda x: (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)  # noqa: E731
    torch.testing.assert_close(standardise(mixed), standardise(images), rtol=1e-4, atol=1e-4)


def test_nt_xent_matches_the_simclr_loss_written_out() -> None:
    generator = torch.Generator().manual_seed(0)
    first = nn.functional.normalize(torch.randn(3, 5, generator=generator), dim=1)
    second = nn.functional.normalize(torch.randn(3, 5, generator=generator), dim=1)
    views = torch.cat([first, second])
    terms = []
    for i in range(6):
        positive = (i + 3) % 6
        others = [j for j in range(6) if j != i]
        numerator = torch.exp(views[i] @ views[positive] / 0.3)
        denominator = sum(torch.exp(views[i] @ views[j] / 0.3) for j in others)
        terms.append(-torch.log(numerator / denominator))
    torch.testing.assert_close(nt_xent(first, second, 0.3), torch.stack(terms).mean())


def test_the_deployable_student_is_the_teachers_classifier_on_projected_student_features(
    tiny_teacher: Path,
) -> None:
    teacher, info = load_teacher(tiny_teacher)
    ctx = small_context(batch_size=8)
    ctx.image_size, ctx.channels = info.image_size, info.channels
    student = build_classifier("lenet5_half", num_classes=10, in_channels=1, image_size=28)
    method = KD3(teacher.eval(), student, KD3Config(epochs=1), ctx)
    deployable = method.deployable_student().eval()
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher.fc(teacher.pool_features(deployable.projector(student.forward_feature_map(x))))
        torch.testing.assert_close(deployable(x), expected)
    teacher_head = sum(p.numel() for p in (*teacher.fc1.parameters(), *teacher.fc.parameters()))
    projector = sum(p.numel() for p in deployable.projector.parameters())
    assert deployable.extra_parameters() == projector + teacher_head  # the teacher's convs are not carried

    frozen = {
        k: v.clone() for k, v in deployable.state_dict().items() if k.startswith(("head.", "backbone.fc."))
    }
    trained = {k: v.clone() for k, v in deployable.state_dict().items() if k.startswith("backbone.conv1")}
    web = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    streams = DeviceStreams(
        {"web": tensor_source(web, torch.full((64,), -1), batch_size=8, seed=0)},
        ctx,
        {"web": build_section(DataConfig, {}).transform("web")},
    )
    for _ in range(3):
        metrics = step_metrics(method, streams)
    assert {"loss/feature_alignment", "loss/contrastive", "loss/total"} <= set(metrics)
    after = deployable.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # shared classifier and own FC frozen
    assert not all(torch.equal(after[k], v) for k, v in trained.items())


def _run(run_dir: Path, teacher: Path, *extra: str, resume: bool = False) -> LocalSession:
    generator = torch.Generator().manual_seed(6)
    val = torch.rand(32, 1, 28, 28, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    web = torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(5)), torch.full((200,), -1)
    session = LocalSession(
        streams={"web": web},
        eval_sets={"val": val, "test": val},
        checkpoint_root=run_dir,
        resume_from=run_dir if resume else None,
    )
    cfg = resolve_config("demo", [f"teacher.checkpoint={teacher}", *KD3_RUN, *extra])
    run_worker({"config": cfg.model_dump(mode="json"), "teacher_path": str(teacher)}, session)
    return session


def test_kd3_resumed_inside_an_epoch_equals_an_uninterrupted_run(tmp_path: Path, tiny_teacher: Path) -> None:
    straight = _run(tmp_path / "straight", tiny_teacher)
    steps_per_epoch = int(straight.reports[0]["select/steps"])
    assert steps_per_epoch >= 2

    fail_at = steps_per_epoch + 2  # inside the second epoch, after its selection
    killed = tmp_path / "killed"
    with pytest.raises(InjectedFailure):
        _run(
            killed,
            tiny_teacher,
            f"debug.fail_at_step={fail_at}",
            f"eval.every={steps_per_epoch + 1}",
            "kd3.eval_every_epochs=null",
        )
    resumed = _run(
        killed,
        tiny_teacher,
        f"debug.fail_at_step={fail_at}",
        f"eval.every={steps_per_epoch + 1}",
        "kd3.eval_every_epochs=null",
        resume=True,
    )
    assert resumed.reports[-1]["resumed_from_step"] == steps_per_epoch + 1
    final_a = load_state(straight.checkpoints[-1])
    final_b = load_state(resumed.checkpoints[-1])
    for player in ("student", "embed_student", "embed_teacher"):
        for name, tensor in final_a["players"][player].items():
            torch.testing.assert_close(final_b["players"][player][name], tensor, rtol=0, atol=0)
    selection_a = final_a["ranks"][0]["streams"]["selections"]["web"]
    selection_b = final_b["ranks"][0]["streams"]["selections"]["web"]
    assert torch.equal(selection_a["images"], selection_b["images"])


def test_web_digits_records_each_images_origin() -> None:
    images, labels = builtin_arrays("web-digits", "train", 4000, seed=0)
    assert images.shape == (4000, 28, 28) and images.dtype == np.uint8
    digits = labels >= 0
    assert set(labels[digits].tolist()) == set(range(10))
    assert digits.mean() == pytest.approx(WEB_MIX["digit"], abs=0.03)
    for origin, code in WEB_ORIGIN_LABELS.items():
        assert (labels == code).mean() == pytest.approx(WEB_MIX[origin], abs=0.03)
    again, again_labels = builtin_arrays("web-digits", "train", 4000, seed=0)
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    assert not np.array_equal(builtin_arrays("web-digits", "train", 4000, seed=1)[1], labels)


@pytest.mark.ray
def test_two_ranks_select_different_shards_and_log_selection_metrics(
    tmp_path: Path, tiny_teacher: Path, ray_local
) -> None:
    cfg = ray_run_config(
        tmp_path,
        tiny_teacher,
        "run_name=kd3",
        "num_workers=2",
        *KD3_RUN,
        "data.web={source: web-digits, num_images: 800}",
    )
    summary = launch(cfg)
    state = load_state(summary.checkpoint)
    selections = [rank["streams"]["selections"]["web"] for rank in state["ranks"]]
    assert not torch.equal(selections[0]["labels"], selections[1]["labels"])
    client = MlflowClient(summary.tracking_uri)
    run_id = summary.mlflow_run_id
    steps = [m.value for m in client.get_metric_history(run_id, "select/steps")]
    assert len(steps) == 2 and steps[-1] == min(len(s["images"]) for s in selections) // 16
    assert summary.steps == sum(steps)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["select/scanned"] == 800
    assert {"select/precision", "select/recall", "select/alpha", "loss/feature_alignment"} <= set(metrics)
    assert client.get_run(run_id).data.tags["ddp/replicas_identical"] == "true"
    _evaluate_scores_the_deployable_student(summary.checkpoint, cfg)


def _evaluate_scores_the_deployable_student(checkpoint: Path, cfg: BaseRunConfig) -> None:
    """``python -m rayoodkd.evaluate`` rebuilds KD3's composite student from a checkpoint and scores it as
    the backbone → projector → teacher's classifier computed here by hand."""
    from rayoodkd.evaluate import evaluate_checkpoint
    from rayoodkd.teacher import load_tensors

    table = evaluate_checkpoint(checkpoint)
    teacher, info = load_teacher(cfg.teacher.checkpoint)
    images, labels, _ = load_tensors(cfg.data.test, info.image_size, info.channels, cfg.data.cache_dir)
    ctx = small_context()
    ctx.image_size, ctx.channels = info.image_size, info.channels
    student = build_classifier("lenet5_half", num_classes=10, in_channels=1, image_size=info.image_size)
    deployable = KD3(teacher.eval(), student, cfg.method_config(), ctx).deployable_student()
    deployable.load_state_dict(load_state(checkpoint)["players"]["student"])
    with torch.no_grad():
        logits = deployable.eval()((images - info.mean[0]) / info.std[0])
    accuracy = 100 * (logits.argmax(1) == labels).float().mean().item()
    assert table["final"]["test/top1"] == pytest.approx(accuracy, abs=1e-4)


def test_the_paper_scale_preset_builds_and_runs_a_few_steps_on_fake_data(tmp_path: Path) -> None:
    """cifar100-kd3-imagenet32: a CIFAR resnet34 teacher of 100 classes and a resnet18 student sharing its
    classifier; the deployable student carries the projector and the teacher's FC, not its backbone."""
    from rayoodkd.teacher_io import TeacherInfo, save_teacher

    torch.manual_seed(0)
    cifar100 = ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))
    teacher = build_classifier("resnet34", num_classes=100, in_channels=3, image_size=32)
    teacher_path = save_teacher(
        tmp_path / "teacher.pt", teacher, TeacherInfo("resnet34", 100, 3, 32, *cifar100)
    )
    generator = torch.Generator().manual_seed(0)
    web = torch.rand(48, 3, 32, 32, generator=generator), torch.full((48,), -1)
    val = torch.rand(8, 3, 32, 32, generator=generator), torch.randint(0, 100, (8,), generator=generator)
    session = LocalSession(
        streams={"web": web}, eval_sets={"val": val, "test": val}, checkpoint_root=tmp_path / "run"
    )
    cfg = resolve_config(
        "cifar100-kd3-imagenet32",
        [
            f"teacher.checkpoint={teacher_path}",
            "use_gpu=false",
            "data.batch_size=8",
            "kd3.epochs=1",
            "kd3.steps_per_epoch=2",
            "kd3.scan_batch_size=16",
            "kd3.select=false",  # an untrained teacher is confident about nothing
        ],
    )
    run_worker({"config": cfg.model_dump(mode="json"), "teacher_path": str(teacher_path)}, session)
    final = session.reports[-1]
    assert final["step"] == 2 and "test/top1" in final
    assert final["select/scanned"] == 48
    projector = 256 * 512 * 1 + 256 * 256 * 9 + 256 * 512 + 2 * (256 + 256 + 512)  # convs (no bias) + BN
    assert final["student/extra_parameters"] == projector + 512 * 100 + 100
    student = load_state(tmp_path / "run" / "step_0000002")["players"]["student"]
    assert student["head.classifier.fc.weight"].shape == (100, 512)
    assert not any(key.startswith("head.classifier.layer") for key in student)
