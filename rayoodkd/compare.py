"""``rayoodkd compare``: several configs × several seeds as concurrent Ray Tune trials, aggregated.

    rayoodkd compare --configs mnist-kd-letters mnist-mosaickd-letters --seeds 0 1 2
    rayoodkd compare --configs mnist-kd3-web "mnist-kd3-web kd3.select=false" --seeds 0 1 2 max_steps=2000

Each ``--configs`` item is a preset or YAML file, optionally followed by overrides of its own (quote it); the
trailing ``KEY=VALUE`` overrides apply to every item. ``{seed}`` in an override is the cell's seed (e.g. each
seed's stage-3 runs starting from that seed's shared run: ``"init_from={checkpoint: R/prefix-s{seed},
stage: mixup}"``). Every (config, seed) cell is a full rayoodkd run (its
own TorchTrainer, resumable under its run name) launched from a Ray Tune trial, as many at once as the
cluster's CPUs (or GPUs) allow, each an MLflow child run of the comparison's run. The result, per config,
is mean ± std over seeds of the final test top-1, the best validation top-1, the test top-1 of the student
selected on validation (the figure to compare methods by), wall time and images per second: a markdown
table, a CSV with every cell, and a PNG of validation top-1 against step (mean line, ±1 std band), written
to ``--output`` and logged to the comparison's MLflow run. ``--metrics KEY ...`` adds columns: the mean ± std
of each run's last value of those metrics or run-state tags (``test/top3_at_best_val``, ``select/precision``,
``teacher/test_top1``, ...). Running the same comparison again (same ``--name``) resumes its unfinished cells
and re-aggregates.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import re
import shlex
import statistics
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayoodkd.cli import prog
from rayoodkd.config import ConfigError, build_config, resolve_config
from rayoodkd.interruption import Interruption, stopped_line
from rayoodkd.storage import ray_storage_path, read_json, write_json

COMPARE_FILE = "compare.json"
COLUMNS = {
    "test/top1": "test top-1 (final)",
    "best_val/top1": "best val top-1",
    "test/top1_at_best_val": "test top-1 at best val",
    "summary/wall_seconds": "wall (s)",
    "throughput/images_per_second": "img/s",
}
MEANS_ONLY = ("summary/wall_seconds", "throughput/images_per_second")  # the others: mean ± std
SEED = "{seed}"


def columns(metrics: Sequence[str] = ()) -> dict[str, str]:
    """The table's metric columns: the standard ones, then ``metrics`` (headed by their key)."""
    return COLUMNS | {key: key for key in metrics if key not in COLUMNS}


@dataclass
class Entry:
    """One ``--configs`` item: a preset or YAML file and its own overrides."""

    label: str
    ref: str
    overrides: list[str]

    @classmethod
    def parse(cls, text: str) -> Entry:
        parts = shlex.split(text)
        if not parts:
            raise ConfigError("--configs: an empty item")
        return cls(" ".join(parts), parts[0], parts[1:])


@dataclass
class Cell:
    """One run of the grid: a config at a seed."""

    label: str
    seed: int
    config: dict[str, Any]
    run_name: str = ""


@dataclass
class CellResult:
    label: str
    seed: int
    run_name: str
    mlflow_run_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60]


