"""`ray job submit -- python -m rayoodkd.train` against a real local multi-node cluster (clusters/local.sh):
a head and one worker node started with `ray start`, token authentication on, torn down even on failure."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "clusters" / "local.sh"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_job_submit_runs_a_training_run(tmp_path: Path, tiny_teacher: Path) -> None:
    env = {
        **os.environ,
        # Ray's unix socket paths must stay under 107 bytes: keep the cluster's temp dir short.
        "RAYOODKD_LOCAL_DIR": tempfile.mkdtemp(prefix="rk-", dir="/tmp"),
        "RAY_AUTH_MODE": "token",
        "NUM_WORKERS": "1",
        "HEAD_CPUS": "2",
        "WORKER_CPUS": "1",
        "GCS_PORT": str(_free_port()),
        "DASHBOARD_PORT": str(_free_port()),
        "CLIENT_PORT": str(_free_port()),
        "AGENT_PORT_BASE": str(_free_port()),
    }
    summary_path = tmp_path / "summary.json"
    entrypoint = [
        "python",
        "-m",
        "rayoodkd.train",
        "--config",
        "demo",
        f"teacher.checkpoint={tiny_teacher}",
        f"storage_path={tmp_path / 'runs'}",
        f"summary_json={summary_path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.ood.num_images=800",
        "data.batch_size=32",
        "max_steps=6",
        "eval.every=3",
        "log_every=2",
        "run_name=job",
    ]
    try:
        up = subprocess.run(
            ["bash", str(LOCAL_SH), "up"], env=env, capture_output=True, text=True, timeout=400
        )
        assert up.returncode == 0, up.stderr[-3000:]
        job = subprocess.run(
            ["bash", str(LOCAL_SH), "submit", "--", *entrypoint],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        output = job.stdout + job.stderr
        assert "succeeded" in output.lower()
    finally:
        subprocess.run(["bash", str(LOCAL_SH), "down"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(env["RAYOODKD_LOCAL_DIR"], ignore_errors=True)
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == 6 and summary["num_workers"] == 2
    run = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert "val/top1" in run.data.metrics
    # The console: rayoodkd's progress line every log_every steps and at every evaluation, not Ray's chatter.
    progress = [line for line in output.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/6", "3/6", "4/6", "6/6"], output[-4000:]
    assert all("img/s" in line for line in progress)
    for noise in ("Execution plan", "TrainingReport", "Reporting training result", "(RayTrainWorker"):
        assert noise not in output, noise


@pytest.mark.parametrize(
    ("ray_dashboard", "trials", "started_here", "given", "dashboard", "watcher"),
    [
        (None, False, True, None, False, "0"),  # one run on an instance of its own: no dashboard, no watcher
        (None, True, True, None, True, "0"),  # a sweep's long-lived instance keeps the dashboard
        (True, False, True, None, True, "0"),
        (None, False, False, None, False, None),  # a cluster it joins keeps its own settings
        (None, False, True, "1", False, "1"),  # a watcher setting the user gave is kept
    ],
)
def test_a_command_starts_its_own_ray_lean_and_leaves_a_cluster_it_joins_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
    ray_dashboard: bool | None,
    trials: bool,
    started_here: bool,
    given: str | None,
    dashboard: bool,
    watcher: str | None,
) -> None:
    from types import SimpleNamespace

    import ray

    from rayoodkd.raystart import start_or_join_ray

    calls = []

    def init(**kwargs: object) -> None:
        # what the instance's raylet (and so a sweep's trials) would inherit
        calls.append({**kwargs, "watcher": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")})
        monkeypatch.setattr(ray._private.worker, "_global_node", SimpleNamespace(head=started_here))

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(calls))
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    if given is not None:
        monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", given)
    start_or_join_ray(ray_dashboard, trials=trials, ray_logs=True)
    start_or_join_ray(ray_dashboard, trials=trials, ray_logs=True)  # connected already: nothing more
    assert [call["include_dashboard"] for call in calls] == [dashboard]
    assert [call["watcher"] for call in calls] == [given or "0"]
    assert os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER") == watcher
