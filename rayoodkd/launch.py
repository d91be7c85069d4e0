"""The driver side of one run: pre-flight checks, Ray Data corpora, MLflow run, training, summary.

Used by ``python -m rayoodkd.train`` and by every Ray Tune trial of ``python -m rayoodkd.tune``. A run is
identified by ``run_name`` under ``storage_path``: launching the same name again resumes it from its newest
intact checkpoint and keeps logging to the same MLflow run. Training runs on a TorchTrainer with
``num_workers`` workers, or in this process with ``num_workers=0``. Whatever ends a run, its MLflow run is
closed: FINISHED, FAILED or KILLED with the reason as the ``rayoodkd.failure`` tag; a relaunch that fails
leaves a FINISHED run FINISHED, and a run that failed before its first checkpoint leaves nothing a relaunch
would mistake for a resumable run (docs/reliability.md).
"""

from __future__ import annotations

import functools
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rayoodkd.config import BaseRunConfig, ConfigError, flatten
from rayoodkd.console import Phases, quiet_python_loggers, quiet_ray_data
from rayoodkd.engine.checkpoint import STATE_FILE, newest_intact
from rayoodkd.engine.tracking import Tracker
from rayoodkd.errors import EXIT_CODE, RunInterrupted, one_line
from rayoodkd.methods import METHODS
from rayoodkd.preflight import check_cluster_fits, corpora, preflight
from rayoodkd.raystart import interruption_reason, start_or_join_ray
from rayoodkd.storage import filesystem, ray_storage_path, read_json, write_json
from rayoodkd.teacher_io import TeacherInfo, read_teacher

RUN_FILE = "rayoodkd_run.json"
EVAL_SPLITS = ("val", "test")


class RunFailed(RuntimeError):
    """Training failed after the run started; the message is one line with the reason."""


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


def _datasets(cfg: BaseRunConfig, info: TeacherInfo) -> tuple[dict[str, Any], dict[str, int], dict[str, int]]:
    """The Ray datasets of the run, how many corrupt images each held (materialised ones), and how many
    intact rows each consumed stream has (what its epochs are made of)."""
    from rayoodkd.data import load_corpus
    from rayoodkd.data.decoded import count_and_keep, read_cached, slot

    consumes = METHODS.get(cfg.method).consumes
    sources = corpora(cfg)
    size = {"image_size": info.image_size, "channels": info.channels}
    blocks = max(4 * cfg.num_workers, 8)
    limit = cfg.data.decoded_cache_mb if cfg.data.materialize else 0
    slots = {
        key: slot(corpus, **size, seed=cfg.seed, cache_dir=cfg.data.cache_dir, limit_mb=limit)
        for key, corpus in sources.items()
    }
    cached, loaded = {}, {}
    for key, corpus in sources.items():
        hit = read_cached(slots[key], blocks)
        if hit is not None:
            cached[key] = hit
            continue
        try:
            loaded[key] = load_corpus(corpus, **size, seed=cfg.seed, cache_dir=cfg.data.cache_dir)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"{key}.{error}") from None

    def decode(key: str) -> tuple[Any, int, int]:
        """The dataset (materialised when configured), its rows and its corrupt rows (counted only when
        materialised or consumed: a streamed set's epoch is made of its intact rows)."""
        dataset = loaded[key]
        if cfg.data.materialize:
            # Decode once into the object store; then every epoch and every split is a cheap block handout.
            dataset = dataset.repartition(blocks).materialize()
            return (dataset, *count_and_keep(dataset, slots[key]))
        if key.removeprefix("data.") not in consumes:
            return dataset, 0, 0
        return (dataset, *count_and_keep(dataset))

    # The corpora decode at the same time: each execution is mostly fixed overhead on small sets.
    with ThreadPoolExecutor(max_workers=len(loaded) or 1) as pool:
        decoded = cached | dict(zip(loaded, pool.map(decode, loaded), strict=True))
    datasets, corrupt, rows_of = {}, {}, {}
    for key in sources:
        dataset, rows, skipped = decoded[key]
        name = key.removeprefix("data.")
        intact = rows - skipped
        if cfg.data.materialize:
            corrupt[name] = skipped
            if intact == 0:
                raise ConfigError(f"{key}: none of its {rows} images could be decoded (all corrupt)")
            needed = cfg.data.batch_size * max(cfg.num_workers, 1)
            if name in consumes and intact < needed:
                raise ConfigError(
                    f"{key}: {intact} intact images, fewer than one batch per worker (data.batch_size "
                    f"{cfg.data.batch_size} x {max(cfg.num_workers, 1)} workers); lower data.batch_size"
                )
            if skipped and name in consumes:  # an epoch is its intact rows; evaluation skips the rest itself
                dataset = dataset.map_batches(_keep_intact, batch_format="numpy")
        rows_of[name] = intact
        datasets[name] = dataset
    return datasets, corrupt, {name: rows_of[name] for name in consumes}


