"""``python -m rayoodkd.tune``: hyperparameter sweeps with Ray Tune and ASHA, one MLflow child run per trial.

A *tune space* YAML (the package ships some in ``rayoodkd/tune_spaces/``) names a base preset, fixed
overrides, a search space over any run-config key, the metric, the ASHA settings and what every trial may
use. Each trial is a full rayoodkd run (its own TorchTrainer with 1..N workers, launched from a Tune function
trainable, the Ray Train V2 pattern of spec/ray.md §3.1) that reports validation metrics at every
evaluation, so ASHA can stop it early.

Layout under ``<storage_path>/<name>/``: ``sweep.json`` (the resolved space and the parent MLflow run),
``tune/`` (Tune's experiment, what ``--resume`` restores) and ``trials/`` (one Train run per trial, named
after the trial ID, so a restarted trial resumes from its own checkpoint). The output directory gets
``results.csv`` and ``best.yaml``, a preset that ``python -m rayoodkd.train --config DIR/best.yaml`` runs.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from rayoodkd.cli import prog
from rayoodkd.config import (
    BaseRunConfig,
    ConfigError,
    Section,
    build_config,
    build_section,
    flatten,
    load_preset,
    parse_override,
    set_dotted,
    to_yaml,
)
from rayoodkd.interruption import (
    Interruption,
    close_cut_short,
    parent_killed_if_stopped_at_once,
    running_trials,
    stop_gracefully_on_signals,
    stopped_line,
)
from rayoodkd.storage import is_remote, local_path, ray_storage_path, read_json, write_json

if TYPE_CHECKING:
    from ray.tune import ResultGrid, Tuner

    from rayoodkd.engine.tracking import Tracker

# The spaces shipped with the package (package data); ``--space NAME`` also looks in ./tune_spaces first.
SPACE_DIR = Path(__file__).resolve().parent / "tune_spaces"
SWEEP_FILE = "sweep.json"
# What each search-space kind takes: ``{kind: [args]}`` in the YAML (``{grid: [2, 4, 8]}``).
DOMAIN_ARITY = {
    "choice": None,
    "grid": None,
    "uniform": 2,
    "quniform": 3,
    "loguniform": 2,
    "qloguniform": 3,
    "randint": 2,
    "qrandint": 3,
}
EVAL_METRICS = ("val/top1", "val/agreement", "best_val/top1")
EVAL_METRIC_PATTERN = re.compile(r"val/top\d+|loss/.+|[a-z_]+/loss/.+")


class SchedulerSpace(Section):
    """Early stopping: ``asha`` (async successive halving) or ``fifo`` (every trial runs to the end)."""

    type: Literal["asha", "fifo"] = "asha"
    time_attr: Literal["step", "training_iteration"] = Field(
        "step", description="training steps, or evaluations reported (training_iteration)"
    )
    max_t: int | None = Field(None, ge=1, description="null: the base run's max_steps (or its evaluations)")
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    brackets: int = Field(1, ge=1)


class TrialResources(Section):
    """What one trial uses. Train workers reserve their own placement group outside Tune's accounting."""

    num_workers: int | None = Field(None, ge=0, description="null: the base config's num_workers")
    cpus_per_worker: float | None = Field(None, gt=0)
    gpus_per_worker: float | None = Field(None, ge=0)
    driver_cpus: float = Field(0.5, gt=0, description="the Tune trial itself, which drives the TorchTrainer")


