"""What a run prints: rayoodkd's own progress lines, with Ray's and MLflow's chatter kept off the console.

Ray forwards the stdout and stderr of every worker and actor to the driver: Ray Data execution plans for every
epoch, Ray Train's report dicts from every rank, placement and shutdown messages. By default the driver shows
only the lines rayoodkd's workers mark as theirs (:data:`MARK`, stripped when shown) and warnings or errors
of Ray's and MLflow's own loggers; ``ray_logs=true`` restores Ray's forwarding. Ray keeps every log under its
session directory (``/tmp/ray/session_latest/logs``) either way.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MARK = "[rayoodkd] "
QUIET_LOGGERS = {
    "ray": logging.ERROR,
    "ray.data": logging.ERROR,
    "ray.train": logging.ERROR,
    "ray.tune": logging.ERROR,
    "mlflow": logging.WARNING,
    "alembic": logging.WARNING,
}
# Raylet messages to the driver that are advice about Ray's own scheduling, not about the run: with the
# fractional CPU requests of a sweep's or a comparison's trials Ray starts more worker processes than it has
# CPUs, and says so.
RAYLET_ADVICE = ("worker processes have been started on node",)


def quiet_python_loggers() -> None:
    """Ray's and MLflow's driver-side loggers: warnings and errors only (Ray: errors only; its start-up
    warnings are advice about the cluster, not about the run)."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # MLflow is imported on first use (rayoodkd.engine.tracking) and then resets its logger to this level.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(QUIET_LOGGERS["mlflow"]))


def quiet_ray_data(ray_logs: bool, progress_bars: bool = False) -> None:
    """Ray Data's reads in this driver: progress bars only if asked (off a terminal Ray prints them as log
    lines), and its execution plans only with ``ray_logs``."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress_bars
    context.print_on_execution_start = ray_logs


def show_only_marked_worker_lines() -> bool:
    """Replace Ray's worker-log printer in this driver by one that shows only rayoodkd's marked lines.

    Returns whether it could (the printer is a Ray internal; if it moves, Ray's own forwarding stays)."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return False
    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    handlers = getattr(dispatcher, "handlers", [])
    if not any(name == "ray_print_logs" for name, _ in handlers):
        return False  # Ray forwards nothing to this driver (log_to_driver=False) or its internals moved

    def marked_only(data: dict[str, Any]) -> None:
        lines = [line[len(MARK) :] for line in data.get("lines", []) if line.startswith(MARK)]
        for line in lines:
            print(line, file=sys.stdout, flush=True)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", marked_only)
    _drop_raylet_advice(ray_worker)
    return True


def _drop_raylet_advice(ray_worker: types.ModuleType) -> None:
    """Messages the raylet pushes to the driver (worker deaths, out-of-memory kills) reach the console through
    ``print_to_stdstream``, not the worker-log printer; they still do, but for :data:`RAYLET_ADVICE`."""
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "drops_raylet_advice", False):
        return

    def without_advice(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            lines = [line for line in data.get("lines", []) if not any(a in line for a in RAYLET_ADVICE)]
            if not lines:
                return
            data = {**data, "lines": lines}
        printer(data, ignore_prefix)

    without_advice.drops_raylet_advice = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = without_advice


class TuneLog:
    """``log`` for a Ray Tune callback, which Tune pickles with its experiment. A builtin such as ``print``
    pickles by name, and once Ray Train has patched ``builtins.print`` in this process (it does where its
    workers run) the original no longer matches that name: a builtin is looked up at each call instead."""

    def __init__(self, log: Any) -> None:
        self.log = None if isinstance(log, types.BuiltinFunctionType) else log

    def __call__(self, line: str) -> None:
        (self.log or print)(line)


@contextmanager
def silent_tune() -> Iterator[None]:
    """Ray Tune without its own console output at ``verbose=0``: its new output engine prints an experiment
    header, the results path and a TensorBoard hint even then; its legacy reporter (``RAY_AIR_NEW_OUTPUT=0``,
    read when a Tuner fits) prints nothing."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def format_duration(seconds: float) -> str:
    """``1h02m``, ``4m05s`` or ``37s``."""
    seconds = max(round(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Phases:
    """Seconds spent in each named phase of a start-up, lap after lap (for the console and MLflow)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now

    def __str__(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{name} {value:.1f}" for name, value in self.seconds.items())
        return f"ready in {total:.1f} s: {parts}"
