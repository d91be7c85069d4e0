"""Faults a user meets, each ending in one clear line or a clean recovery (docs/reliability.md).

Bad inputs are refused by the driver's pre-flight before Ray or MLflow start; corrupt checkpoints are
skipped for the newest intact one; a killed worker resumes from the last committed checkpoint without
logging a step twice; ``num_workers=0`` runs end to end; per-rank method state resumes per rank.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import signal_once_ready
from mlflow.tracking import MlflowClient

from rayoodkd.config import resolve_config
from rayoodkd.engine.checkpoint import MANIFEST_FILE, STATE_FILE, load_state, newest_intact
from rayoodkd.engine.loop import run_worker
from rayoodkd.engine.session import LocalSession
from rayoodkd.errors import RunInterrupted
from rayoodkd.launch import RunFailed, launch
from rayoodkd.models import build_classifier
from rayoodkd.train import main

BASE = ["data.ood.num_images=1200", "data.batch_size=32", "max_steps=12", "eval.every=4", "log_every=2"]


def _overrides(tmp_path: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        f"teacher.checkpoint={teacher}",
        f"storage_path={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        *BASE,
        *extra,
    ]


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with one ``error:`` line on stderr and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and err.endswith(errors[0]), err
    return errors[0]


def _no_run_left_running(storage: Path) -> None:
    database = storage / "mlflow.db"
    if database.exists():
        with sqlite3.connect(database) as connection:
            statuses = [row[0] for row in connection.execute("select status from runs")]
        assert "RUNNING" not in statuses


# ------------------------------------------------------------------------------- pre-flight, no Ray needed


def test_bad_student_arch_and_kwargs_are_refused_naming_the_key(
    tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused(capsys, _overrides(tmp_path, tiny_teacher, "student.arch=unknown"))
    assert err.startswith("error: student.arch: unknown classifier 'unknown'; allowed:")
    err = _refused(capsys, _overrides(tmp_path, tiny_teacher, "student.kwargs.num_classes=5"))
    assert err.startswith("error: student.kwargs.num_classes: set from the teacher")
    _no_run_left_running(tmp_path / "runs")


def test_unreadable_and_foreign_teacher_files_are_refused_with_the_import_hint(
    tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    err = _refused(capsys, _overrides(tmp_path, tiny_teacher, f"teacher.checkpoint={garbage}"))
    assert err.startswith(f"error: teacher.checkpoint: {garbage} is not a readable rayoodkd teacher")
    assert "rayoodkd.teacher import" in err and "weights_only=False" not in err

    foreign = tmp_path / "lenet.pth"
    torch.save(build_classifier("lenet5", num_classes=10, in_channels=1, image_size=28).state_dict(), foreign)
    err = _refused(capsys, _overrides(tmp_path, tiny_teacher, f"teacher.checkpoint={foreign}"))
    assert "holds a plain state dict, not a rayoodkd teacher" in err and "rayoodkd.teacher import" in err
    _no_run_left_running(tmp_path / "runs")


def test_imported_state_dict_becomes_a_usable_teacher(tmp_path: Path) -> None:
    from rayoodkd.teacher import main as teacher_main
    from rayoodkd.teacher_io import load_teacher

    torch.manual_seed(0)
    model = build_classifier("lenet5", num_classes=10, in_channels=1, image_size=28)
    foreign = tmp_path / "lenet.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, foreign)
    out = tmp_path / "teacher.pt"
    spec = ["arch=lenet5", "num_classes=10", "image_size=28", "channels=1", "mean=[0.13]", "std=[0.31]"]
    assert teacher_main(["import", "--weights", str(foreign), "--out", str(out), *spec]) == 0
    teacher, info = load_teacher(out)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(teacher(x), model.eval()(x))
    assert info.mean == (0.13,) and info.num_classes == 10


def test_missing_empty_and_columnless_sources_are_refused(
    tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused(capsys, _overrides(tmp_path, tiny_teacher, f"data.ood.source={tmp_path / 'nowhere'}"))
    assert err == f"error: data.ood.source: path not found: {tmp_path / 'nowhere'}"

    empty = tmp_path / "empty"
    empty.mkdir()
    err = _refused(capsys, _overrides(tmp_path, tiny_teacher, f"data.ood.source={empty}"))
    assert err.startswith("error: data.ood.source: no image files (png, jpg") and str(empty) in err

    table = pa.table({"pixels": pa.array([b"x"], type=pa.binary()), "label": pa.array([1])})
    parquet = tmp_path / "ood.parquet"
    pq.write_table(table, parquet)
    err = _refused(capsys, _overrides(tmp_path, tiny_teacher, f"data.ood.source={parquet}"))
    assert err.startswith("error: data.ood.image_column: column 'image' is not in") and "pixels" in err
    _no_run_left_running(tmp_path / "runs")


def test_unwritable_storage_and_unreachable_tracking_server_are_refused_quickly(
    tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = _overrides(tmp_path, tiny_teacher)
    err = _refused(capsys, [*overrides, "storage_path=/proc/rayoodkd-x"])
    assert err.startswith("error: storage_path: cannot write to '/proc/rayoodkd-x'")
    started = time.monotonic()
    err = _refused(capsys, [*overrides, "tracking_uri=http://127.0.0.1:9"])
    assert time.monotonic() - started < 60
    assert err.startswith("error: tracking_uri: no MLflow server answers at http://127.0.0.1:9")


# ------------------------------------------------------------------------- checkpoints, in one process


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def _local_run(run_dir: Path, teacher: Path, max_steps: int, resume: bool = False) -> LocalSession:
    session = LocalSession(
        streams={"ood": (_blobs(256, 1)[0], torch.full((256,), -1))},
        eval_sets={"val": _blobs(64, 3), "test": _blobs(64, 4)},
        checkpoint_root=run_dir,
        resume_from=run_dir if resume else None,
    )
    cfg = resolve_config("demo", [f"teacher.checkpoint={teacher}", *BASE, f"max_steps={max_steps}"])
    run_worker({"config": cfg.model_dump(mode="json"), "teacher_path": str(teacher)}, session)
    return session


def test_a_truncated_or_unfinished_checkpoint_is_skipped_for_the_previous_one(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    run_dir = tmp_path / "run"
    _local_run(run_dir, tiny_teacher, max_steps=12)
    newest = run_dir / "step_0000012" / STATE_FILE
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (run_dir / "step_0000008" / MANIFEST_FILE).unlink()

    point = newest_intact(str(run_dir))
    assert point.directory == f"{run_dir}/step_0000004" and point.state["step"] == 4
    reasons = dict(point.skipped)
    assert "content hash mismatch" in reasons[f"{run_dir}/step_0000012"]
    assert "no manifest.json" in reasons[f"{run_dir}/step_0000008"]

    resumed = _local_run(run_dir, tiny_teacher, max_steps=16, resume=True)
    assert resumed.reports[-1]["resumed_from_step"] == 4 and resumed.reports[-1]["step"] == 16
    assert load_state(run_dir / "step_0000016")["step"] == 16


# ------------------------------------------------------------------------------------ with a real Ray


def _tiny(tmp_path: Path, teacher: Path, *extra: str):
    return resolve_config("demo", [*_overrides(tmp_path, teacher, "num_workers=2"), *extra])


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.ray
def test_num_workers_zero_runs_in_the_driver_and_resumes(
    tmp_path: Path, tiny_teacher: Path, ray_local
) -> None:
    summary_path = tmp_path / "summary.json"
    cfg = _tiny(tmp_path, tiny_teacher, "num_workers=0", "run_name=v0", f"summary_json={summary_path}")
    summary = launch(cfg)
    assert summary.steps == 12 and summary.num_workers == 0 and summary_path.is_file()
    assert summary.checkpoint == str(tmp_path / "runs" / "v0" / "step_0000012")
    assert sorted(p.name for p in (tmp_path / "runs" / "v0").glob("step_*")) == [
        "step_0000008",
        "step_0000012",
    ]
    client = MlflowClient(summary.tracking_uri)
    assert client.get_run(summary.mlflow_run_id).info.status == "FINISHED"
    assert _steps(client, summary.mlflow_run_id, "val/top1") == [4, 8, 12]

    longer = launch(cfg.model_copy(update={"max_steps": 16}))
    assert longer.resumed_from_step == 12 and longer.mlflow_run_id == summary.mlflow_run_id
    assert client.get_run(summary.mlflow_run_id).info.status == "FINISHED"


@pytest.mark.ray
def test_truncated_latest_checkpoint_resumes_from_the_previous_and_a_failed_relaunch_keeps_finished(
    tmp_path: Path, tiny_teacher: Path, ray_local
) -> None:
    cfg = _tiny(tmp_path, tiny_teacher, "run_name=trunc", "max_steps=8")
    first = launch(cfg)
    latest = Path(first.checkpoint) / STATE_FILE
    latest.write_bytes(latest.read_bytes()[:1000])

    resumed = launch(cfg.model_copy(update={"max_steps": 12}))
    assert resumed.resumed_from_step == 4 and resumed.steps == 12
    client = MlflowClient(first.tracking_uri)
    run = client.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert "step_0000008" in run.data.tags["resume.skipped_checkpoints"]
    assert _steps(client, first.mlflow_run_id, "val/top1") == [4, 8, 12]

    failing = cfg.model_copy(update={"max_steps": 16, "max_failures": 0})
    failing.debug.fail_at_step = 14
    with pytest.raises(RunFailed, match="fail_at_step=14"):
        launch(failing)
    run = client.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert "InjectedFailure" in run.data.tags["rayoodkd.relaunch_failure"]


@pytest.mark.ray
def test_a_sigkilled_worker_resumes_from_the_committed_checkpoint_without_logging_twice(
    tmp_path: Path, tiny_teacher: Path, ray_local
) -> None:
    summary = launch(
        _tiny(tmp_path, tiny_teacher, "run_name=killed", "max_failures=1", "debug.kill_at_step=9")
    )
    assert summary.steps == 12 and summary.resumed_from_step == 8
    client = MlflowClient(summary.tracking_uri)
    assert _steps(client, summary.mlflow_run_id, "val/top1") == [4, 8, 12]
    loss_steps = _steps(client, summary.mlflow_run_id, "loss/kd")
    assert loss_steps == sorted(set(loss_steps)) == [2, 4, 6, 8, 10, 12]


@pytest.mark.ray
def test_failures_before_the_first_checkpoint_leave_no_resumable_run(
    tmp_path: Path, tiny_teacher: Path, ray_local
) -> None:
    cfg = _tiny(tmp_path, tiny_teacher, "run_name=early", "max_failures=0", "debug.fail_at_step=2")
    # Every rank raises at step 2; which of them Ray Train collects before it stops the group is a race.
    first_hand = r"worker [01]: InjectedFailure: debug.fail_at_step=2"
    with pytest.raises(RunFailed, match=first_hand):
        launch(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert re.match(first_hand, runs[0].data.tags["rayoodkd.failure"])
    assert not (tmp_path / "runs" / "early" / "rayoodkd_run.json").exists()


@pytest.mark.ray
def test_a_run_interrupted_before_its_first_checkpoint_says_a_new_launch_starts_afresh(
    tmp_path: Path, tiny_teacher: Path, ray_local, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rayoodkd.launch

    def interrupted(*args: object) -> None:
        torn = tmp_path / "runs" / "cut" / "step_0000010"  # its first checkpoint, cut short while written
        torn.mkdir(parents=True)
        (torn / STATE_FILE).write_bytes(b"torn")
        raise KeyboardInterrupt

    monkeypatch.setattr(rayoodkd.launch, "_train_in_driver", interrupted)
    with pytest.raises(RunInterrupted) as stop:
        launch(_tiny(tmp_path, tiny_teacher, "run_name=cut", "num_workers=0"))
    assert (
        str(stop.value)
        == "interrupted (Ctrl-C) before its first checkpoint: a new launch of run cut starts afresh"
    )
    assert stop.value.exit_code == 130
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED" and run.data.tags["rayoodkd.failure"] == "interrupted (Ctrl-C)"
    assert not (tmp_path / "runs" / "cut" / "rayoodkd_run.json").exists()


@pytest.mark.ray
def test_oversized_worker_count_and_all_corrupt_corpus_are_refused_in_one_line(
    tmp_path: Path, tiny_teacher: Path, ray_local, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    err = _refused(
        capsys, _overrides(tmp_path, tiny_teacher, "num_workers=64", "resources.wait_for_workers_s=45")
    )
    assert time.monotonic() - started < 60
    assert err.startswith("error: num_workers=64: needs 32 CPU") and "the Ray cluster has 2 CPU" in err
    assert "autoscaler" not in err  # a cluster started by hand cannot grow: refused at once

    broken = tmp_path / "broken"
    broken.mkdir()
    for index in range(5):
        (broken / f"{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(40)))
    err = _refused(capsys, _overrides(tmp_path, tiny_teacher, f"data.ood.source={broken}"))
    assert err == "error: data.ood: none of its 5 images could be decoded (all corrupt)"
    _no_run_left_running(tmp_path / "runs")


@pytest.mark.ray
def test_deepinv_resumes_each_ranks_own_image_pool_on_two_workers(
    tmp_path: Path, bn_teacher: Path, ray_local
) -> None:
    deepinv = [
        "deepinv.batch_size=8",
        "deepinv.inversion_steps=2",
        "deepinv.kd_steps=1",
        "deepinv.pool_size=64",
    ]
    common = ["method=deepinv", "data.ood=null", "max_steps=4", "eval.every=2", *deepinv]
    straight = launch(_tiny(tmp_path, bn_teacher, "run_name=straight", *common))
    interrupted = launch(
        _tiny(tmp_path, bn_teacher, "run_name=interrupted", "max_failures=1", "debug.fail_at_step=3", *common)
    )
    assert interrupted.resumed_from_step == 2
    ranks_a = load_state(straight.checkpoint)["ranks"]
    ranks_b = load_state(interrupted.checkpoint)["ranks"]
    pools_a = [rank["method"]["pool"] for rank in ranks_a]
    assert len(pools_a) == 2 and pools_a[0].shape[0] == 32 and not torch.equal(pools_a[0], pools_a[1])
    for pool_a, rank_b in zip(pools_a, ranks_b, strict=True):
        assert torch.equal(pool_a, rank_b["method"]["pool"])


def test_a_checkpoint_from_before_manifests_still_resumes(tmp_path: Path) -> None:
    legacy = tmp_path / "step_0000004"
    legacy.mkdir()
    torch.save({"format": "rayoodkd.run/1", "step": 4}, legacy / STATE_FILE)
    assert newest_intact(str(tmp_path)).state["step"] == 4


def test_the_failure_reason_names_the_worker_that_failed_first_hand() -> None:
    from rayoodkd.launch import failure_reason

    class WorkerGroupFailure(Exception):
        worker_failures = {  # noqa: RUF012 - the shape of ray.train.WorkerGroupError
            0: RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:3456"),
            1: MemoryError("Task was killed due to the node running low on memory.\nMore lines"),
        }

    assert failure_reason(WorkerGroupFailure()) == (
        "worker 1: MemoryError: Task was killed due to the node running low on memory."
    )
    assert failure_reason(SystemExit(0)) == "interrupted (Ctrl-C)"


def test_a_sigterm_is_ascribed_only_to_the_run_it_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    from rayoodkd import raystart
    from rayoodkd.launch import failure_reason

    monkeypatch.setattr(raystart, "_sigterm_at", None)
    first_run = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        raystart._terminate(signal.SIGTERM, None)
    assert stop.value.code == 143
    second_run = time.monotonic()  # a later run in the same process (the Python API, a notebook)
    assert failure_reason(SystemExit(1), first_run) == "terminated (SIGTERM)"
    assert failure_reason(KeyboardInterrupt(), second_run) == "interrupted (Ctrl-C)"


@pytest.mark.ray
@pytest.mark.parametrize(
    ("stop", "exit_code", "reason"),
    [("SIGINT", 130, "interrupted (Ctrl-C)"), ("SIGTERM", 143, "terminated (SIGTERM)")],
)
def test_a_command_starts_ray_without_dashboard_and_ctrl_c_or_sigterm_ends_its_run_killed_and_resumable(
    tmp_path: Path, tiny_teacher: Path, stop: str, exit_code: int, reason: str
) -> None:
    import signal
    import sys

    storage = tmp_path / "runs"
    argv = [sys.executable, "-m", "rayoodkd.train", *_overrides(tmp_path, tiny_teacher, "num_workers=1")]
    argv += ["run_name=ctrlc", "max_steps=100000", "eval.every=10"]
    # An intact checkpoint (its manifest is written last), so that the run is resumable when stopped.
    returncode, err, started = signal_once_ready(
        argv, lambda: bool(list((storage / "ctrlc").glob("step_*/manifest.json"))), getattr(signal, stop)
    )
    assert any("raylet" in command for command in started)  # the command started its own Ray instance ...
    assert not any("ray-dashboard-" in command for command in started)  # ... without the dashboard's modules
    assert returncode == exit_code, err[-2000:]
    ours = [
        line for line in err.splitlines() if not re.search(r"\(\w+ pid=\d+", line)
    ]  # not Ray actors' logs
    assert ours[-1].startswith(f"{reason}: run ctrlc keeps its checkpoints in "), err[-2000:]
    assert ours[-1].endswith("launch it again to resume")
    assert not any("Traceback" in line or "SIGTERM received" in line for line in ours)  # no stack dump
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED" and run.data.tags["rayoodkd.failure"] == reason
    assert (storage / "ctrlc" / "rayoodkd_run.json").exists()  # a checkpoint exists: the run is resumable