class SweepSpace(Section):
    """A tune space file, validated (every error names its key)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base: str = "demo"
    overrides: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, dict[str, Any]]
    metric: str = "val/top1"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSpace = SchedulerSpace()
    num_samples: int = Field(1, ge=1, description="repeats of the grid, or random samples")
    trial: TrialResources = TrialResources()
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        description="null: what the cluster's CPUs (and GPUs) allow; more is lowered to that on a cluster "
        "without an autoscaler",
    )
    max_failures: int = Field(0, ge=0, description="Tune-level retries of a crashed trial")
    start_stage: str | None = Field(
        None,
        description="a multi-stage method's stage the trials start at: the stages before it run once, in "
        "a shared run, and every trial starts from its end (init_from); search keys acting from there on",
    )
    report_metrics: list[str] = Field(
        default_factory=lambda: ["test/top1"],
        description="more metrics of each trial's last report for results.csv (empty if never reported)",
    )

    @field_validator("search")
    @classmethod
    def _domains(cls, search: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not search:
            raise ValueError("needs at least one KEY: {kind: args}")
        for key, domain in search.items():
            _check_domain(key, domain)
        return search

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in EVAL_METRICS and not EVAL_METRIC_PATTERN.fullmatch(metric):
            raise ValueError(
                f"allowed: {', '.join(EVAL_METRICS)}, val/top<k> (eval.topk), loss/* or <stage>/loss/*"
            )
        return metric

    @model_validator(mode="after")
    def _disjoint(self) -> SweepSpace:
        both = sorted(set(self.overrides) & set(self.search))
        if both:
            raise ValueError(f"keys both fixed in overrides and searched: {', '.join(both)}")
        return self


def _check_domain(key: str, domain: Any) -> None:
    kinds = ", ".join(DOMAIN_ARITY)
    if not isinstance(domain, dict) or len(domain) != 1 or next(iter(domain)) not in DOMAIN_ARITY:
        raise ValueError(f"{key}: expected one of {{{kinds}}}: ARGS, got {domain!r}")
    kind, args = next(iter(domain.items()))
    arity = DOMAIN_ARITY[kind]
    if not isinstance(args, list) or not args or (arity is not None and len(args) != arity):
        expected = "a non-empty list" if arity is None else f"a list of {arity} numbers"
        raise ValueError(f"{key}: {kind} takes {expected}, got {args!r}")
    if arity is not None and args[0] >= args[1]:
        raise ValueError(f"{key}: {kind} needs low < high, got {args!r}")
    if kind.endswith("loguniform") and args[0] <= 0:
        raise ValueError(f"{key}: {kind} needs low > 0, got {args!r}")


def _to_tune(domain: dict[str, Any]) -> Any:
    from ray import tune

    kind, args = next(iter(domain.items()))
    if kind == "grid":
        return tune.grid_search(list(args))
    return getattr(tune, kind)(*args) if kind != "choice" else tune.choice(list(args))


def _representatives(domain: dict[str, Any]) -> list[Any]:
    """Values that exercise a domain's edges, to validate the key before any trial starts."""
    kind, args = next(iter(domain.items()))
    if kind in ("choice", "grid"):
        return list(args)
    if kind in ("randint", "qrandint"):
        return [int(args[0]), int(args[1]) - 1]
    return [args[0], args[1]]


def find_space(ref: str) -> Path:
    """A space file: a path, or a name in ``./tune_spaces`` (of the working directory) or a shipped space."""
    path = Path(ref)
    if path.is_file():
        return path
    for directory in (Path("tune_spaces"), SPACE_DIR):
        candidate = directory / (ref if ref.endswith((".yaml", ".yml")) else f"{ref}.yaml")
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in SPACE_DIR.glob("*.yaml"))
    raise ConfigError(f"--space: no such file or space {ref!r}; shipped spaces: {', '.join(names)}")


def load_space(ref: str, overrides: list[str] | None = None) -> tuple[SweepSpace, dict[str, Any]]:
    """The validated space and the base run config (as a dict) every trial starts from.

    An override whose first part is a space key (``num_samples=8``, ``scheduler.grace_period=2``, or one
    searched key's domain: ``search.augkd.a={grid: [0.2, 1.0]}``) changes the space; any other
    (``max_steps=200``, ``mosaickd.kd_steps=2``) is a fixed override of every trial.
    """
    path = find_space(ref)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--space {path}: the YAML must be a mapping of keys")
    data.setdefault("name", path.stem)
    data["overrides"] = dict(data.get("overrides") or {})
    for text in overrides or []:
        key_path, value = parse_override(text)
        if key_path[0] == "search" and len(key_path) > 1:  # search.augkd.a={grid: [0.2, 1.0]}
            data.setdefault("search", {})[".".join(key_path[1:])] = value
        elif key_path[0] in SweepSpace.model_fields and key_path[0] != "overrides":
            set_dotted(data, key_path, value)
        else:
            data["overrides"][".".join(key_path)] = value
    space = build_section(SweepSpace, data)
    base_ref = space.base
    if base_ref.endswith((".yaml", ".yml")) and not Path(base_ref).is_absolute():
        beside = path.parent / base_ref
        base_ref = str(beside) if beside.is_file() else base_ref
    base = load_preset(base_ref)
    base.pop("run_name", None)
    for key, value in space.overrides.items():
        set_dotted(base, key.split("."), value)
    for key, config_key in (
        ("num_workers", "num_workers"),
        ("cpus_per_worker", "resources.cpus_per_worker"),
        ("gpus_per_worker", "resources.gpus_per_worker"),
    ):
        value = getattr(space.trial, key)
        if value is not None:
            set_dotted(base, config_key.split("."), value)
    if space.trial.gpus_per_worker:
        base["use_gpu"] = True
    topk = build_config(base).eval.topk
    wanted = re.fullmatch(r"val/top(\d+)", space.metric)
    if wanted and int(wanted.group(1)) not in topk:
        raise ConfigError(
            f"metric: {space.metric} is not reported; eval.topk is {list(topk)} (add overrides: {{eval.topk: "
            f"{sorted({*topk, int(wanted.group(1))})}}})"
        )
    _edge_trials(space, base)  # every searched value makes a valid config, before any trial starts
    return space, base


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> dict[str, Any]:
    """The run config (as a dict) of one trial: the base with the sampled values set."""
    data = copy.deepcopy(base)
    for key, value in sampled.items():
        set_dotted(data, key.split("."), value)
    return data


