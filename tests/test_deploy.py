"""What a finished run leaves a user: deployable MLflow models, a readable run page, a progress console."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from rayoodkd.config import resolve_config
from rayoodkd.deploy import STUDENT, STUDENT_BEST_VAL
from rayoodkd.engine import loop
from rayoodkd.engine.loop import run_worker
from rayoodkd.engine.session import LocalSession
from rayoodkd.engine.tracking import EXPERIMENT_KIND, FAILURE_TAG, Tracker


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def _run(tmp_path: Path, teacher: Path, *overrides: str) -> tuple[LocalSession, Tracker]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.create(uri, str(tmp_path), "deploy-test", "run", {"method": "kd_ood"})
    cfg = resolve_config(
        "demo",
        [
            "max_steps=8",
            "eval.every=4",
            "log_every=2",
            "data.batch_size=32",
            "kd_ood.optim.student.lr=0.05",
            f"teacher.checkpoint={teacher}",
            *overrides,
        ],
    )
    session = LocalSession(
        streams={"ood": (_blobs(256, 1)[0], torch.full((256,), -1))},
        eval_sets={"val": _blobs(64, 3), "test": _blobs(96, 4)},
        checkpoint_root=tmp_path / "run",
    )
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "teacher_path": str(teacher),
        "tracking_uri": uri,
        "mlflow_run_id": tracker.run_id,
        "launched_at": time.time() - 3.0,  # as launch() passes them: the driver took 3 s
        "driver_phases": {"checks": 1.0, "data": 2.0},
    }
    run_worker(loop_config, session)
    return session, tracker


def test_the_student_loads_from_mlflow_without_the_teacher_and_reproduces_the_test_accuracy(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    teacher = shutil.copy(tiny_teacher, tmp_path / "teacher.pt")
    session, tracker = _run(tmp_path, Path(teacher), "registered_model_name=digits-student")
    Path(teacher).unlink()
    images, labels = _blobs(96, 4)
    torch.save({"images": images, "labels": labels}, tmp_path / "test.pt")
    script = f"""
import json, mlflow, torch
mlflow.set_tracking_uri({tracker.tracking_uri!r})
data = torch.load({str(tmp_path / "test.pt")!r}, weights_only=True)
out = {{}}
for name in ({STUDENT!r}, {STUDENT_BEST_VAL!r}, "models:/digits-student/1"):
    uri = name if name.startswith("models:/") else f"runs:/{tracker.run_id}/" + name
    model = mlflow.pytorch.load_model(uri)
    with torch.no_grad():
        predicted = model(data["images"]).argmax(1)
    out[name] = 100.0 * (predicted == data["labels"]).float().mean().item()
info = mlflow.models.get_model_info(f"runs:/{tracker.run_id}/{STUDENT}")
out["metadata"], out["signature"] = info.metadata, info.signature.inputs.to_dict()
print(json.dumps(out))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    final = session.reports[-1]
    assert loaded[STUDENT] == pytest.approx(final["test/top1"], abs=1e-4)
    assert loaded[STUDENT_BEST_VAL] == pytest.approx(final["test/top1_at_best_val"], abs=1e-4)
    assert loaded["models:/digits-student/1"] == pytest.approx(final["test/top1_at_best_val"], abs=1e-4)
    metadata = loaded["metadata"]
    assert metadata["num_classes"] == 10 and metadata["input_shape"] == [1, 28, 28]
    assert metadata["mean"] == [0.13] and metadata["method"] == "kd_ood"
    assert loaded["signature"][0]["tensor-spec"]["shape"] == [-1, 1, 28, 28]


def test_the_run_page_leads_with_accuracy_and_keeps_bookkeeping_as_tags(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    _, tracker = _run(tmp_path, tiny_teacher)
    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND] == "custom_model_development"
    metrics = set(run.data.metrics)
    assert {"val/top1", "best_val/top1", "test/top1", "loss/kd"} <= metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert not metrics & {"ddp/replicas_identical", "best_val/step", "step", "train_seconds", "stage"}
    tags = run.data.tags
    assert tags["ddp/replicas_identical"] == "true" and tags["student/changed_from_init"] == "true"
    assert tags["best_val/step"] in {"4", "8"} and tags["stage"] == "train"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]
    assert tags["rayoodkd.students_logged_at"] == "8"
    phases = ("checks", "data", "workers", "setup", "eval_sets", "teacher_test", "first_step")
    assert float(tags["startup/total_s"]) == pytest.approx(
        sum(float(tags[f"startup/{phase}_s"]) for phase in phases), abs=0.05
    )
    assert float(tags["startup/total_s"]) >= 3.0


