"""The driver's console filter: rayoodkd's marked worker lines through, Ray's own chatter out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ray._private import worker as ray_worker

from rayoodkd.console import MARK, format_duration, show_only_marked_worker_lines


def test_only_marked_worker_lines_reach_the_console(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    saved = list(dispatcher.handlers)
    seen: list[dict] = []
    dispatcher.handlers = [("ray_print_logs", seen.append)]
    try:
        assert show_only_marked_worker_lines()
        dispatcher.emit(
            {
                "pid": 1,
                "is_err": False,
                "lines": [
                    "Execution plan of Dataset ood_0: InputDataBuffer[Input] -> OutputSplitter[split(2)]",
                    f"{MARK}step 25/1500   2%  kd 0.44  4,021 img/s  ETA 2m31s",
                    "Reporting training result 1: TrainingReport(checkpoint=None, metrics={...})",
                ],
            }
        )
        dispatcher.emit({"pid": 2, "is_err": True, "lines": ["Exception in thread PlacementGroupCleaner"]})
    finally:
        dispatcher.handlers = saved
    assert seen == []  # Ray's own printer was replaced, not called
    assert capsys.readouterr().out == "step 25/1500   2%  kd 0.44  4,021 img/s  ETA 2m31s\n"


def test_the_raylets_advice_is_dropped_and_its_errors_still_shown(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", print)])
    assert show_only_marked_worker_lines()
    wrapped = ray_worker.print_to_stdstream
    assert show_only_marked_worker_lines()
    assert ray_worker.print_to_stdstream is wrapped  # a second call does not wrap the printer twice
    advice = (
        "WARNING: 8 PYTHON worker processes have been started on node: c904 with address: 192.0.2.2, "
        "which is 4x the maximum expected startup concurrency (2)."
    )
    died = "A worker died or was killed while executing a task by an unexpected system error."
    for line in (advice, died):
        ray_worker.print_to_stdstream(
            {"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False
        )
    out = capsys.readouterr().out
    assert died in out and "PYTHON worker processes" not in out


def test_without_ray_forwarding_nothing_is_replaced() -> None:
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    saved = list(dispatcher.handlers)
    dispatcher.handlers = []
    try:
        assert not show_only_marked_worker_lines()
        assert dispatcher.handlers == []
    finally:
        dispatcher.handlers = saved


@pytest.mark.parametrize(("seconds", "text"), [(37.4, "37s"), (245, "4m05s"), (3720, "1h02m"), (-3, "0s")])
def test_durations_read_like_a_clock(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.ray
def test_a_run_that_first_trains_its_teacher_keeps_the_quiet_console(tmp_path: Path) -> None:
    """Training a teacher recipe reads its corpora through Ray Data, which would start Ray with Ray's own
    defaults (its start-up banner, the dashboard) and leave the run's console to Ray's chatter."""
    argv = [sys.executable, "-m", "rayoodkd.train", "--config", "demo", "num_workers=1"]
    argv += [f"storage_path={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}"]
    argv += ["teacher.recipe.epochs=1", "data.ood.num_images=800"]
    argv += ["max_steps=4", "eval.every=2", "log_every=2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "teacher: no checkpoint given; training the recipe once" in output
    assert [line.split()[1] for line in output.splitlines() if line.startswith("step ")] == ["2/4", "4/4"]
    noise = ("Started a local Ray instance", "TrainingReport", "Reporting training result", "Execution plan")
    noise += ("execution finished", "Progress bars disabled")  # Ray Data's own lines on the teacher's reads
    noise += ("Creating initial MLflow database tables",)  # MLflow's INFO line on a new store
    assert not [line for line in output.splitlines() if any(n in line for n in noise)], output[-3000:]


@pytest.mark.ray
def test_the_data_cli_reads_through_ray_without_ray_chatter(tmp_path: Path) -> None:
    """A command that reads a corpus outside a run starts Ray as a run does instead of letting Ray Data's
    first read start it with Ray's defaults: no banner, no execution plan, no progress lines."""
    from PIL import Image

    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for index in range(3):
            Image.new("L", (6, 6), color=40 * index).save(tmp_path / label / f"{index}.png")
    argv = [sys.executable, "-m", "rayoodkd.data", "inspect", str(tmp_path), "--image-size", "4"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "rows: 6" in output and "corrupt: 0" in output
    noise = ("Started a local Ray instance", "Execution plan", "execution finished", "Running Dataset")
    noise += ("Total Progress", "Token authentication")
    assert not [line for line in output.splitlines() if any(n in line for n in noise)], output[-3000:]