def plan(entries: list[Entry], seeds: list[int], overrides: list[str], name: str) -> list[Cell]:
    """Every cell's validated config (any bad key fails here, naming its item, before Ray starts)."""
    labels = [entry.label for entry in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--configs: an item is given twice ({', '.join(labels)})")
    cells = []
    for entry in entries:
        for seed in seeds:
            own = [text.replace(SEED, str(seed)) for text in [*overrides, *entry.overrides]]
            try:
                cfg = resolve_config(entry.ref, [*own, f"seed={seed}"])
            except (ConfigError, FileNotFoundError) as error:
                raise ConfigError(f"--configs {entry.label!r}: {error}") from None
            # The config's hash in the name: the same comparison with other settings never reuses these runs.
            run_name = f"{name}-{_slug(entry.label)}-s{seed}-{_digest(cfg.model_dump_json())}"
            cells.append(Cell(entry.label, seed, cfg.model_dump(mode="json"), run_name))
    return cells


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def default_name(entries: list[Entry], seeds: list[int], overrides: list[str]) -> str:
    """From the configs and the seed count, plus a hash of the shared overrides when there are some."""
    name = _slug("-vs-".join(_slug(e.label) for e in entries))[:80] + f"-seeds{len(seeds)}"
    return f"{name}-{_digest(' '.join(overrides))}" if overrides else name


def _trainable(config: dict[str, Any], *, cells: list[Cell], compare: dict[str, str]) -> None:
    """One cell (a Tune function trainable): a full rayoodkd run, reporting to Tune."""
    from rayoodkd.launch import launch

    cell = cells[config["cell"]]
    data = dict(cell.config)
    data.update(
        run_name=cell.run_name,
        storage_path=compare["trials"],
        tracking_uri=compare["tracking_uri"],
        summary_json=None,
    )
    launch(
        build_config(data),
        report_to_tune=True,
        mlflow_tags={
            "mlflow.parentRunId": compare["parent_run_id"],
            "compare": compare["name"],
            "compare.config": cell.label,
            "seed": str(cell.seed),
        },
        console_label=f"{cell.label} s{cell.seed}",
    )


def collect_results(
    cells: list[Cell], trials: str, tracking_uri: str, metrics: Sequence[str] = ()
) -> list[CellResult]:
    """Each cell's figures from its MLflow run (a cell that never started has none)."""
    from mlflow.tracking import MlflowClient

    from rayoodkd.launch import RUN_FILE

    client = MlflowClient(tracking_uri)
    results = []
    for cell in cells:
        record = read_json(f"{trials}/{cell.run_name}/{RUN_FILE}") or {}
        run_id = record.get("mlflow_run_id", "")
        result = CellResult(cell.label, cell.seed, cell.run_name, run_id, "NOT RUN")
        if run_id:
            run = client.get_run(run_id)
            result.status = run.info.status
            result.metrics = _figures(run.data.metrics, run.data.tags, columns(metrics))
            if "test/top1_at_best_val" not in result.metrics and "test/top1" in result.metrics:
                result.metrics["test/top1_at_best_val"] = result.metrics["test/top1"]
            history = client.get_metric_history(run_id, "val/top1")
            result.curve = sorted((m.step, m.value) for m in history)
        results.append(result)
    return results


def _figures(metrics: dict[str, float], tags: dict[str, str], keys: Sequence[str]) -> dict[str, float]:
    """The last logged value of each key, or its run-state tag (e.g. ``teacher/test_top1``)."""
    figures = {}
    for key in keys:
        if key in metrics:
            figures[key] = metrics[key]
        elif key in tags:
            try:
                figures[key] = float(tags[key])  # run-state tags are written with :g (1.5e+06 too)
            except ValueError:
                continue
    return figures


def _mean_std(values: list[float], spread: bool = True) -> str:
    """``mean ± sample std`` (the mean alone for one value, or without ``spread``)."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1 or not spread:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def table_markdown(results: list[CellResult], name: str, metrics: Sequence[str] = ()) -> str:
    """Per config: mean ± std over its finished seeds (sample std)."""
    labels = list(dict.fromkeys(r.label for r in results))
    wanted = columns(metrics)
    header = ["config", "seeds", *wanted.values()]
    lines = [
        f"Comparison `{name}`: mean ± std over seeds (sample std); model selection on the validation split.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for label in labels:
        done = [r for r in results if r.label == label and r.status == "FINISHED"]
        total = sum(r.label == label for r in results)
        cells = [
            _mean_std([r.metrics[key] for r in done if key in r.metrics], spread=key not in MEANS_ONLY)
            for key in wanted
        ]
        lines.append(f"| {label} | {len(done)}/{total} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_csv(results: list[CellResult], metrics: Sequence[str] = ()) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    wanted = columns(metrics)
    writer.writerow(["config", "seed", "status", *wanted, "run_name", "mlflow_run_id"])
    for r in results:
        values = [r.metrics.get(key, "") for key in wanted]
        writer.writerow([r.label, r.seed, r.status, *values, r.run_name, r.mlflow_run_id])
    return buffer.getvalue()


def plot_curves(results: list[CellResult], path: Path, name: str) -> None:
    """Validation top-1 against step per config: the mean over seeds and a ±1 std band (steps that every
    finished seed evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # Runs of different lengths (MosaicKD counts outer iterations, KD student steps) are drawn against the
    # fraction of their run, not against a step count that means different work.
    lengths = {r.curve[-1][0] for r in results if r.curve}
    by_fraction = len(lengths) > 1
    figure, axes = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for label in dict.fromkeys(r.label for r in results):
        curves = [dict(r.curve) for r in results if r.label == label and r.curve]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.array([[c[s] for s in steps] for c in curves])
        mean, std = values.mean(0), values.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
        x = np.array(steps) / max(max(c) for c in curves) * 100 if by_fraction else steps
        (line,) = axes.plot(x, mean, label=f"{label} (n={len(curves)})")
        axes.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes.set_xlabel("% of the run's steps" if by_fraction else "step")
    axes.set_ylabel("val top-1 (%)")
    # A comparison's name runs to ~100 characters (its configs, the seed count, a hash): on lines of its own.
    title = [*textwrap.wrap(name, 70), "validation top-1, mean ± std over seeds"]
    axes.set_title("\n".join(title), fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


@dataclass
class CompareResult:
    name: str
    results: list[CellResult]
    table: str
    output: Path
    parent_run_id: str
    tracking_uri: str
    interruption: Interruption = field(default_factory=Interruption)


def run_compare(
    entries: list[Entry],
    seeds: list[int],
    overrides: list[str] | None = None,
    *,
    name: str | None = None,
    output: Path | None = None,
    driver_cpus: float = 0.5,
    max_concurrent: int | None = None,
    metrics: Sequence[str] = (),
    log: Any = print,
) -> CompareResult:
    """Run (or resume) every cell, then aggregate; see the module doc. ``max_concurrent`` caps the runs at
    once (1: one at a time, for wall times measured on an otherwise idle machine); ``metrics`` adds
    columns."""
    from ray import tune

    from rayoodkd.console import TuneLog, quiet_python_loggers
    from rayoodkd.engine.tracking import Tracker, default_tracking_uri
    from rayoodkd.interruption import close_cut_short, parent_killed_if_stopped_at_once, running_trials
    from rayoodkd.preflight import check_output_dir
    from rayoodkd.raystart import start_or_join_ray
    from rayoodkd.teacher import ensure_teacher
    from rayoodkd.tune import concurrent_trials, fit_tuner

    if not seeds:
        raise ConfigError("--seeds: at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(
            f"--seeds: a seed is given twice ({' '.join(map(str, seeds))}); each seed runs once"
        )
    quiet_python_loggers()
    name = name or default_name(entries, seeds, overrides or [])
    cells = plan(entries, seeds, overrides or [], name)
    output = output or Path(f"compare-{name}")
    check_output_dir("--output", output)
    first = build_config(cells[0].config)
    root = f"{ray_storage_path(first.storage_path).rstrip('/')}/{name}"
    trials = f"{root}/trials"
    record = read_json(f"{root}/{COMPARE_FILE}")

    def parent_run() -> Tracker:
        """The comparison's parent MLflow run: the recorded one (resumed), else a new one, recorded."""
        if record is not None:
            return Tracker(record["tracking_uri"], record["parent_run_id"])
        tracking_uri = first.tracking_uri or default_tracking_uri(first.storage_path)
        tracker = Tracker.create(
            tracking_uri,
            first.storage_path,
            first.experiment_name,
            f"compare-{name}",
            {"rayoodkd.kind": "compare"},
        )
        tracker.log_params(
            {
                "configs": " | ".join(e.label for e in entries),
                "seeds": seeds,
                "overrides": " ".join(overrides or []),
            }
        )
        write_json(
            f"{root}/{COMPARE_FILE}",
            {
                "parent_run_id": tracker.run_id,
                "tracking_uri": tracking_uri,
                "cells": [c.run_name for c in cells],
            },
        )
        return tracker

    with parent_killed_if_stopped_at_once(parent_run) as tracker:
        teachers = {}
        for cell in cells:
            cfg = build_config(cell.config)
            teachers.setdefault(cfg.teacher.model_dump_json(), cfg)
        quiet_python_loggers()
        # Before the teachers: their recipes read corpora through Ray Data, which would start Ray its own way.
        start_or_join_ray(first.ray_dashboard, trials=True, ray_logs=first.ray_logs)
        for cfg in teachers.values():
            ensure_teacher(cfg.teacher, cfg.data.cache_dir, log)  # once here, not in every concurrent trial
        quiet_python_loggers()  # again: importing Ray Data and Tune configures their loggers
        compare = {
            "name": name,
            "trials": trials,
            "tracking_uri": tracker.tracking_uri,
            "parent_run_id": tracker.run_id,
        }
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, cells=cells, compare=compare), {"CPU": driver_cpus}
        )
        results = collect_results(cells, trials, tracker.tracking_uri)
        finished = {r.run_name for r in results if r.status == "FINISHED"}
        pending = [index for index, cell in enumerate(cells) if cell.run_name not in finished]
        most = max(len(pending), 1)
        concurrent = concurrent_trials(
            None if max_concurrent is None else min(max_concurrent, most),
            [build_config(cell.config) for cell in cells],
            driver_cpus,
            f"--max-concurrent {max_concurrent}",
            "lower resources.cpus_per_worker, or add nodes",
            log,
        )
        concurrent = min(concurrent, most)
        log(
            f"compare {name}: {len(cells)} runs ({len(entries)} configs x {len(seeds)} seeds), "
            f"{len(pending)} to run, {concurrent} at once; "
            f"MLflow run {tracker.run_id} at {tracker.tracking_uri}"
        )
        started = time.perf_counter()
        if record is not None:
            tracker.reopen()
        stop = Interruption()
        if pending:
            tuner = tune.Tuner(
                trainable,
                param_space={"cell": tune.grid_search(pending)},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
                run_config=tune.RunConfig(
                    name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                    storage_path=root,
                    verbose=0,
                    callbacks=[_progress_callback(cells, TuneLog(log)), running_trials()],
                ),
            )
            _, stop = fit_tuner(tuner)
        results = collect_results(cells, trials, tracker.tracking_uri, metrics)
        cut_cells = {config["cell"] for config in stop.cut_short.values()}
        # Tune ended these runs without waiting for them to close their MLflow runs.
        close_cut_short(
            [
                (Tracker(tracker.tracking_uri, results[index].mlflow_run_id), stop.reason)
                for index in cut_cells
                if results[index].mlflow_run_id
            ]
        )
        if cut_cells:
            results = collect_results(cells, trials, tracker.tracking_uri, metrics)
        table = table_markdown(results, name, metrics)
        (output / "compare.md").write_text(table)
        (output / "results.csv").write_text(results_csv(results, metrics))
        plot_curves(results, output / "curves.png", name)
        for file in ("compare.md", "results.csv", "curves.png"):
            tracker.log_artifact(output / file)
        tracker.log_metrics(
            aggregate_metrics(results) | {"compare/wall_seconds": time.perf_counter() - started}, 0
        )
        unfinished = sum(r.status != "FINISHED" for r in results)
        if stop.reason is not None:
            tracker.end("KILLED", stop.reason)
        else:
            tracker.terminate("FAILED" if unfinished else "FINISHED")
        log(table)
        log(f"compare {name}: table, CSV and curves in {output}")
        if unfinished:
            why = f"{stop.reason}: " if stop.reason is not None else ""
            log(
                f"compare {name}: {why}{unfinished} runs unfinished: "
                "run the same command again to resume them"
            )
        return CompareResult(name, results, table, output, tracker.run_id, tracker.tracking_uri, stop)


def aggregate_metrics(results: list[CellResult]) -> dict[str, float]:
    """Per config, the mean test top-1 at best val over its finished runs (an interrupted run has none)."""
    metrics = {}
    for label in dict.fromkeys(r.label for r in results):
        values = [
            r.metrics["test/top1_at_best_val"]
            for r in results
            if r.label == label and r.status == "FINISHED" and "test/top1_at_best_val" in r.metrics
        ]
        if values:
            metrics[f"{_slug(label)}/test_top1_at_best_val_mean"] = statistics.fmean(values)
    return metrics


def _progress_callback(cells: list[Cell], log: Any) -> Any:
    """A Tune callback that logs a line per finished or failed cell (Tune's own tables are off)."""
    from ray.tune import Callback

    class Progress(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            cell = cells[trial.config["cell"]]
            result = trial.last_result or {}
            top1 = result.get("test/top1_at_best_val", result.get("test/top1", math.nan))
            log(f"done: {cell.label} seed {cell.seed}: test top-1 at best val {top1:.2f}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            cell = cells[trial.config["cell"]]
            log(f"failed: {cell.label} seed {cell.seed} (its MLflow run has the reason)")

    return Progress()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("compare"),
        description="Run several configs over several seeds as concurrent Ray Tune trials and report mean "
        "± std (a markdown table, a CSV and a PNG of validation curves, also logged to MLflow).",
        epilog="example: rayoodkd compare --configs mnist-kd-letters mnist-mosaickd-letters --seeds 0 1 2 "
        "max_steps=2000\n         rayoodkd compare --configs demo "
        '"demo kd_ood.optim.student.lr=0.05" --seeds 0 1',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        required=True,
        metavar="CONFIG",
        help='presets or YAML files; "REF KEY=VALUE ..."',
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="default: 0 1 2")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every config")
    parser.add_argument("--name", help="the comparison's name (default: from the configs and seed count)")
    parser.add_argument(
        "--output", type=Path, help="where to write the table and plot (default ./compare-NAME)"
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=[],
        metavar="KEY",
        help="more columns: mean ± std of each run's last value of these metrics, e.g. test/top3_at_best_val",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        help="runs at once (default: what the cluster fits, also the most on a cluster without an "
        "autoscaler; 1 for clean timings)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        entries = [Entry.parse(text) for text in args.configs]
        result = run_compare(
            entries,
            args.seeds,
            args.overrides,
            name=args.name,
            output=args.output,
            max_concurrent=args.max_concurrent,
            metrics=args.metrics,
        )
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupted:
        line, exit_code = stopped_line(interrupted, "comparison", "run the same command again to resume it")
        print(line, file=sys.stderr)
        return exit_code
    return result.interruption.exit_code


if __name__ == "__main__":
    sys.exit(main())