def _mlflow_run(
    cfg: BaseRunConfig, tracking_uri: str, run_name: str, storage: str, tags: dict[str, str]
) -> tuple[Tracker, str | None]:
    """The run's MLflow run, and its status before this launch (None for a new run)."""
    run_dir = f"{storage.rstrip('/')}/{run_name}"
    previous = read_json(f"{run_dir}/{RUN_FILE}")
    if previous is not None:
        tracker = Tracker(tracking_uri, previous["mlflow_run_id"])
        return tracker, tracker.reopen()
    tracker = Tracker.create(tracking_uri, cfg.storage_path, cfg.experiment_name, run_name, tags)
    params = flatten(cfg.model_dump(mode="json", include=_logged_keys(cfg)))
    params.update({"run_name": run_name, "storage_path": storage})  # what was used, not the defaults
    tracker.log_params(params)
    write_json(f"{run_dir}/{RUN_FILE}", {"mlflow_run_id": tracker.run_id, "tracking_uri": tracking_uri})
    return tracker, None


def _logged_keys(cfg: BaseRunConfig) -> set[str]:
    return {k for k in type(cfg).model_fields if k not in METHODS.names() or k == cfg.method}


def _interrupted(error: BaseException) -> bool:
    """Ctrl-C (a KeyboardInterrupt in the driver, or the ``sys.exit`` of Ray Train's own SIGINT handler) or
    SIGTERM (the ``sys.exit`` of the handler ``start_or_join_ray`` installs)."""
    return isinstance(error, KeyboardInterrupt | SystemExit)


def _secondary(cause: BaseException) -> bool:
    """A rank that failed only because a peer died (its collective lost the connection)."""
    text = str(cause).lower()
    return any(hint in text for hint in ("connection closed by peer", "connection reset", "gloo", "nccl"))


def failure_reason(error: BaseException, run_started: float = 0.0) -> str:
    """One line saying why a run ended: for a Ray Train failure, the worker that failed first-hand (a dead
    actor or its own exception rather than a peer's broken collective), lowest rank first; for an
    interruption, SIGTERM if one arrived after ``run_started`` (``time.monotonic()``), else Ctrl-C."""
    if _interrupted(error):
        return interruption_reason(run_started)
    failures = getattr(error, "worker_failures", None)
    if failures:
        causes = {rank: getattr(cause, "cause", None) or cause for rank, cause in failures.items()}
        rank = min(causes, key=lambda r: (_secondary(causes[r]), r))
        return f"worker {rank}: {one_line(causes[rank])}"
    controller = getattr(error, "controller_failure", None)
    return one_line(controller or error)


def _record_failure(
    tracker: Tracker,
    previous_status: str | None,
    run_dir: str,
    error: BaseException,
    started: float,
    log: Any,
) -> tuple[str, bool]:
    """Close the MLflow run for ``error`` (best effort: a tracking server that is gone only costs a warning)
    and forget a run that has no intact checkpoint, so a relaunch starts afresh; return the reason and whether
    a relaunch resumes."""
    reason = failure_reason(error, started)
    try:
        if previous_status == "FINISHED":
            tracker.set_tags({"rayoodkd.relaunch_failure": reason})
            tracker.terminate("FINISHED")
        else:
            tracker.end("KILLED" if _interrupted(error) else "FAILED", reason)
    except Exception as tracking_error:  # the failure itself is what the user must see
        log(f"warning: could not close MLflow run {tracker.run_id}: {one_line(tracking_error)}")
    try:
        if newest_intact(run_dir).directory is None:
            fs, path = filesystem(f"{run_dir}/{RUN_FILE}")
            fs.delete_file(path)
            return reason, False
    except OSError as storage_error:
        log(f"warning: could not check {run_dir}: {one_line(storage_error)}")
    return reason, True


