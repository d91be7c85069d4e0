"""The Python API: run a distillation and load what it trained, without the command line.

    import rayoodkd

    summary = rayoodkd.fit("mnist-kd-letters", max_steps=3000, data__batch_size=64, seed=1)
    student = rayoodkd.load_student(summary.mlflow_run_id, tracking_uri=summary.tracking_uri)
    logits = student(images)   # float (N, C, H, W) in [0, 1]

``fit`` takes what ``rayoodkd train`` takes: a preset name, a YAML file or a config object, plus overrides as
keyword arguments (``__`` for the dots of a nested key) or as ``KEY=VALUE`` strings. Bad input raises
:class:`rayoodkd.config.ConfigError` (one line naming the key) before Ray starts; a failed run raises
:class:`rayoodkd.launch.RunFailed`; Ctrl-C or SIGTERM during a run raises
:class:`rayoodkd.errors.RunInterrupted` (a ``KeyboardInterrupt`` whose message says whether the run resumes)
once its MLflow run is closed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayoodkd.config import BaseRunConfig
    from rayoodkd.deploy import DeployedClassifier
    from rayoodkd.launch import RunSummary


def _override(key: str, value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return f"{key.replace('__', '.')}={text}"


def resolve(
    config: str | Path | BaseRunConfig = "demo", *overrides: str, **keyword_overrides: Any
) -> BaseRunConfig:
    """The validated run config ``fit`` would run (nothing is started)."""
    from rayoodkd.config import BaseRunConfig, apply_overrides, build_config, resolve_config

    strings = [*overrides, *(_override(key, value) for key, value in keyword_overrides.items())]
    if isinstance(config, BaseRunConfig):
        return build_config(apply_overrides(config.model_dump(mode="json"), strings))
    return resolve_config(str(config), strings)


def fit(config: str | Path | BaseRunConfig = "demo", *overrides: str, **keyword_overrides: Any) -> RunSummary:
    """Run one distillation (on the Ray cluster at ``RAY_ADDRESS``, or a local one) and return its summary."""
    from rayoodkd.launch import launch

    return launch(resolve(config, *overrides, **keyword_overrides))


def load_student(
    run_id: str, *, best_val: bool = True, tracking_uri: str | None = None
) -> DeployedClassifier:
    """The deployable student a run logged to MLflow: the one selected on validation (``best_val``) or the
    final one. ``tracking_uri`` defaults to MLflow's current one (``MLFLOW_TRACKING_URI``)."""
    import mlflow
    import mlflow.pytorch

    from rayoodkd.deploy import STUDENT, STUDENT_BEST_VAL

    previous = mlflow.get_tracking_uri()
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.pytorch.load_model(f"runs:/{run_id}/{STUDENT_BEST_VAL if best_val else STUDENT}")
    finally:
        mlflow.set_tracking_uri(previous)