@dataclass
class SweepPaths:
    """Where a sweep lives (any storage) and the MLflow store its runs log to."""

    root: str
    tracking_uri: str

    @property
    def tune_experiment(self) -> str:
        return f"{self.root}/tune"

    @property
    def trials(self) -> str:
        return f"{self.root}/trials"


def _trainable(config: dict[str, Any], *, base: dict[str, Any], sweep: dict[str, str]) -> None:
    """One trial (a Tune function trainable): a full rayoodkd run whose reports go to Tune."""
    from ray import tune

    from rayoodkd.launch import launch

    trial_id = tune.get_context().get_trial_id()
    data = trial_config(base, config["search"])
    data.update(
        run_name=f"{sweep['name']}-{trial_id}",
        storage_path=sweep["trials"],
        tracking_uri=sweep["tracking_uri"],
        summary_json=None,
    )
    sampled = ", ".join(f"{k}={v}" for k, v in config["search"].items())
    launch(
        build_config(data),
        report_to_tune=True,
        mlflow_tags={
            "mlflow.parentRunId": sweep["parent_run_id"],
            "sweep": sweep["name"],
            "trial_id": trial_id,
            "sampled": sampled,
            **({"init_from": data["init_from"]["checkpoint"]} if data.get("init_from") else {}),
        },
        console_label=f"trial {trial_id}",
    )