def _train_on_workers(
    cfg: BaseRunConfig,
    loop_config: dict[str, Any],
    datasets: dict[str, Any],
    run_name: str,
    storage: str,
    report_to_tune: bool,
) -> tuple[dict[str, Any], str]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayoodkd.engine.ingest import RunDataConfig
    from rayoodkd.engine.loop import train_loop_per_worker
    from rayoodkd.engine.session import block_shares

    shares = {name: block_shares(datasets[name], cfg.num_workers) for name in EVAL_SPLITS if name in datasets}
    eval_blocks = {name: blocks for name, blocks in shares.items() if blocks is not None}
    datasets = {name: dataset for name, dataset in datasets.items() if name not in eval_blocks}
    callbacks = None
    if report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]
    resources = {"CPU": cfg.resources.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.resources.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "eval_blocks": eval_blocks},
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
        dataset_config=RunDataConfig(
            streams=sorted(METHODS.get(cfg.method).consumes),
            eval_splits=[name for name in EVAL_SPLITS if name in datasets],
        ),
    )
    result = trainer.fit()
    return result.metrics, result.checkpoint.path if result.checkpoint else ""


def _train_in_driver(
    cfg: BaseRunConfig, loop_config: dict[str, Any], datasets: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    import torch

    from rayoodkd.engine.loop import run_worker
    from rayoodkd.engine.session import DriverSession

    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    session = DriverSession(
        datasets, loop_config["run_dir"], cfg.checkpoints_to_keep, loop_config["stream_rows"], device
    )
    run_worker(loop_config, session)
    return session.last_metrics, session.last_checkpoint or ""


def _tune_report(metrics: dict[str, Any], checkpoint: str) -> None:
    """The final report of a run that trained in its Tune trial's process (``num_workers=0``), to Tune, as
    Ray Train's TuneReportCallback reports a worker's. Only the final one: a report blocks, and Tune ends a
    trial it stops (ASHA, Ctrl-C) by raising SystemExit from it, which mid-run would read as an
    interruption."""
    from ray import tune

    tune.report({**metrics, "checkpoint_path": checkpoint} if checkpoint else metrics)


def launch(
    cfg: BaseRunConfig,
    *,
    report_to_tune: bool = False,
    mlflow_tags: dict[str, str] | None = None,
    console_label: str | None = None,
    log: Any = print,
) -> RunSummary:
    """Check, then run ``cfg`` (joining ``RAY_ADDRESS`` or starting a local Ray); summarise it.

    Raises :class:`ConfigError` (one line naming the key) for anything wrong with the inputs, before an
    MLflow run exists; a failure during training closes the MLflow run (see the module doc) and re-raises.
    ``console_label`` starts every progress line of the run (for runs sharing one console: sweeps).
    ``report_to_tune``: the run is a Tune trial's, and its reports go to Tune too: every evaluation from
    Ray Train's workers, the final one from a run in the trial's own process (``num_workers=0``).
    """
    started, launched_at = time.monotonic(), time.time()
    phases = Phases()
    quiet_ray_data(cfg.ray_logs)  # before a teacher recipe's reads too; importing Ray Data sets its loggers
    if not cfg.ray_logs:
        quiet_python_loggers()
    start_ray = functools.partial(start_or_join_ray, cfg.ray_dashboard, trials=False, ray_logs=cfg.ray_logs)
    teacher_path, tracking_uri = preflight(cfg, log, before_teacher_training=start_ray)
    _, info = read_teacher(teacher_path)
    phases.lap("checks")
    start_ray()
    phases.lap("ray")
    check_cluster_fits(cfg, log)
    run_name = cfg.run_name or f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = ray_storage_path(cfg.storage_path)
    run_dir = f"{storage.rstrip('/')}/{run_name}"
    datasets, corrupt_images, stream_rows = _datasets(cfg, info)
    phases.lap("data")
    tags = {"method": cfg.method, **(mlflow_tags or {})}
    tracker, previous_status = _mlflow_run(cfg, tracking_uri, run_name, storage, tags)
    phases.lap("mlflow")
    log(
        f"run {run_name}: {'resuming' if previous_status else 'starting'} ({phases}); "
        f"MLflow run {tracker.run_id} at {tracker.page_url() or tracker.tracking_uri}"
    )
    if any(corrupt_images.values()):
        tracker.log_metrics({f"data/{name}/corrupt_images": n for name, n in corrupt_images.items()}, 0)
        log("corrupt images skipped: " + ", ".join(f"{name} {n}" for name, n in corrupt_images.items()))
    loop_config = {
        "config": cfg.model_dump(mode="json"),
        "teacher_path": str(Path(teacher_path).resolve()),
        "tracking_uri": tracker.tracking_uri,
        "mlflow_run_id": tracker.run_id,
        "run_dir": run_dir,
        "stream_rows": stream_rows,
        "console_label": console_label,
        "launched_at": launched_at,
        "driver_phases": phases.seconds,
    }
    try:
        if cfg.num_workers == 0:
            metrics, checkpoint = _train_in_driver(cfg, loop_config, datasets)
        else:
            metrics, checkpoint = _train_on_workers(
                cfg, loop_config, datasets, run_name, storage, report_to_tune
            )
        summary = _summary(cfg, run_name, metrics, checkpoint, tracker, teacher_path, corrupt_images, started)
        _finish_tracking(tracker, summary)
    except BaseException as error:
        reason, resumable = _record_failure(tracker, previous_status, run_dir, error, started, log)
        if _interrupted(error):
            raise RunInterrupted(
                f"{reason}: run {run_name} keeps its checkpoints in {run_dir}; launch it again to resume"
                if resumable
                else f"{reason} before its first checkpoint: a new launch of run {run_name} starts afresh",
                EXIT_CODE[reason],
            ) from error
        if resumable:
            log(
                f"run {run_name}: checkpoints kept in {run_dir}; "
                f"launch again with run_name={run_name} to resume"
            )
        if isinstance(error, Exception):
            raise RunFailed(f"run {run_name} failed: {reason}") from error
        raise
    if report_to_tune and cfg.num_workers == 0:
        _tune_report(metrics, checkpoint)
    if cfg.summary_json:
        path = Path(cfg.summary_json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(summary), indent=2))
    return summary


