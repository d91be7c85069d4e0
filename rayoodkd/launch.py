"""The driver side of one run: teacher, Ray Data corpora, MLflow run, TorchTrainer, summary.

Used by ``python -m rayoodkd.train`` and by every Ray Tune trial of ``python -m rayoodkd.tune``. A run is
identified by ``run_name`` under ``storage_path``: launching the same name again resumes it from its latest
checkpoint (Ray Train V2 semantics) and keeps logging to the same MLflow run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rayoodkd.config import BaseRunConfig, ConfigError, flatten
from rayoodkd.engine.tracking import Tracker, default_tracking_uri
from rayoodkd.methods import METHODS
from rayoodkd.storage import filesystem, ray_storage_path, read_json, write_json
from rayoodkd.teacher import ensure_teacher, read_teacher

RUN_FILE = "rayoodkd_run.json"


@dataclass
class RunSummary:
    """What a finished run reports (also written as ``summary_json``)."""

    method: str
    run_name: str
    teacher_accuracy: float
    student_accuracy: float
    best_val_accuracy: float
    best_val_step: int
    test_accuracy_at_best_val: float
    student_top5: float
    agreement_with_teacher: float
    steps: int
    images_per_second: float
    train_seconds: float
    wall_seconds: float
    num_workers: int
    resumed_from_step: int
    corrupt_skipped: int
    mlflow_run_id: str
    tracking_uri: str
    checkpoint: str
    teacher_checkpoint: str

    def table(self) -> str:
        rows = [
            ("method", self.method),
            ("teacher accuracy (test)", f"{self.teacher_accuracy:.2f}%"),
            ("student accuracy (test, final)", f"{self.student_accuracy:.2f}%"),
            ("student top-5 (test, final)", f"{self.student_top5:.2f}%"),
            ("agreement with teacher (test)", f"{self.agreement_with_teacher:.2f}%"),
            ("best val accuracy", f"{self.best_val_accuracy:.2f}% at step {self.best_val_step}"),
            ("test accuracy at best val", f"{self.test_accuracy_at_best_val:.2f}%"),
            (
                "steps",
                str(self.steps)
                + (f" (resumed from {self.resumed_from_step})" if self.resumed_from_step else ""),
            ),
            ("images/s (student, all workers)", f"{self.images_per_second:.0f}"),
            ("wall time", f"{self.wall_seconds:.1f} s (training {self.train_seconds:.1f} s)"),
            ("workers", str(self.num_workers)),
            ("corrupt images skipped", str(self.corrupt_skipped)),
            ("MLflow", f"{self.tracking_uri}  run {self.mlflow_run_id}"),
            ("checkpoint", self.checkpoint),
        ]
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 2 + max(len(v) for _, v in rows))
        return "\n".join([line, *(f"{k.ljust(width)}  {v}" for k, v in rows), line])


def _keep_intact(batch: dict[str, Any]) -> dict[str, Any]:
    keep = ~batch["corrupt"]
    return {key: value[keep] for key, value in batch.items()}


def _datasets(cfg: BaseRunConfig, image_size: int, channels: int) -> tuple[dict[str, Any], dict[str, int]]:
    """The Ray datasets of the run and, for materialised ones, how many corrupt images each held."""
    from rayoodkd.data import load_corpus

    consumes = METHODS.get(cfg.method).consumes
    datasets, corrupt = {}, {}
    for name in [*sorted(consumes), "val", "test"]:
        corpus = getattr(cfg.data, name)
        if corpus is None:
            raise ConfigError(
                f"data.{name}: method {cfg.method!r} consumes the {name!r} stream; set data.{name}.source"
            )
        dataset = load_corpus(
            corpus, image_size=image_size, channels=channels, seed=cfg.seed, cache_dir=cfg.data.cache_dir
        )
        if cfg.data.materialize:
            # Decode once into the object store; then every epoch and every split is a cheap block handout.
            dataset = dataset.repartition(max(4 * cfg.num_workers, 8)).materialize()
            flags = dataset.select_columns(["corrupt"]).iter_batches(batch_size=None, batch_format="numpy")
            corrupt[name] = sum(int(batch["corrupt"].sum()) for batch in flags)
            if corrupt[name]:
                dataset = dataset.map_batches(_keep_intact, batch_format="numpy")
        datasets[name] = dataset
    return datasets, corrupt


def _mlflow_run(
    cfg: BaseRunConfig, run_name: str, run_dir: str, tags: dict[str, str]
) -> tuple[Tracker, bool]:
    tracking_uri = cfg.tracking_uri or default_tracking_uri(cfg.storage_path)
    previous = read_json(f"{run_dir}/{RUN_FILE}")
    if previous is not None:
        return Tracker(tracking_uri, previous["mlflow_run_id"]), True
    tracker = Tracker.create(tracking_uri, cfg.storage_path, cfg.experiment_name, run_name, tags)
    tracker.log_params(flatten(cfg.model_dump(mode="json", include=_logged_keys(cfg))))
    write_json(f"{run_dir}/{RUN_FILE}", {"mlflow_run_id": tracker.run_id, "tracking_uri": tracking_uri})
    return tracker, False


def _logged_keys(cfg: BaseRunConfig) -> set[str]:
    return {k for k in type(cfg).model_fields if k not in METHODS.names() or k == cfg.method}


def launch(
    cfg: BaseRunConfig,
    *,
    callbacks: list[Any] | None = None,
    mlflow_tags: dict[str, str] | None = None,
    log: Any = print,
) -> RunSummary:
    """Run ``cfg`` on a TorchTrainer (joining ``RAY_ADDRESS`` or starting a local Ray); summarise it."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayoodkd.engine.loop import train_loop_per_worker

    started = time.perf_counter()
    teacher_path = ensure_teacher(cfg.teacher, cfg.data.cache_dir, log)
    _, info = read_teacher(teacher_path)
    if not ray.is_initialized():
        ray.init(configure_logging=False, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    run_name = cfg.run_name or f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = ray_storage_path(cfg.storage_path)
    run_dir = f"{storage.rstrip('/')}/{run_name}"
    tracker, resumed = _mlflow_run(cfg, run_name, run_dir, {"method": cfg.method, **(mlflow_tags or {})})
    log(
        f"run {run_name}: {'resuming' if resumed else 'starting'}; "
        f"MLflow run {tracker.run_id} at {tracker.tracking_uri}"
    )
    datasets, corrupt_images = _datasets(cfg, info.image_size, info.channels)
    if any(corrupt_images.values()):
        tracker.log_metrics({f"data/{name}/corrupt_images": n for name, n in corrupt_images.items()}, 0)
        log("corrupt images skipped: " + ", ".join(f"{name} {n}" for name, n in corrupt_images.items()))
    resources = {"CPU": cfg.resources.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.resources.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "teacher_path": str(Path(teacher_path).resolve()),
            "tracking_uri": tracker.tracking_uri,
            "mlflow_run_id": tracker.run_id,
        },
        torch_config=TorchConfig(backend=None if cfg.backend == "auto" else cfg.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=sorted(METHODS.get(cfg.method).consumes)),
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracker.terminate("FAILED")
        raise
    metrics = result.metrics
    summary = RunSummary(
        method=cfg.method,
        run_name=run_name,
        teacher_accuracy=metrics["teacher/test_top1"],
        student_accuracy=metrics["test/top1"],
        best_val_accuracy=metrics["best_val/top1"],
        best_val_step=int(metrics["best_val/step"]),
        test_accuracy_at_best_val=metrics.get("test/top1_at_best_val", metrics["test/top1"]),
        student_top5=metrics["test/top5"],
        agreement_with_teacher=metrics["test/agreement"],
        steps=int(metrics["step"]),
        images_per_second=metrics.get("throughput/images_per_second", 0.0),
        train_seconds=metrics["train_seconds"],
        wall_seconds=time.perf_counter() - started,
        num_workers=cfg.num_workers,
        resumed_from_step=int(metrics["resumed_from_step"]),
        corrupt_skipped=sum(corrupt_images.values()) + int(metrics.get("data/corrupt_skipped", 0)),
        mlflow_run_id=tracker.run_id,
        tracking_uri=tracker.tracking_uri,
        checkpoint=result.checkpoint.path if result.checkpoint else "",
        teacher_checkpoint=str(teacher_path),
    )
    _finish_tracking(tracker, summary, result)
    if cfg.summary_json:
        path = Path(cfg.summary_json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(summary), indent=2))
    return summary


def _finish_tracking(tracker: Tracker, summary: RunSummary, result: Any) -> None:
    tracker.log_metrics({"summary/wall_seconds": summary.wall_seconds}, summary.steps)
    tracker.log_text(summary.table(), "summary.txt")
    tracker.log_text(json.dumps(asdict(summary), indent=2), "summary.json")
    if result.checkpoint is not None:
        fs, inner = filesystem(result.checkpoint.path)
        if type(fs).__name__ == "LocalFileSystem":
            tracker.log_artifact(Path(inner) / "state.pt", "checkpoint")
    tracker.set_tags({"checkpoint": summary.checkpoint})
    tracker.terminate("FINISHED")
