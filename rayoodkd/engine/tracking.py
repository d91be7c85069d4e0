"""MLflow: one run per training run, created by the driver and written to by rank 0.

The local default is a sqlite store with a real artifact directory under the run's ``storage_path``
(MLflow 3 refuses the old file store, and an experiment created inside a Ray worker would put its artifacts
in Ray's temporary session directory). Any MLflow URI works, a tracking server included.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from torch import Tensor

from rayoodkd.storage import is_remote, local_path

MAX_PARAM_LENGTH = 6000


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


def _artifact_location(tracking_uri: str, storage_path: str) -> str | None:
    if not tracking_uri.startswith("sqlite:"):
        return None
    return (local_path(storage_path) / "mlartifacts").as_uri()


class Tracker:
    """Thin wrapper over :class:`MlflowClient` bound to one run (no global MLflow state)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)

    @classmethod
    def create(
        cls, tracking_uri: str, storage_path: str, experiment_name: str, run_name: str, tags: dict[str, str]
    ) -> Tracker:
        """A new run in ``experiment_name`` (created with a durable artifact location if missing)."""
        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            experiment_id = client.create_experiment(
                experiment_name, artifact_location=_artifact_location(tracking_uri, storage_path)
            )
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        return cls(tracking_uri, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(mlflow.utils.time.get_current_time_millis())
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

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_image_grid(self, images: Tensor, artifact_file: str, nrow: int = 8) -> None:
        """Save a batch in [0, 1] as a PNG grid under ``artifact_file``."""
        from torchvision.utils import save_image

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            save_image(images.detach().float().clamp(0, 1).cpu(), path, nrow=nrow, padding=2)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(path, None if parent == "." else parent)

    def terminate(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def _metric_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)
