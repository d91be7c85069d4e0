"""Ray Tune sweeps: space validation (one process) and one real ASHA sweep on a local Ray instance."""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import signal_once_ready
from mlflow.tracking import MlflowClient

from rayoodkd.config import ConfigError, resolve_config
from rayoodkd.errors import RunInterrupted
from rayoodkd.interruption import (
    Interruption,
    parent_killed_if_stopped_at_once,
    running_trials,
    stop_gracefully_on_signals,
    stopped_line,
)
from rayoodkd.tune import (
    SPACE_DIR,
    SweepPaths,
    SweepResult,
    TrialRow,
    _rows,
    _trial_id,
    best_yaml,
    concurrent_trials,
    load_space,
    main,
    results_csv,
    run_sweep,
    trial_config,
)


def _write_space(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", sorted(p.stem for p in SPACE_DIR.glob("*.yaml")))
def test_every_shipped_space_validates(name: str) -> None:
    space, base = load_space(name)
    assert space.name == name and space.metric in {"val/top1", "best_val/top1"}
    assert base["method"] in {"kd_ood", "mosaickd", "tadfkd", "augkd", "kd3"}


def test_overrides_go_to_the_space_or_to_every_trial() -> None:
    space, base = load_space("smoke", ["num_samples=3", "scheduler.grace_period=2", "max_steps=30"])
    assert space.num_samples == 3 and space.scheduler.grace_period == 2
    assert base["max_steps"] == 30 and space.overrides["max_steps"] == 30
    assert base["num_workers"] == 1 and base["resources"]["cpus_per_worker"] == 0.5
    space, _ = load_space("augkd-mixup", ["search.augkd.a={grid: [0.2, 1.0]}", "start_stage=null"])
    assert space.search["augkd.a"] == {"grid": [0.2, 1.0]} and space.start_stage is None
    assert space.search["augkd.b"]["grid"][0] == 0.2  # the other searched keys keep their domains


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("search: {kd_ood.lrr: {grid: [0.1]}}", "search.kd_ood.lrr = 0.1: unknown key 'kd_ood.lrr'"),
        (
            "search: {kd_ood.optim.student.lr: {grid: [-1]}}",
            "search.kd_ood.optim.student.lr = -1: invalid value for 'kd_ood.optim.student.lr'",
        ),
        (
            "search: {kd_ood.optim.student.lr: {uniform: [1]}}",
            "kd_ood.optim.student.lr: uniform takes a list of 2 numbers",
        ),
        (
            "search: {kd_ood.optim.student.lr: {loguniform: [0, 1]}}",
            "kd_ood.optim.student.lr: loguniform needs low > 0",
        ),
        ("search: {kd_ood.optim.student.lr: {normal: [0, 1]}}", "expected one of {choice, grid"),
        ("search: {}", "invalid value for 'search': needs at least one KEY"),
        ("search: {seed: {grid: [1]}}\nmetric: accuracy", "invalid value for 'metric'"),
        ("search: {seed: {grid: [1]}}\nscheduler: {type: hyperband}", "invalid value for 'scheduler.type'"),
        ("search: {seed: {grid: [1]}}\noverrides: {seed: 2}", "both fixed in overrides and searched: seed"),
        ("search: {seed: {grid: [1]}}\nbogus: 1", "unknown key 'bogus'"),
        ("search: {seed: {grid: [1]}}\nbase: nope", "unknown preset 'nope'"),
        ("search: {seed: {grid: [1]}}\nmetric: val/top3", "metric: val/top3 is not reported; eval.topk is"),
    ],
)
def test_bad_spaces_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_space(_write_space(tmp_path, text))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--space", "no-such-space"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --space: no such file or space 'no-such-space'; shipped spaces: ")
    assert err.count("\n") == 1
    (tmp_path / "a-file").write_text("")
    output = tmp_path / "a-file" / "results"  # refused before the sweep, not after it
    assert main(["--space", "smoke", "--output", str(output), f"storage_path={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output: cannot write to '{output}' (") and err.count("\n") == 1
    assert not (tmp_path / "runs" / "smoke").exists()


def test_trial_id_comes_from_the_result_or_the_trial_directory() -> None:
    class Result:
        def __init__(self, metrics: dict | None, path: str) -> None:
            self.metrics, self.path = metrics, path

    assert _trial_id(Result({"trial_id": "ab12c_00003"}, "/x/whatever")) == "ab12c_00003"
    errored = Result(None, "/s/tune/_trainable_cab19_00000_0_mosaickd_patch_size=32_2026-11-24_02-36-03")
    assert _trial_id(errored) == "cab19_00000"


def test_results_csv_and_best_yaml_round_trip(tmp_path: Path) -> None:
    space, base = load_space("smoke")
    rows = [
        TrialRow(
            "a_00000",
            {"kd_ood.optim.student.lr": 0.05},
            61.0,
            61.0,
            {"test/top1": 60.5},
            40,
            40,
            False,
            "TERMINATED",
            "/ck/a",
            "r1",
        ),
        TrialRow(
            "a_00001",
            {"kd_ood.optim.student.lr": 1e-5},
            9.5,
            9.5,
            {},
            10,
            40,
            True,
            "TERMINATED",
            "/ck/b",
            "r2",
        ),
    ]
    result = SweepResult(space, rows, rows[0], trial_config(base, rows[0].sampled), "p", "sqlite://")
    table = list(csv.DictReader(results_csv(result).splitlines()))
    assert [r["trial_id"] for r in table] == ["a_00000", "a_00001"]
    assert table[1]["stopped_early"] == "True" and table[1]["steps"] == "10"
    assert table[0]["kd_ood.optim.student.lr"] == "0.05" and table[0]["val/top1"] == "61.0"
    assert table[0]["test/top1"] == "60.5" and table[1]["test/top1"] == ""
    assert table[0]["best_val/top1"] == "61.0"
    on_best_val = SweepResult(
        space.model_copy(update={"metric": "best_val/top1"}),
        rows,
        rows[0],
        result.best_config,
        "p",
        "sqlite://",
    )
    header = results_csv(on_best_val).splitlines()[0].split(",")
    assert header.count("best_val/top1") == 1 and "val/top1" not in header
    assert on_best_val.table().splitlines()[0].split().count("best_val/top1") == 1
    cut = Interruption("interrupted (Ctrl-C)", 130, {"a_00001": {}})
    rows[1] = dataclasses.replace(rows[1], stopped_early=False, status="INTERRUPTED")
    interrupted = SweepResult(space, rows, rows[0], result.best_config, "p", "sqlite://", cut).table()
    assert "INTERRUPTED" in interrupted and "saved)" not in interrupted  # no ASHA saving claimed
    assert interrupted.splitlines()[-1] == (
        "interrupted (Ctrl-C): 1 trial cut short; run the same command with --resume to continue the sweep"
    )
    best = tmp_path / "best.yaml"
    best.write_text(best_yaml(result))
    cfg = resolve_config(str(best))
    assert cfg.kd_ood.optim.student.lr == 0.05 and cfg.max_steps == 40 and cfg.num_workers == 1
    assert "run_name" not in yaml.safe_load(best.read_text()) or cfg.run_name is None
    assert "38% saved" in result.table()


@pytest.mark.ray
def test_more_trials_at_once_than_a_fixed_cluster_fits_are_lowered_saying_why(
    ray_local, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each trial holds 0.5 CPU for its driver and 2 x 0.5 for its workers: one fits in 2 CPUs less 0.5.
    cfg = resolve_config("demo", [])
    lines: list[str] = []
    assert concurrent_trials(3, [cfg], 0.5, "max_concurrent_trials=3", "lower X", lines.append) == 1
    assert lines == [
        "max_concurrent_trials=3: this Ray cluster's 2 CPU, less 0.5 kept for Ray Data, fit 1 trial at once "
        "at 1.5 CPU each (0.5 for the trial's driver, 1 for its workers); running 1 at once (lower X)"
    ]
    lines.clear()
    assert concurrent_trials(None, [cfg], 0.5, "", "", lines.append) == 1
    small = resolve_config("demo", ["num_workers=1"])  # 0.25 + 0.5: two fit
    assert concurrent_trials(1, [small], 0.25, "", "", lines.append) == 1  # a smaller request stands
    assert concurrent_trials(2, [small], 0.25, "", "", lines.append) == 2
    assert concurrent_trials(2, [small, cfg], 0.25, "", "", lines.append) == 1  # sized for the largest
    assert lines and lines.pop().startswith(": this Ray cluster's 2 CPU")
    monkeypatch.setattr("rayoodkd.preflight.autoscaler_present", lambda: True)
    assert concurrent_trials(3, [cfg], 0.5, "", "", lines.append) == 3  # an autoscaler adds nodes for them
    assert lines == []


def _deliver(signum: int) -> None:
    """Send ``signum`` to this process and give Python the bytecode boundary at which its handler runs."""
    os.kill(os.getpid(), signum)
    time.sleep(0.05)


def test_ctrl_c_or_sigterm_during_a_fit_stops_it_the_way_tune_stops_and_is_remembered() -> None:
    from ray.tune.tune import _setup_signal_catching  # what Tune's run loop installs when it starts

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    running = running_trials()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a command's (Python's own)
    try:
        with stop_gracefully_on_signals() as stop:
            _setup_signal_catching()
        assert stop.reason is None  # a fit that ran to its end
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again

        with stop_gracefully_on_signals() as stop:
            tune_stopped = _setup_signal_catching()
            running.on_trial_start(0, [], SimpleNamespace(trial_id="a_00000", config={"cell": 0}))
            running.on_trial_start(0, [], SimpleNamespace(trial_id="a_00001", config={"cell": 1}))
            running.on_trial_complete(0, [], SimpleNamespace(trial_id="a_00000", config={"cell": 0}))
            _deliver(signal.SIGTERM)
            assert tune_stopped.is_set()  # Tune's own graceful stop
        assert (stop.reason, stop.exit_code) == ("terminated (SIGTERM)", 143)
        assert stop.cut_short == {"a_00001": {"cell": 1}}  # the trial still running when fit returned
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]

        with stop_gracefully_on_signals() as stop:
            tune_stopped = _setup_signal_catching()
            _deliver(signal.SIGINT)
            assert tune_stopped.is_set()
        assert (stop.reason, stop.exit_code) == ("interrupted (Ctrl-C)", 130)

        for signum, code in [(signal.SIGINT, 130), (signal.SIGTERM, 143)]:
            with pytest.raises(RunInterrupted) as at_once, stop_gracefully_on_signals():
                _deliver(signum)  # before Tune listens: nothing would stop the fit, so at once
            assert at_once.value.exit_code == code and str(at_once.value).endswith(": stopped at once")
            assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
        for second, code in [(signal.SIGINT, 130), (signal.SIGTERM, 143)]:
            with pytest.raises(RunInterrupted) as again, stop_gracefully_on_signals():
                _setup_signal_catching()
                _deliver(signal.SIGINT)
                _deliver(second)  # a second signal stops at once
            assert again.value.exit_code == code

        def not_plain(signum: int, frame: object) -> None:  # e.g. Ray Train's, holding its run's controller
            raise AssertionError("not called")

        signal.signal(signal.SIGINT, not_plain)
        with stop_gracefully_on_signals() as stop:
            _setup_signal_catching()
        assert stop.reason is None and signal.getsignal(signal.SIGINT) is not not_plain  # not put back
        signal.signal(signal.SIGINT, signal.default_int_handler)
        usr1 = signal.getsignal(signal.SIGUSR1)
        with stop_gracefully_on_signals() as stop:
            pass  # a fit whose loop ran elsewhere (Ray Client): Tune never listened here
        assert stop.reason is None
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGUSR1) is usr1
    finally:  # no handler of this test's fits stays installed in the suite's process
        for signum, handler in before.items():
            signal.signal(signum, handler)