def _trial_lines(space: SweepSpace, base: dict[str, Any], log: Any) -> Any:
    """A Tune callback: a line per finished, early-stopped or failed trial (Tune's own tables are off; each
    trial's progress lines come from its workers)."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            result = trial.last_result or {}
            step, budget = result.get("step"), trial_config(base, trial.config["search"])["max_steps"]
            how = "finished" if step is None or step >= budget else f"stopped early at step {step}"
            value = result.get(space.metric, math.nan)
            log(f"trial {trial.trial_id} {how}: {space.metric} {value:.4g} ({_sampled(trial)})")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log(f"trial {trial.trial_id} failed ({_sampled(trial)}); its MLflow run has the reason")

    return TrialLines()


def _sampled(trial: Any) -> str:
    return ", ".join(f"{key}={value}" for key, value in trial.config["search"].items())


@dataclass
class TrialRow:
    """One line of ``results.csv``."""

    trial_id: str
    sampled: dict[str, Any]
    metric: float
    best_val: float
    extra: dict[str, float]
    steps: int
    max_steps: int
    stopped_early: bool
    status: str
    checkpoint: str
    mlflow_run_id: str


@dataclass
class SweepResult:
    """What a finished sweep reports."""

    space: SweepSpace
    rows: list[TrialRow]
    best: TrialRow | None
    best_config: dict[str, Any] | None
    parent_run_id: str
    tracking_uri: str
    interruption: Interruption = field(default_factory=Interruption)

    def table(self) -> str:
        keys = list(self.space.search)
        extra = self.space.report_metrics
        best_val = _best_val_column(self.space)
        header = [
            "trial",
            *keys,
            self.space.metric,
            *best_val,
            *extra,
            "steps",
            "stopped by ASHA",
            "status",
        ]
        lines = [
            [
                row.trial_id,
                *(_fmt(row.sampled.get(k)) for k in keys),
                _fmt(row.metric),
                *(_fmt(row.best_val) for _ in best_val),
                *(_fmt(row.extra.get(k, math.nan)) for k in extra),
                f"{row.steps}/{row.max_steps}",
                "yes" if row.stopped_early else "no",
                row.status,
            ]
            for row in self.rows
        ]
        widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=False)]
        render = [
            "  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *lines]
        ]
        spent = sum(row.steps for row in self.rows)
        full = sum(row.max_steps for row in self.rows)
        render.append("-" * len(render[0]))
        render.append(
            f"training steps run: {spent} of {full}"
            if self.interruption.reason is not None
            else f"training steps run: {spent} of {full} without early stopping "
            f"({100 * (1 - spent / max(full, 1)):.0f}% saved)"
        )
        if self.best is not None:
            render.append(
                f"best: trial {self.best.trial_id} ({_fmt_sampled(self.best.sampled)}) "
                f"{self.space.metric} {_fmt(self.best.metric)}; checkpoint {self.best.checkpoint}"
            )
        render.append(f"MLflow: {self.tracking_uri}  parent run {self.parent_run_id}")
        if self.interruption.reason is not None:
            render.append(
                f"{self.interruption.reason}: {_count(len(self.interruption.cut_short), 'trial')} cut short; "
                "run the same command with --resume to continue the sweep"
            )
        return "\n".join(render)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _fmt_sampled(sampled: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in sampled.items())


def _paths(space: SweepSpace, cfg: BaseRunConfig) -> SweepPaths:
    from rayoodkd.engine.tracking import default_tracking_uri

    storage = ray_storage_path(cfg.storage_path).rstrip("/")
    return SweepPaths(f"{storage}/{space.name}", cfg.tracking_uri or default_tracking_uri(cfg.storage_path))


def _cpus_per_trial(configs: list[BaseRunConfig], driver_cpus: float) -> float:
    """CPUs one trial holds, sized for the largest config: its driver's and its workers' (a run with
    ``num_workers=0`` trains in its trial: it counts as one worker)."""
    return max(driver_cpus + max(c.num_workers, 1) * c.resources.cpus_per_worker for c in configs)


def _fit(configs: list[BaseRunConfig], driver_cpus: float) -> tuple[int, str]:
    """(runs of these configs that fit on the cluster at once, what limits them, in words)."""
    import ray

    resources = ray.cluster_resources()
    cpus, per_trial = resources.get("CPU", 1), _cpus_per_trial(configs, driver_cpus)
    fits = int((cpus - 0.5) // per_trial)
    workers = per_trial - driver_cpus
    limit = (
        f"this Ray cluster's {cpus:g} CPU, less 0.5 kept for Ray Data, fit {max(fits, 1)} trial at once at "
        f"{per_trial:g} CPU each ({driver_cpus:g} for the trial's driver, {workers:g} for its workers)"
    )
    on_gpus = [c for c in configs if c.use_gpu]
    if on_gpus:
        gpus = resources.get("GPU", 0)
        per_trial_gpus = max(max(c.num_workers, 1) * c.resources.gpus_per_worker for c in on_gpus)
        if gpus // per_trial_gpus < fits:
            fits = int(gpus // per_trial_gpus)
            limit = (
                f"this Ray cluster's {gpus:g} GPU fit {max(fits, 1)} trial at once at {per_trial_gpus:g} GPU "
                "each (its workers')"
            )
    return max(fits, 1), limit


def trials_that_fit(configs: list[BaseRunConfig], driver_cpus: float) -> int:
    """Runs of these configs (one Tune trial each) that fit on the cluster at once, sized for the largest,
    leaving half a CPU for Ray Data's read tasks (spec/ray.md P5, P7)."""
    return _fit(configs, driver_cpus)[0]


def concurrent_trials(
    requested: int | None,
    configs: list[BaseRunConfig],
    driver_cpus: float,
    requested_as: str,
    to_run_more: str,
    log: Any,
) -> int:
    """Trials to run at once: ``requested`` (``None``: what the cluster fits), lowered to what a cluster
    without an autoscaler fits, saying so. Tune would start more trial drivers than there are CPUs left for
    their workers, whose placement groups would then wait for ever (docs/sweeps.md, Resources).
    ``requested_as`` names the setting in that line, ``to_run_more`` says what would fit more."""
    from rayoodkd.preflight import autoscaler_present

    fits, limit = _fit(configs, driver_cpus)
    if requested is None:
        return fits
    if requested <= fits or autoscaler_present():
        return requested
    log(f"{requested_as}: {limit}; running {fits} at once ({to_run_more})")
    return fits


