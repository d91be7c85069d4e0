"""Real Ray: a 2-worker TorchTrainer run with DDP (gloo) on a local instance, worker-failure recovery,
the MLflow store, and the summary JSON. These carry the Ray paths; everything else runs in one process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import logged_images
from mlflow.tracking import MlflowClient
from PIL import Image

from rayoodkd.config import resolve_config
from rayoodkd.data import builtin_arrays
from rayoodkd.engine.checkpoint import load_state
from rayoodkd.evaluate import evaluate_checkpoint
from rayoodkd.launch import launch
from rayoodkd.models import build_classifier, build_discriminator, build_generator

pytestmark = pytest.mark.ray


def _tiny(tmp_path: Path, teacher: Path, **extra: object):
    overrides = [
        f"teacher.checkpoint={teacher}",
        f"storage_path={tmp_path / 'runs'}",
        f"summary_json={tmp_path / 'summary.json'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.ood.num_images=1200",
        "data.batch_size=32",
        "max_steps=12",
        "eval.every=4",
        "log_every=2",
        "num_workers=2",
        *(f"{k}={v}" for k, v in extra.items()),
    ]
    return resolve_config("demo", overrides)


def _letter_folder(root: Path, corrupt: int) -> Path:
    """An OOD image folder (flat) of rendered letters plus ``corrupt`` broken files."""
    images, _ = builtin_arrays("letters", None, 600, seed=3)
    root.mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(root / f"{index:04d}.png")
    for index in range(corrupt):
        (root / f"broken_{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(40)))
    return root


def test_two_worker_ddp_run_logs_to_mlflow(tmp_path: Path, tiny_teacher: Path, ray_local) -> None:
    folder = _letter_folder(tmp_path / "ood", corrupt=3)
    # val and test streamed through Ray Data at every evaluation, each worker scoring its share
    overrides = {"data.ood.source": folder, "eval.cache_mb": 0}
    summary = launch(_tiny(tmp_path, tiny_teacher, run_name="ddp", **overrides))
    assert summary.corrupt_skipped == 3
    written = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "method",
        "teacher_accuracy",
        "student_accuracy",
        "best_val_accuracy",
        "steps",
        "images_per_second",
        "wall_seconds",
        "num_workers",
        "mlflow_run_id",
        "checkpoint",
    ):
        assert key in written
    assert written["steps"] == 12 and written["num_workers"] == 2
    state = load_state(summary.checkpoint)
    assert state["step"] == 12 and len(state["ranks"]) == 2
    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ddp/replicas_identical"] == "true"
    assert run.data.tags["student/changed_from_init"] == "true"
    assert [m.step for m in client.get_metric_history(summary.mlflow_run_id, "val/top1")] == [4, 8, 12]
    assert len(client.get_metric_history(summary.mlflow_run_id, "loss/kd")) == 6
    assert run.data.params["method"] == "kd_ood"
    assert run.data.params["derived.eval.streamed"] == "val,test"
    assert run.data.params["derived.eval.test_rows"] == "1000"
    artifacts = {a.path for a in client.list_artifacts(summary.mlflow_run_id)}
    assert {"summary.json", "summary.txt", "checkpoint"} <= artifacts

    table = evaluate_checkpoint(summary.checkpoint)
    assert table["final"]["test/top1"] == pytest.approx(summary.student_accuracy)
    assert table["teacher"]["test/top1"] == pytest.approx(summary.teacher_accuracy)
    assert table["best_val"]["val/top1"] == pytest.approx(summary.best_val_accuracy)


def test_worker_failure_resumes_and_relaunch_continues_on_file_uri(
    tmp_path: Path, tiny_teacher: Path, ray_local
) -> None:
    storage = (tmp_path / "elsewhere").as_uri()
    failing = _tiny(
        tmp_path,
        tiny_teacher,
        run_name="fails",
        max_failures=1,
        storage_path=storage,
        **{"debug.fail_at_step": 10},
    )
    summary = launch(failing)
    assert summary.steps == 12
    assert summary.resumed_from_step == 8
    assert summary.checkpoint.startswith(str(tmp_path / "elsewhere" / "fails"))
    history = MlflowClient(summary.tracking_uri).get_metric_history(summary.mlflow_run_id, "val/top1")
    assert [m.step for m in history] == [4, 8, 12]

    longer = launch(failing.model_copy(update={"max_steps": 16}))
    assert longer.resumed_from_step == 12 and longer.steps == 16
    assert longer.mlflow_run_id == summary.mlflow_run_id
    history = MlflowClient(summary.tracking_uri).get_metric_history(summary.mlflow_run_id, "val/top1")
    assert [m.step for m in history] == [4, 8, 12, 16]


def _launch_tiny_method(
    tmp_path: Path, teacher: Path, method: str, settings: dict[str, object], **extra: object
) -> tuple[MlflowClient, Any]:
    """A 4-step, 2-worker run of ``method``: its summary JSON and a FINISHED MLflow run with identical
    replicas are checked here; the client and the run go back to the caller."""
    cfg = _tiny(
        tmp_path,
        teacher,
        run_name=method,
        method=method,
        max_steps=4,
        **{"eval.every": 2, "log_every": 1, **extra},
        **{f"{method}.{key}": value for key, value in settings.items()},
    )
    summary = launch(cfg)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["method"] == method and written["steps"] == 4 and written["num_workers"] == 2
    assert written["student_accuracy"] == pytest.approx(summary.student_accuracy)
    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ddp/replicas_identical"] == "true"
    return client, run


def test_two_worker_mosaickd_logs_sample_grids(tmp_path: Path, tiny_teacher: Path, ray_local) -> None:
    mosaic = {"nz": 8, "ngf": 4, "ndf": 4, "kd_steps": 1, "patch_size": 8, "patch_stride": 4}
    client, run = _launch_tiny_method(tmp_path, tiny_teacher, "mosaickd", mosaic)
    run_id = run.info.run_id
    assert run.data.params["derived.d/receptive_field"] == "8" and "d/receptive_field" not in run.data.metrics
    for key in ("loss/d", "loss/local", "loss/align", "loss/adv", "loss/balance", "loss/kd"):
        assert len(client.get_metric_history(run_id, key)) == 4, key
    grids = logged_images(client, run_id, "samples")
    assert set(grids) == {2, 4}
    grid = client.download_artifacts(run_id, grids[4], str(tmp_path))
    assert Image.open(grid).size[0] > 28  # a grid of generated images, not one image
    # Per outer iteration DDP all-reduces D's and G's gradients once and S's once per KD step; S's and D's
    # gradients from G's loss are never sent (no_sync).
    players = {
        "generator": build_generator("mosaickd", nz=8, ngf=4, image_size=28, channels=1),
        "discriminator": build_discriminator(
            "patch", channels=1, ndf=4, image_size=28, patch_size=8, stride=4
        ),
        "student": build_classifier("lenet5_half", num_classes=10, in_channels=1, image_size=28),
    }
    sizes = {name: sum(p.numel() for p in module.parameters()) for name, module in players.items()}
    expected_mb = 4 * (sizes["generator"] + sizes["discriminator"] + sizes["student"]) / 1e6
    assert float(run.data.tags["ddp/allreduce_mb_per_step"]) == pytest.approx(expected_mb, rel=1e-5)


def test_two_worker_tadfkd_writes_the_summary(tmp_path: Path, bn_teacher: Path, ray_local) -> None:
    tadfkd = {"batch_size": 8, "nz": 8, "ngf": 4, "kd_steps": 1, "max_draws": 4}
    client, run = _launch_tiny_method(tmp_path, bn_teacher, "tadfkd", tadfkd, **{"data.ood": "null"})
    assert run.data.tags["student/changed_from_init"] == "true"
    assert 0.0 < run.data.metrics["select/fraction"] <= 1.0
    assert set(logged_images(client, run.info.run_id, "samples")) == {2, 4}