@pytest.fixture
def signal_handlers() -> Iterator[None]:
    """SIGINT's and SIGTERM's handlers as a command's process starts with them (the suite's process may hold
    Ray Train's SIGINT handler and our SIGTERM one from earlier runs); put back as found after the test."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


class _Parent:
    ended: tuple[str, str] | None = None

    def end(self, status: str, reason: str) -> None:
        self.ended = (status, reason)


def test_a_sweep_stopped_at_once_outside_its_fit_closes_its_parent_killed(
    signal_handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rayoodkd import raystart

    parent = _Parent()
    with pytest.raises(RunInterrupted) as stop, parent_killed_if_stopped_at_once(lambda: parent):
        raise KeyboardInterrupt  # e.g. while the teacher trains
    assert (str(stop.value), stop.value.exit_code) == ("interrupted (Ctrl-C): stopped at once", 130)
    assert parent.ended == ("KILLED", "interrupted (Ctrl-C)")
    monkeypatch.setattr(raystart, "_sigterm_at", None)
    with pytest.raises(RunInterrupted) as stop, parent_killed_if_stopped_at_once(lambda: parent):
        raystart._terminate(signal.SIGTERM, None)  # the handler start_or_join_ray installs
    assert stop.value.exit_code == 143 and parent.ended == ("KILLED", "terminated (SIGTERM)")
    assert stopped_line(stop.value, "sweep", "resume it") == (
        "terminated (SIGTERM): stopped at once; resume it",
        143,
    )
    assert stopped_line(KeyboardInterrupt(), "sweep", "resume it") == (
        "interrupted (Ctrl-C) before the sweep started",
        130,
    )  # before the sweep was recorded: nothing to resume


@pytest.mark.parametrize(
    ("signum", "reason", "code"),
    [(signal.SIGINT, "interrupted (Ctrl-C)", 130), (signal.SIGTERM, "terminated (SIGTERM)", 143)],
)
def test_a_signal_while_the_parent_run_opens_waits_for_it_and_closes_it_killed(
    signal_handlers: None, monkeypatch: pytest.MonkeyPatch, signum: int, reason: str, code: int
) -> None:
    from rayoodkd import raystart

    monkeypatch.setattr(raystart, "_sigterm_at", None)
    parent = _Parent()
    opened = []

    def open_parent() -> _Parent:
        os.kill(os.getpid(), signum)  # e.g. while MLflow creates the run
        time.sleep(0.05)
        opened.append(True)
        return parent

    body_ran = []
    with pytest.raises(RunInterrupted) as stop, parent_killed_if_stopped_at_once(open_parent):
        body_ran.append(True)
    assert opened == [True] and body_ran == []
    assert stop.value.exit_code == code and parent.ended == ("KILLED", reason)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_signal_while_the_parent_run_opens_stops_at_once(signal_handlers: None) -> None:
    opened = []

    def open_parent() -> _Parent:  # a tracking server that does not answer
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        opened.append(True)
        return _Parent()

    with pytest.raises(KeyboardInterrupt), parent_killed_if_stopped_at_once(open_parent):
        pass
    assert opened == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_guard_puts_back_a_sigterm_handler_someone_else_installed(signal_handlers: None) -> None:
    def users_own(signum: int, frame: object) -> None:  # a notebook's, a framework's
        """Not called."""

    signal.signal(signal.SIGTERM, users_own)
    with parent_killed_if_stopped_at_once(_Parent):
        assert signal.getsignal(signal.SIGTERM) is users_own
    assert signal.getsignal(signal.SIGTERM) is users_own


def test_ray_inits_sigterm_exit_reads_as_sigterm(
    signal_handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rayoodkd import raystart

    monkeypatch.setattr(raystart, "_sigterm_at", None)
    parent = _Parent()
    with pytest.raises(RunInterrupted) as stop, parent_killed_if_stopped_at_once(lambda: parent):
        raise SystemExit(signal.SIGTERM)  # ray.init's handler, while it starts
    assert stop.value.exit_code == 143 and parent.ended == ("KILLED", "terminated (SIGTERM)")


def test_an_interrupted_sweep_lists_the_trials_it_kept_from_starting_as_pending(tmp_path: Path) -> None:
    space, base = load_space("smoke")

    def result(trial_id: str, metrics: dict) -> SimpleNamespace:
        config = {"search": {"kd_ood.optim.student.lr": 0.05}}
        return SimpleNamespace(
            metrics={"trial_id": trial_id, **metrics}, config=config, path=trial_id, error=None
        )

    grid = [
        result("a_00000", {"step": 20, "val/top1": 50.0}),
        result("a_00001", {}),
    ]  # stopped by ASHA; never ran
    paths = SweepPaths(str(tmp_path), f"sqlite:///{tmp_path / 'mlflow.db'}")
    cut = Interruption("interrupted (Ctrl-C)", 130, {})
    [asha, never_ran] = _rows(grid, space, base, paths, cut)
    assert (asha.status, asha.stopped_early) == ("TERMINATED", True)
    assert (never_ran.status, never_ran.stopped_early, never_ran.steps) == ("PENDING", False, 0)
    [finished_sweep_row] = _rows(grid[1:], space, base, paths, Interruption())
    assert finished_sweep_row.status == "TERMINATED"  # without an interruption no trial is pending


@pytest.mark.ray
def test_ctrl_c_during_a_sweep_ends_it_killed_with_the_trial_it_cut_short(tmp_path: Path) -> None:
    import sys

    runs = tmp_path / "runs"
    overrides = [f"storage_path={runs}", f"data.cache_dir={tmp_path / 'cache'}", "teacher.recipe.epochs=2"]
    argv = [sys.executable, "-m", "rayoodkd.tune", "--space", "smoke", *overrides, "max_steps=100000"]
    returncode, err, _ = signal_once_ready(
        argv, lambda: bool(list((runs / "smoke" / "trials").glob("*/step_*/manifest.json"))), signal.SIGINT
    )
    assert returncode == 130, err[-2000:]
    [row] = list(csv.DictReader((runs / "smoke" / "results.csv").read_text().splitlines()))
    assert row["status"] == "INTERRUPTED" and row["stopped_early"] == "False"  # not ASHA's doing
    assert int(row["steps"]) > 0  # it had checkpointed, though its run reports to Tune only at its end
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    by_name = {
        r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
    }
    parent, child = by_name.pop("sweep-smoke"), by_name.popitem()[1]
    assert parent.info.status == "KILLED" and parent.data.tags["rayoodkd.failure"] == "interrupted (Ctrl-C)"
    assert child.info.status == "KILLED" and not by_name
    assert child.data.tags["rayoodkd.failure"] == f"interrupted (Ctrl-C) at step {row['steps']}"


@pytest.mark.ray
def test_asha_sweep_stops_trials_and_nests_mlflow_runs(
    tmp_path: Path, ray_local, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = [
        f"storage_path={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "teacher.recipe.epochs=2",
    ]
    space, base = load_space("smoke", overrides)
    assert space.scheduler.grace_period == 1 and space.scheduler.reduction_factor == 2
    output = tmp_path / "out"
    result = run_sweep(space, base, output=output)

    assert len(result.rows) == 4
    assert all(row.status == "TERMINATED" for row in result.rows)
    stopped = [row for row in result.rows if row.stopped_early]
    assert stopped, result.table()
    assert all(row.steps < 40 for row in stopped)
    assert result.best is not None and not result.best.stopped_early
    assert result.best.sampled["kd_ood.optim.student.lr"] >= 0.02  # the no-learning rates never win
    console = capsys.readouterr().out
    for row in result.rows:  # a line per trial, not Tune's status tables
        how = f"stopped early at step {row.steps}" if row.stopped_early else "finished"
        assert f"trial {row.trial_id} {how}: val/top1 " in console
    assert "Trial status" not in console and "View detailed results" not in console

    table = list(csv.DictReader((output / "results.csv").read_text().splitlines()))
    assert len(table) == 4 and {r["stopped_early"] for r in table} == {"True", "False"}

    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial"] == result.best.trial_id
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.csv", "best.yaml"}
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    by_id = {run.info.run_id: run for run in children}
    for row in result.rows:
        child = by_id[row.mlflow_run_id]
        assert float(child.data.params["kd_ood.optim.student.lr"]) == pytest.approx(
            row.sampled["kd_ood.optim.student.lr"]
        )
        assert child.info.status == ("KILLED" if row.stopped_early else "FINISHED")
        assert client.get_metric_history(row.mlflow_run_id, "val/top1")

    again = run_sweep(space, base, output=tmp_path / "resumed", resume=True)
    assert [(r.trial_id, r.steps) for r in again.rows] == [(r.trial_id, r.steps) for r in result.rows]
    with pytest.raises(ConfigError, match="already exists"):
        run_sweep(space, base, output=output)

    from rayoodkd.train import main as train_main

    assert train_main(["--config", str(output / "best.yaml"), "max_steps=10", "run_name=from-best"]) == 0


@pytest.mark.ray
def test_trials_of_a_later_stage_start_from_one_shared_run_of_the_stages_before(
    tmp_path: Path, bn_teacher: Path, ray_local
) -> None:
    """augkd-mixup with tiny budgets: stages datafree and anchor run once; both trials start stage 3 from
    the end of that run (their MLflow params and tags say so) and run only stage 3's 2 epochs × 3 steps."""
    space_file = _write_space(
        tmp_path,
        """
name: mixup-tiny
base: mnist2uci-augkd
start_stage: mixup
overrides: {data.batch_size: 32, eval.every: 3, augkd.batch_size: 16, augkd.nz: 16, augkd.ngf: 8,
            augkd.encoder_width: 8, augkd.inner_steps: 1, augkd.validation_batches: 1,
            augkd.datafree_steps: 2, augkd.anchor_epochs: 1, augkd.mixup_epochs: 2, augkd.eval_epochs: 1}
search:
  augkd.a: {grid: [0.2, 1.0]}
scheduler: {type: fifo}
trial: {num_workers: 1, cpus_per_worker: 0.5, driver_cpus: 0.25}
max_concurrent_trials: 1
""",
    )
    overrides = [
        f"storage_path={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"teacher.checkpoint={bn_teacher}",
    ]
    space, base = load_space(space_file, overrides)
    result = run_sweep(space, base, output=tmp_path / "out")
    assert [row.steps for row in result.rows] == [6, 6]
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    shared = [run for run in children if run.data.tags["trial_id"] == "shared"]
    assert len(shared) == 1 and shared[0].data.params["stop_after"] == "anchor"
    assert shared[0].data.tags["step"] == "5"  # 2 data-free steps, 1 anchor epoch of 3 batches of 32
    trials = [run for run in children if run.data.tags["trial_id"] != "shared"]
    assert len(trials) == 2
    for trial in trials:
        assert trial.data.params["init_from.stage"] == "mixup"
        assert trial.data.tags["init_from"] == trial.data.params["init_from.checkpoint"]
        assert trial.data.params["init_from.checkpoint"].startswith(
            str(tmp_path / "runs" / "mixup-tiny" / "shared")
        )
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "mixup/loss/kd")] == list(
            range(3, 7, 3)
        )