def test_rank_0_trains_while_its_mlflow_store_opens_and_loses_no_metric_to_it(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_step = threading.Event()
    opened_after_first_step: list[bool] = []
    open_now = loop.open_store_in_background

    def open_after_the_first_step(uri: str) -> Future:
        def opened() -> object:
            opened_after_first_step.append(first_step.wait(timeout=60))
            return open_now(uri).result()

        pool = ThreadPoolExecutor(max_workers=1)
        future = pool.submit(opened)
        pool.shutdown(wait=False)
        return future

    report_startup = loop.Worker._report_startup

    def first_step_done(worker: loop.Worker) -> None:
        report_startup(worker)
        first_step.set()

    monkeypatch.setattr(loop, "open_store_in_background", open_after_the_first_step)
    monkeypatch.setattr(loop.Worker, "_report_startup", first_step_done)
    _, tracker = _run(tmp_path, tiny_teacher)
    assert opened_after_first_step == [True]  # the first step did not wait for the store
    client = MlflowClient(tracker.tracking_uri)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss/kd")] == [2, 4, 6, 8]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "val/top1")] == [4, 8]
    run = client.get_run(tracker.run_id)
    assert run.data.params["derived.eval.val_rows"] == "64"
    assert (
        float(run.data.tags["startup/total_s"]) >= 3.0 and run.data.tags["rayoodkd.students_logged_at"] == "8"
    )


def test_a_run_that_fails_before_its_first_log_still_shows_its_params_and_startup(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    with pytest.raises(loop.InjectedFailure):
        _run(tmp_path, tiny_teacher, "debug.fail_at_step=2")  # step 1 trains; the first log would be at 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs(client.get_experiment_by_name("deploy-test").experiment_id)
    assert run.data.params["derived.eval.val_rows"] == "64"
    assert float(run.data.tags["startup/total_s"]) >= 3.0
    assert "loss/kd" not in run.data.metrics


def test_a_progress_line_every_log_every_steps(tmp_path: Path, tiny_teacher: Path, capsys) -> None:
    _run(tmp_path, tiny_teacher)
    out = capsys.readouterr().out.splitlines()
    startup = [line for line in out if line.startswith("first step ")]
    assert len(startup) == 1 and "after launch: checks 1.0, data 2.0, workers " in startup[0]
    lines = [line for line in out if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/8", "4/8", "6/8", "8/8"]
    assert all("img/s" in line and "kd " in line for line in lines)
    assert not any("total " in line for line in lines)  # KD's one loss term, not twice
    assert "val " not in lines[0] and "val " in lines[1] and "(best " in lines[1]
    assert "ETA" in lines[0] and "ETA" not in lines[-1]


@pytest.mark.ray
def test_fit_then_load_student_reproduces_the_selected_students_test_accuracy(
    tmp_path: Path, tiny_teacher: Path, ray_local
) -> None:
    import rayoodkd
    from rayoodkd.teacher import load_tensors

    common = {
        "teacher__checkpoint": str(tiny_teacher),
        "storage_path": str(tmp_path / "runs"),
        "data__cache_dir": str(tmp_path / "cache"),
        "data__ood__num_images": 800,
        "data__batch_size": 32,
        "num_workers": 0,
        "eval__every": 4,
        "run_name": "api",
    }
    first = rayoodkd.fit("demo", max_steps=4, **common)
    summary = rayoodkd.fit("demo", max_steps=8, **common)  # resumed with a larger budget: logged again
    assert summary.resumed_from_step == 4 and summary.mlflow_run_id == first.mlflow_run_id
    cfg = rayoodkd.resolve("demo", max_steps=8, **common)
    images, labels, _ = load_tensors(cfg.data.test, 28, 1, cfg.data.cache_dir, seed=cfg.seed)
    for best_val, expected in ((True, summary.test_accuracy_at_best_val), (False, summary.student_accuracy)):
        student = rayoodkd.load_student(
            summary.mlflow_run_id, best_val=best_val, tracking_uri=summary.tracking_uri
        )
        with torch.no_grad():
            accuracy = 100.0 * (student(images).argmax(1) == labels).float().mean().item()
        assert accuracy == pytest.approx(expected, abs=1e-3)


def test_a_tracking_server_run_is_announced_with_its_page_in_the_model_training_view(tmp_path: Path) -> None:
    local = Tracker.create(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path), "e", "r", {})
    assert local.page_url() is None
    served = Tracker(local.tracking_uri, local.run_id)
    served.tracking_uri = "http://mlflow.example:5000/"
    experiment = served.client.get_run(served.run_id).info.experiment_id
    assert served.page_url() == (
        f"http://mlflow.example:5000/#/experiments/{experiment}/runs/{local.run_id}?workflowType=machine_learning"
    )


def test_a_reopened_run_is_running_again_and_keeps_why_it_ended_as_resumed_after(tmp_path: Path) -> None:
    tracker = Tracker.create(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path), "e", "r", {})
    tracker.set_tags({FAILURE_TAG: "terminated (SIGTERM)"})
    tracker.terminate("KILLED")
    assert tracker.reopen() == "KILLED"
    assert tracker.status() == "RUNNING"
    tags = tracker.tags()
    assert FAILURE_TAG not in tags and tags["rayoodkd.resumed_after"] == "terminated (SIGTERM)"
