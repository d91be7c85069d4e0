"""``rayoodkd compare``: configs × seeds as concurrent trials, aggregated into mean ± std."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import signal_once_ready
from mlflow.tracking import MlflowClient
from PIL import Image

from rayoodkd.compare import (
    CellResult,
    Entry,
    _figures,
    aggregate_metrics,
    main,
    plan,
    plot_curves,
    run_compare,
    table_markdown,
)
from rayoodkd.config import ConfigError


def test_an_item_carries_its_own_overrides_and_a_bad_key_names_its_item() -> None:
    entry = Entry.parse("demo kd_ood.optim.student.lr=0.01")
    assert (entry.ref, entry.overrides, entry.label) == (
        "demo",
        ["kd_ood.optim.student.lr=0.01"],
        "demo kd_ood.optim.student.lr=0.01",
    )
    cells = plan([Entry.parse("demo"), entry], [0, 1], ["max_steps=10"], "cmp")
    assert [(c.label, c.seed, c.config["max_steps"]) for c in cells] == [
        ("demo", 0, 10),
        ("demo", 1, 10),
        ("demo kd_ood.optim.student.lr=0.01", 0, 10),
        ("demo kd_ood.optim.student.lr=0.01", 1, 10),
    ]
    assert cells[3].config["kd_ood"]["optim"]["student"]["lr"] == 0.01 and cells[3].config["seed"] == 1
    assert len({c.run_name for c in cells}) == 4
    with pytest.raises(ConfigError, match=r"--configs 'demo kd_ood.lrr=1'.*kd_ood.lrr"):
        plan([Entry.parse("demo kd_ood.lrr=1")], [0], [], "cmp")
    with pytest.raises(ConfigError, match="given twice"):
        plan([Entry.parse("demo"), Entry.parse("demo")], [0], [], "cmp")


def test_seed_in_an_override_is_each_cells_seed() -> None:
    entry = Entry.parse("demo init_from.checkpoint=/runs/prefix-s{seed} init_from.stage=train")
    cells = plan([entry], [0, 2], ["run_name=x-{seed}"], "cmp")
    assert [c.config["init_from"]["checkpoint"] for c in cells] == ["/runs/prefix-s0", "/runs/prefix-s2"]
    assert [c.config["run_name"] for c in cells] == ["x-0", "x-2"]


def test_the_cli_refuses_bad_input_in_one_line_before_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--configs", "no-such-preset", "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --configs 'no-such-preset'") and "\n" not in err
    # A seed given twice would make a mean ± std of one seed counted twice.
    assert main(["--configs", "demo", "--seeds", "0", "1", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --seeds: a seed is given twice (0 1 0); each seed runs once"
    (tmp_path / "a-file").write_text("")
    output = tmp_path / "a-file" / "report"  # refused before the runs, not after them
    argv = ["--configs", "demo", "--seeds", "0", "--output", str(output), f"storage_path={tmp_path / 'runs'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output: cannot write to '{output}' (") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def _cell(label: str, seed: int, top1: float, curve: list[tuple[int, float]]) -> CellResult:
    metrics = {
        "test/top1": top1 - 1,
        "best_val/top1": top1 + 1,
        "test/top1_at_best_val": top1,
        "summary/wall_seconds": 10.0 + seed,
        "throughput/images_per_second": 100.0,
    }
    return CellResult(label, seed, f"{label}-{seed}", "id", "FINISHED", metrics, curve)


def test_the_table_is_mean_and_sample_std_per_config_and_the_plot_has_bands(tmp_path: Path) -> None:
    results = [
        _cell("a", 0, 90.0, [(1, 50.0), (2, 80.0)]),
        _cell("a", 1, 92.0, [(1, 60.0), (2, 84.0)]),
        _cell("b", 0, 70.0, [(1, 40.0), (2, 70.0)]),
        CellResult("b", 1, "b-1", "", "NOT RUN"),
    ]
    table = table_markdown(results, "t")
    row_a = next(line for line in table.splitlines() if line.startswith("| a |"))
    assert row_a == "| a | 2/2 | 90.00 ± 1.41 | 92.00 ± 1.41 | 91.00 ± 1.41 | 10.50 | 100.00 |"
    row_b = next(line for line in table.splitlines() if line.startswith("| b |"))
    assert row_b.startswith("| b | 1/2 | 69.00 | 71.00 | 70.00 |")
    name = "mnist-dfq-vs-mnist-tadfkd-vs-mnist-dfad-vs-mnist-deepinv-seeds3-8b7e4ff6"  # a real one
    plot_curves(results, tmp_path / "curves.png", name)
    image = Image.open(tmp_path / "curves.png").convert("L")
    assert image.size == (900, 540)
    title_band = [image.getpixel((x, y)) for y in range(40) for x in (*range(3), *range(897, 900))]
    assert min(title_band) > 200  # the title is not cut off at the figure's edges


def test_an_interrupted_run_counts_in_no_mean() -> None:
    interrupted = CellResult("a", 2, "a-2", "id", "KILLED", {"val/top1": 10.0, "test/top1_at_best_val": 5.0})
    results = [_cell("a", 0, 90.0, []), _cell("a", 1, 92.0, []), interrupted]
    results.append(CellResult("b", 0, "b-0", "", "KILLED"))
    results.append(CellResult("b", 1, "b-1", "id", "RUNNING", {"val/top1": 10.0}))
    assert aggregate_metrics(results) == {"a/test_top1_at_best_val_mean": 91.0}
    assert "| a | 2/3 | 90.00 ± 1.41 | 92.00 ± 1.41 | 91.00 ± 1.41 |" in table_markdown(results, "t")


def test_more_metrics_are_columns_with_their_spread() -> None:
    results = [_cell("a", 0, 90.0, []), _cell("a", 1, 92.0, [])]
    results[0].metrics["select/precision"], results[1].metrics["select/precision"] = 0.25, 0.35
    table = table_markdown(results, "t", ["select/precision"])
    header = next(line for line in table.splitlines() if line.startswith("| config |"))
    assert header.endswith("| img/s | select/precision |")
    row = next(line for line in table.splitlines() if line.startswith("| a |"))
    assert row.endswith("| 10.50 | 100.00 | 0.30 ± 0.07 |")


def test_a_column_reads_a_metric_or_else_a_numeric_run_state_tag() -> None:
    figures = _figures(
        {"test/top1": 91.0},
        {"teacher/test_top1": "97.5", "train_seconds": "1.5e+06", "stage": "mixup"},
        ["test/top1", "teacher/test_top1", "train_seconds", "stage"],
    )
    assert figures == {"test/top1": 91.0, "teacher/test_top1": 97.5, "train_seconds": 1.5e6}


def _small_demo(tmp_path: Path, teacher: Path, *overrides: str) -> list[str]:
    """The demo on a small corpus with ``teacher``, stored under ``tmp_path``, plus ``overrides``."""
    return [
        f"teacher.checkpoint={teacher}",
        f"storage_path={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.ood.num_images=800",
        "data.batch_size=32",
        *overrides,
    ]


@pytest.mark.ray
def test_compare_runs_every_cell_as_a_child_run_and_writes_table_plot_and_csv(
    tmp_path: Path, tiny_teacher: Path, ray_local, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = _small_demo(tmp_path, tiny_teacher, "num_workers=0", "max_steps=4", "eval.every=2")
    entries = [Entry.parse("demo"), Entry.parse("demo kd_ood.optim.student.lr=0.001")]
    result = run_compare(entries, [0, 1], overrides, name="cmp", output=tmp_path / "out")
    assert [(r.label, r.seed, r.status) for r in result.results] == [
        ("demo", 0, "FINISHED"),
        ("demo", 1, "FINISHED"),
        ("demo kd_ood.optim.student.lr=0.001", 0, "FINISHED"),
        ("demo kd_ood.optim.student.lr=0.001", 1, "FINISHED"),
    ]
    assert all([step for step, _ in r.curve] == [2, 4] for r in result.results)
    console = capsys.readouterr().out
    assert "compare cmp: 4 runs" in console and "| demo | 2/2 |" in console
    assert "View detailed results" not in console and "Configuration for experiment" not in console  # Tune's
    assert console.count("done: demo") == 4 and "at best val nan" not in console  # reported to Tune
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").read_text().splitlines()))
    assert len(rows) == 4 and all(float(row["test/top1"]) >= 0 for row in rows)
    assert "| demo | 2/2 |" in (tmp_path / "out" / "compare.md").read_text()
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(result.parent_run_id)} >= {
        "compare.md",
        "curves.png",
        "results.csv",
    }
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted((c.data.tags["compare.config"], c.data.tags["seed"]) for c in children) == [
        ("demo", "0"),
        ("demo", "1"),
        ("demo kd_ood.optim.student.lr=0.001", "0"),
        ("demo kd_ood.optim.student.lr=0.001", "1"),
    ]
    # The same comparison again: every cell is finished, so nothing trains; the figures are the same.
    again = run_compare(entries, [0, 1], overrides, name="cmp", output=tmp_path / "again")
    assert again.parent_run_id == result.parent_run_id
    assert [r.metrics for r in again.results] == [r.metrics for r in result.results]


@pytest.mark.ray
def test_sigterm_during_a_comparison_closes_its_runs_killed_and_exits_143(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    import signal
    import sys

    # Ray Train's reports reach Tune (a run in the driver reports only at its end); long enough to cut short.
    overrides = _small_demo(tmp_path, tiny_teacher, "num_workers=1", "max_steps=100000", "eval.every=10")
    argv = [sys.executable, "-m", "rayoodkd.compare", "--configs", "demo", "--seeds", "0", "1"]
    argv += ["--max-concurrent", "1", "--name", "cut", "--output", str(tmp_path / "out"), *overrides]
    trials = tmp_path / "runs" / "cut" / "trials"
    returncode, err, _ = signal_once_ready(
        argv, lambda: bool(list(trials.glob("*/step_*/manifest.json"))), signal.SIGTERM
    )  # as `ray job stop` or a scheduler stops it (Ctrl-C: the sweep's test)
    assert returncode == 143, err[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 2 and all(
        run.info.status == "KILLED" for run in runs
    )  # the parent, the cell cut short
    assert {run.data.tags["rayoodkd.failure"] for run in runs} == {"terminated (SIGTERM)"}
    assert (tmp_path / "out" / "compare.md").exists()


def test_a_tune_callback_log_still_pickles_once_ray_has_patched_print(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import builtins
    import pickle

    from ray import cloudpickle

    from rayoodkd.console import TuneLog

    original = builtins.abs  # any builtin: print itself may already be Ray Train's replacement here
    monkeypatch.setattr(builtins, "abs", lambda value: value)
    with pytest.raises(pickle.PicklingError):
        cloudpickle.dumps(original)  # what Tune hit when it pickled a callback holding the original print
    log = cloudpickle.loads(cloudpickle.dumps(TuneLog(original)))
    said: list[tuple] = []
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: said.append(args))
    log("a line")
    assert said == [("a line",)]  # a builtin log prints through whatever print is current