def _edge_trials(space: SweepSpace, base: dict[str, Any]) -> list[BaseRunConfig]:
    """The base with each edge value of each searched key, built (a bad value names its key): checked before
    any trial starts, and what a trial can be when sizing them (a search over ``num_workers`` or the
    resources makes some trials larger than the base)."""
    configs = []
    for key, domain in space.search.items():
        for value in _representatives(domain):
            trial = copy.deepcopy(base)
            set_dotted(trial, key.split("."), value)
            try:
                configs.append(build_config(trial))
            except ConfigError as error:
                raise ConfigError(f"search.{key} = {value!r}: {error}") from None
    return configs


def _scheduler(space: SweepSpace, cfg: BaseRunConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler.type == "fifo":
        return FIFOScheduler()
    max_t = space.scheduler.max_t or (
        cfg.max_steps if space.scheduler.time_attr == "step" else math.ceil(cfg.max_steps / cfg.eval.every)
    )
    # stop_last_trials=False: a trial that reaches max_t finishes its run (summary, MLflow) instead of
    # being killed by the scheduler at its final report.
    return ASHAScheduler(
        time_attr=space.scheduler.time_attr,
        max_t=max_t,
        grace_period=space.scheduler.grace_period,
        reduction_factor=space.scheduler.reduction_factor,
        brackets=space.scheduler.brackets,
        stop_last_trials=False,
    )


def _parent_run(
    space: SweepSpace, base: dict[str, Any], cfg: BaseRunConfig, paths: SweepPaths, record: dict | None
) -> Tracker:
    """The sweep's parent MLflow run: the one its ``record`` names (a resumed sweep), else a new one, with the
    space and base config as params, recorded in the sweep's file."""
    from rayoodkd.engine.tracking import Tracker

    if record is not None:
        return Tracker(record["tracking_uri"], record["parent_run_id"])
    tracker = Tracker.create(
        paths.tracking_uri,
        cfg.storage_path,
        cfg.experiment_name,
        f"sweep-{space.name}",
        {"sweep": space.name, "rayoodkd.kind": "sweep"},
    )
    tracker.log_params(
        {
            **{f"space.{k}": v for k, v in flatten(space.model_dump(mode="json")).items()},
            **{f"base.{k}": v for k, v in flatten(base).items()},
        }
    )
    write_json(
        f"{paths.root}/{SWEEP_FILE}",
        {
            "space": space.model_dump(mode="json"),
            "base": base,
            "parent_run_id": tracker.run_id,
            "tracking_uri": paths.tracking_uri,
        },
    )
    return tracker


def run_sweep(
    space: SweepSpace,
    base: dict[str, Any],
    *,
    output: Path | None = None,
    resume: bool = False,
    log: Any = print,
) -> SweepResult:
    """Run (or resume) a sweep to the end; write ``results.csv`` and ``best.yaml``; return the table."""
    from ray import tune

    from rayoodkd.console import TuneLog, quiet_python_loggers
    from rayoodkd.preflight import check_output_dir
    from rayoodkd.raystart import start_or_join_ray
    from rayoodkd.teacher import ensure_teacher

    cfg = build_config(base)
    if not cfg.ray_logs:
        quiet_python_loggers()  # before the sweep's MLflow store is opened (a new one logs its migrations)
    paths = _paths(space, cfg)
    record = read_json(f"{paths.root}/{SWEEP_FILE}")
    if resume and record is None:
        raise ConfigError(f"--resume: no sweep {space.name!r} at {paths.root}; start it without --resume")
    if not resume and record is not None:
        raise ConfigError(
            f"name: a sweep {space.name!r} already exists at {paths.root}; "
            "pass --resume to continue it, or name=OTHER for a new one"
        )
    output = output or _default_output(paths)
    check_output_dir("--output", output)
    if resume:
        space, base = SweepSpace.model_validate(record["space"]), record["base"]
        cfg = build_config(base)
        paths = SweepPaths(paths.root, record["tracking_uri"])
    with parent_killed_if_stopped_at_once(lambda: _parent_run(space, base, cfg, paths, record)) as tracker:
        # Before the teacher, whose recipe reads its corpora through Ray Data (which would start Ray its way).
        start_or_join_ray(cfg.ray_dashboard, trials=True, ray_logs=cfg.ray_logs)
        if not any(key.startswith("teacher.") for key in space.search):
            ensure_teacher(cfg.teacher, cfg.data.cache_dir, log)  # once here, not in every concurrent trial
        sweep = {
            "name": space.name,
            "trials": paths.trials,
            "tracking_uri": paths.tracking_uri,
            "parent_run_id": tracker.run_id,
        }
        if space.start_stage is not None:
            base = _share_earlier_stages(space, base, paths, tracker.run_id, log)
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, base=base, sweep=sweep), {"CPU": space.trial.driver_cpus}
        )
        log(f"sweep {space.name}: {'resuming' if resume else 'starting'}; MLflow parent run {tracker.run_id}")
        started = time.perf_counter()
        if resume:
            tuner = tune.Tuner.restore(
                paths.tune_experiment, trainable=trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"search": {key: _to_tune(domain) for key, domain in space.search.items()}},
                tune_config=tune.TuneConfig(
                    metric=space.metric,
                    mode=space.mode,
                    num_samples=space.num_samples,
                    scheduler=_scheduler(space, cfg),
                    max_concurrent_trials=concurrent_trials(
                        space.max_concurrent_trials,
                        [cfg, *_edge_trials(space, base)],
                        space.trial.driver_cpus,
                        f"max_concurrent_trials={space.max_concurrent_trials}",
                        "lower trial.cpus_per_worker or trial.driver_cpus, or add nodes",
                        log,
                    ),
                ),
                run_config=tune.RunConfig(
                    name="tune",
                    storage_path=paths.root,
                    failure_config=tune.FailureConfig(max_failures=space.max_failures),
                    verbose=0,
                    callbacks=[_trial_lines(space, base, TuneLog(log)), running_trials()],
                ),
            )
        if resume:
            tracker.reopen()
        grid, stop = fit_tuner(tuner)
        rows = _rows(grid, space, base, paths, stop)
        finished = [row for row in rows if not math.isnan(row.metric)]
        best = None
        if finished:
            pick = max if space.mode == "max" else min
            best = pick(finished, key=lambda row: row.metric)
        best_config = trial_config(base, best.sampled) if best else None
        result = SweepResult(space, rows, best, best_config, tracker.run_id, paths.tracking_uri, stop)
        _write_outputs(result, output, tracker, time.perf_counter() - started, log)
        return result


