"""MLflow: one run per training run, created by the driver and written to by rank 0.

The local default is a sqlite store with a real artifact directory under the run's ``storage_path``
(MLflow 3 refuses the old file store, and an experiment created inside a Ray worker would put its artifacts
in Ray's temporary session directory). Any MLflow URI works, a tracking server included.

MLflow is imported where it is first used (1.1 s of a 2-core machine): only rank 0 of a run writes to the
store, and it imports MLflow in a thread that opens the store while the worker sets up and takes its first
steps; the other ranks never do.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rayoodkd.storage import is_remote, local_path

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

MAX_PARAM_LENGTH = 6000
EXPERIMENT_KIND = "mlflow.experimentKind"
FAILURE_TAG = "rayoodkd.failure"
THROUGHPUT_KEY = "throughput/images_per_second"  # logged every log_every steps: how far a run got


def default_tracking_uri(storage_path: str) -> str:
    """``sqlite:////<storage_path>/mlflow.db`` for a local storage path; a URI storage needs a server."""
    if is_remote(storage_path):
        raise ValueError(
            f"tracking_uri: storage_path {storage_path!r} is remote; set tracking_uri to an MLflow server "
            "(e.g. tracking_uri=http://mlflow-host:5000)"
        )
    root = local_path(storage_path)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _mlflow_client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def open_store_in_background(tracking_uri: str) -> Future[MlflowClient]:
    """A client of the tracking store, made in a thread: importing MLflow and its first connection in a
    process (SQLAlchemy, the schema check) take 1.1 s and 0.7 s of a 2-core machine, which rank 0 overlaps
    with its set-up and first steps. MLflow keeps the store per URI, so the clients made after ``.result()``
    (which re-raises what failed) find it open."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-store")
    opened = pool.submit(_mlflow_client, tracking_uri)
    pool.shutdown(wait=False)
    return opened


def source_tags() -> dict[str, str]:
    """MLflow's own context tags (user, source type and name, git commit of the code that runs), with the
    command line as the source name and, outside a git checkout of rayoodkd, the commit of the working
    directory's repository (the user's project)."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.git_utils import get_git_commit

    tags = resolve_tags()
    tags["mlflow.source.name"] = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]
    if "mlflow.source.git.commit" not in tags:
        commit = get_git_commit(os.getcwd())
        if commit:
            tags["mlflow.source.git.commit"] = commit
    return tags


def _artifact_location(tracking_uri: str, storage_path: str) -> str | None:
    if not tracking_uri.startswith("sqlite:"):
        return None
    return (local_path(storage_path) / "mlartifacts").as_uri()


class Tracker:
    """Thin wrapper over :class:`MlflowClient` bound to one run (no global MLflow state)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = _mlflow_client(tracking_uri)

    @classmethod
    def create(
        cls, tracking_uri: str, storage_path: str, experiment_name: str, run_name: str, tags: dict[str, str]
    ) -> Tracker:
        """A new run in ``experiment_name`` (created with a durable artifact location if missing)."""
        client = _mlflow_client(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            experiment_id = client.create_experiment(
                experiment_name, artifact_location=_artifact_location(tracking_uri, storage_path)
            )
        else:
            experiment_id = experiment.experiment_id
        if experiment is None or EXPERIMENT_KIND not in experiment.tags:
            # Without it MLflow 3 opens the experiment in its GenAI view (traces, not charts).
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, "custom_model_development")
        run = client.create_run(experiment_id, run_name=run_name, tags={**source_tags(), **tags})
        return cls(tracking_uri, run.info.run_id)

    def page_url(self) -> str | None:
        """The run's page in the MLflow UI, for a tracking server (``http(s)://``); None for a local store.
        ``workflowType`` opens MLflow 3's model-training view rather than the GenAI one."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return None
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        base = self.tracking_uri.rstrip("/")
        return f"{base}/#/experiments/{experiment_id}/runs/{self.run_id}?workflowType=machine_learning"

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        items = [
            Metric(_metric_key(k), float(v), timestamp, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(v)
        ]
        for start in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[start : start + 500])

    def last_logged_step(self, key: str) -> int:
        """The highest step at which ``key`` was logged in this run (0 if never)."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)

    def status(self) -> str:
        """The run's MLflow status: RUNNING, FINISHED, FAILED or KILLED."""
        return self.client.get_run(self.run_id).info.status

    def reopen(self) -> str:
        """Mark the run RUNNING again (a relaunched run, a resumed sweep or comparison) and return the status
        it had; why an earlier attempt ended moves from ``rayoodkd.failure`` to ``rayoodkd.resumed_after``,
        so that a run that then finishes does not read as failed."""
        run = self.client.get_run(self.run_id)
        failure = run.data.tags.get(FAILURE_TAG)
        if failure is not None:
            self.set_tags({"rayoodkd.resumed_after": failure})
            self.client.delete_tag(self.run_id, FAILURE_TAG)
        self.client.update_run(self.run_id, status="RUNNING")
        return run.info.status

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_image_grid(self, images: Tensor, key: str, step: int, nrow: int = 8) -> None:
        """A batch in [0, 1] as one grid image under ``key`` at ``step`` (the run page's image slider)."""
        from torchvision.utils import make_grid

        grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=2)
        pixels = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        self.client.log_image(self.run_id, pixels, key=key, step=step)

    def terminate(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def end(self, status: str, reason: str) -> None:
        """Close a run that did not finish (``FAILED`` or ``KILLED``), with why as the ``rayoodkd.failure``
        tag."""
        self.set_tags({FAILURE_TAG: reason})
        self.terminate(status)


def _metric_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)