def _summary(
    cfg: BaseRunConfig,
    run_name: str,
    metrics: dict[str, Any],
    checkpoint: str,
    tracker: Tracker,
    teacher_path: Path,
    corrupt_images: dict[str, int],
    started: float,
) -> RunSummary:
    return RunSummary(
        method=cfg.method,
        run_name=run_name,
        teacher_accuracy=metrics["teacher/test_top1"],
        student_accuracy=metrics["test/top1"],
        best_val_accuracy=metrics["best_val/top1"],
        best_val_step=int(metrics["best_val/step"]),
        test_accuracy_at_best_val=metrics.get("test/top1_at_best_val", metrics["test/top1"]),
        student_top5=metrics.get("test/top5", math.nan),
        agreement_with_teacher=metrics["test/agreement"],
        steps=int(metrics["step"]),
        images_per_second=metrics.get("throughput/images_per_second", 0.0),
        train_seconds=metrics["train_seconds"],
        wall_seconds=time.monotonic() - started,
        num_workers=cfg.num_workers,
        resumed_from_step=int(metrics["resumed_from_step"]),
        corrupt_skipped=sum(corrupt_images.values()) + int(metrics.get("data/corrupt_skipped", 0)),
        mlflow_run_id=tracker.run_id,
        tracking_uri=tracker.tracking_uri,
        checkpoint=checkpoint,
        teacher_checkpoint=str(teacher_path),
    )


def _finish_tracking(tracker: Tracker, summary: RunSummary) -> None:
    tracker.log_metrics({"summary/wall_seconds": summary.wall_seconds}, summary.steps)
    tracker.log_text(summary.table(), "summary.txt")
    tracker.log_text(json.dumps(asdict(summary), indent=2), "summary.json")
    if summary.checkpoint:
        fs, inner = filesystem(summary.checkpoint)
        if type(fs).__name__ == "LocalFileSystem":
            tracker.log_artifact(Path(inner) / STATE_FILE, "checkpoint")
    tracker.set_tags({"checkpoint": summary.checkpoint})
    tracker.terminate("FINISHED")