def fit_tuner(tuner: Tuner) -> tuple[ResultGrid, Interruption]:
    """``tuner.fit()`` with Tune's console off and Ctrl-C or SIGTERM stopping it gracefully."""
    from rayoodkd.console import silent_tune

    with silent_tune(), stop_gracefully_on_signals() as stop:
        return tuner.fit(), stop


def _share_earlier_stages(
    space: SweepSpace, base: dict[str, Any], paths: SweepPaths, parent_run_id: str, log: Any
) -> dict[str, Any]:
    """Run the stages before ``space.start_stage`` once (a finished shared run is only re-reported on
    ``--resume``) and return the base every trial starts from: ``init_from`` the end of that run."""
    from rayoodkd.launch import launch
    from rayoodkd.preflight import method_stages
    from rayoodkd.teacher import ensure_teacher

    cfg = build_config(base)
    names = [stage.name for stage in method_stages(cfg, ensure_teacher(cfg.teacher, cfg.data.cache_dir, log))]
    if space.start_stage not in names[1:]:
        raise ConfigError(
            f"start_stage: {space.start_stage!r} is not a later stage of {cfg.method!r}; "
            f"allowed: {', '.join(names[1:]) or 'none (one stage)'}"
        )
    shared_stages = names[: names.index(space.start_stage)]
    shared = copy.deepcopy(base)
    shared.update(
        run_name=f"{space.name}-shared",
        storage_path=f"{paths.root}/shared",
        tracking_uri=paths.tracking_uri,
        summary_json=None,
        stop_after=shared_stages[-1],
    )
    log(f"sweep {space.name}: stages {', '.join(shared_stages)} run once, shared by every trial")
    launch(
        build_config(shared),
        mlflow_tags={"mlflow.parentRunId": parent_run_id, "sweep": space.name, "trial_id": "shared"},
    )
    # The run's directory, not one checkpoint: a --resume relaunch re-takes the last checkpoint (and rotates
    # older ones), and every trial takes the newest one that ends the shared stages.
    run_dir = f"{shared['storage_path']}/{shared['run_name']}"
    return {**base, "init_from": {"checkpoint": run_dir, "stage": space.start_stage}}


def _trial_id(result: Any) -> str:
    """The trial ID from the last result, or from the trial directory (``_trainable_<id>_<n>_...``)."""
    if result.metrics and result.metrics.get("trial_id"):
        return str(result.metrics["trial_id"])
    match = re.match(r"_trainable_([0-9a-f]+_\d+)_", Path(result.path).name)
    return match.group(1) if match else Path(result.path).name


def _rows(
    grid: Any, space: SweepSpace, base: dict[str, Any], paths: SweepPaths, stop: Interruption
) -> list[TrialRow]:
    """One row per trial; the MLflow child runs of trials Tune ended are closed with their outcome."""
    from rayoodkd.engine.tracking import THROUGHPUT_KEY, Tracker
    from rayoodkd.launch import RUN_FILE

    rows = []
    cut_short_runs = []
    for result in sorted(grid, key=lambda r: r.path):
        metrics = result.metrics or {}
        sampled = dict(result.config["search"])
        trial_id = _trial_id(result)
        # A multi-stage run's length is its stages' (or, with init_from, the later stages'): ASHA's max_t.
        max_steps = space.scheduler.max_t or build_config(trial_config(base, sampled)).max_steps
        steps = int(metrics.get("step", 0))
        run_record = read_json(f"{paths.trials}/{space.name}-{trial_id}/{RUN_FILE}") or {}
        run_id = run_record.get("mlflow_run_id", "")
        cut_short = trial_id in stop.cut_short
        # A trial an interruption kept from starting: its run is for the resumed sweep.
        pending = stop.reason is not None and not cut_short and result.error is None and "step" not in metrics
        # Only a run's last report has test/top1.
        stopped = result.error is None and "test/top1" not in metrics and not cut_short and not pending
        status = "ERROR" if result.error is not None else "TERMINATED"
        if cut_short or pending:
            status = "INTERRUPTED" if cut_short else "PENDING"
        if run_id:
            child = Tracker(paths.tracking_uri, run_id)
            if cut_short:
                # A run in the trial's driver reports to Tune only at its end; its MLflow run says how far.
                steps = max(steps, child.last_logged_step(THROUGHPUT_KEY))
                cut_short_runs.append((child, f"{stop.reason} at step {steps}"))
            elif stopped:
                child.set_tags({"asha.stopped_at_step": str(steps)})
                child.terminate("KILLED")
            elif child.client.get_run(run_id).info.status == "RUNNING":
                # Tune ended the trial at its last report, before the run closed its MLflow run itself.
                child.terminate("FAILED" if result.error is not None else "FINISHED")
        rows.append(
            TrialRow(
                trial_id=trial_id,
                sampled=sampled,
                metric=float(metrics.get(space.metric, math.nan)),
                best_val=float(metrics.get("best_val/top1", math.nan)),
                extra={k: float(metrics[k]) for k in space.report_metrics if k in metrics},
                steps=steps,
                max_steps=max_steps,
                stopped_early=stopped,
                status=status,
                checkpoint=str(metrics.get("checkpoint_path", "")),
                mlflow_run_id=run_id,
            )
        )
    close_cut_short(cut_short_runs)
    return rows


def _default_output(paths: SweepPaths) -> Path:
    """The sweep's own directory when it is local; for remote storage, ``./NAME``."""
    return Path(Path(paths.root).name) if is_remote(paths.root) else local_path(paths.root)


def _best_val_column(space: SweepSpace) -> list[str]:
    """The best-val column of the results, unless it is the sweep's metric column already."""
    return [] if space.metric == "best_val/top1" else ["best_val/top1"]


def results_csv(result: SweepResult) -> str:
    """The results table as CSV: one row per trial."""
    keys, extra = list(result.space.search), result.space.report_metrics
    best_val = _best_val_column(result.space)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "trial_id",
            *keys,
            result.space.metric,
            *best_val,
            *extra,
            "steps",
            "max_steps",
            "stopped_early",
            "status",
            "checkpoint",
            "mlflow_run_id",
        ]
    )
    for row in result.rows:
        writer.writerow(
            [
                row.trial_id,
                *(row.sampled.get(k) for k in keys),
                row.metric,
                *(row.best_val for _ in best_val),
                *(row.extra.get(k, "") for k in extra),
                row.steps,
                row.max_steps,
                row.stopped_early,
                row.status,
                row.checkpoint,
                row.mlflow_run_id,
            ]
        )
    return buffer.getvalue()


def best_yaml(result: SweepResult) -> str:
    """The best trial's config as a preset for ``python -m rayoodkd.train --config``."""
    assert result.best is not None and result.best_config is not None
    config = build_config(result.best_config)
    header = (
        f"# Best trial of sweep {result.space.name!r}: {result.best.trial_id} "
        f"({result.space.metric} {_fmt(result.best.metric)} at step {result.best.steps}).\n"
        f"# Searched: {_fmt_sampled(result.best.sampled)}\n"
        f"# Checkpoint: {result.best.checkpoint}\n"
        f"# Run it: python -m rayoodkd.train --config best.yaml [seed=S ...]\n"
    )
    return header + to_yaml(config)


def _write_outputs(result: SweepResult, output: Path, tracker: Any, seconds: float, log: Any) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.csv").write_text(results_csv(result))
    tracker.log_text(results_csv(result), "results.csv")
    tracker.log_text(result.table(), "results.txt")
    summary: dict[str, float] = {
        "sweep/trials": len(result.rows),
        "sweep/stopped_early": sum(row.stopped_early for row in result.rows),
        "sweep/errors": sum(row.status == "ERROR" for row in result.rows),
        "sweep/steps_run": sum(row.steps for row in result.rows),
        "sweep/wall_seconds": seconds,
    }
    if result.best is not None:
        text = best_yaml(result)
        (output / "best.yaml").write_text(text)
        tracker.log_text(text, "best.yaml")
        summary[f"best/{result.space.metric}"] = result.best.metric
        tracker.set_tags({"best_trial": result.best.trial_id, "best_checkpoint": result.best.checkpoint})
    tracker.log_metrics(summary, 0)
    if result.interruption.reason is not None:
        tracker.end("KILLED", result.interruption.reason)
    else:
        tracker.terminate("FINISHED" if result.best is not None else "FAILED")
    log(result.table())
    best = f"; best config: {output / 'best.yaml'}" if result.best else ""
    log(f"results: {output / 'results.csv'}{best}")


def _parser() -> argparse.ArgumentParser:
    shipped = ", ".join(sorted(p.stem for p in SPACE_DIR.glob("*.yaml")))
    parser = argparse.ArgumentParser(
        prog=prog("tune"),
        description="Search a rayoodkd run's hyperparameters with Ray Tune + ASHA; each trial is a full run "
        "on its own TorchTrainer, logged as an MLflow child run of the sweep's run.",
        epilog=f"""\
space file keys: name, base, overrides, search, metric, mode, scheduler.{{type, time_attr, max_t,
  grace_period, reduction_factor, brackets}}, num_samples, trial.{{num_workers, cpus_per_worker,
  gpus_per_worker, driver_cpus}}, max_concurrent_trials, max_failures, start_stage, report_metrics
search kinds: {", ".join(DOMAIN_ARITY)}   e.g.  mosaickd.patch_size: {{grid: [2, 4, 8]}}
shipped spaces: {shipped}

examples:
  python -m rayoodkd.tune --space smoke
  python -m rayoodkd.tune --space my-patch.yaml num_samples=2 --output sweeps/patch
  python -m rayoodkd.tune --space mosaickd-patch --resume          # continue an interrupted sweep
  python -m rayoodkd.tune --space augkd-mixup start_stage=null     # every trial runs every stage
  python -m rayoodkd.train --config sweeps/patch/best.yaml         # run the winner
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="a space key (num_samples=8, scheduler.grace_period=2, search.KEY={grid: [...]}) or a fixed "
        "run-config override "
        "for every trial (max_steps=200)",
    )
    parser.add_argument("--space", required=True, help="a tune space YAML, or the name of a shipped one")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="results.csv and best.yaml (default: the sweep's directory under storage_path)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name")
    parser.add_argument("--print-space", action="store_true", help="print the resolved space and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rayoodkd.teacher_io import TeacherFileError  # imports torch: not needed for --help

    try:
        space, base = load_space(args.space, args.overrides)
        if args.print_space:
            resolved = {"space": space.model_dump(mode="json"), "base": base}
            print(yaml.safe_dump(resolved, sort_keys=False), end="")
            return 0
        result = run_sweep(space, base, output=args.output, resume=args.resume)
    except (ConfigError, FileNotFoundError, TeacherFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupted:
        hint = "run the same command with --resume to continue the sweep"
        line, exit_code = stopped_line(interrupted, "sweep", hint)
        print(line, file=sys.stderr)
        return exit_code
    if result.interruption.reason is not None:
        return result.interruption.exit_code
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
