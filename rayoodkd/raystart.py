"""Connecting a command to Ray: the cluster that is there, or a lean local instance of its own, with the
console kept to rayoodkd's lines. Light to import (Ray on first use, no torch), for every command's driver."""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

from rayoodkd.console import quiet_python_loggers, quiet_ray_data, show_only_marked_worker_lines
from rayoodkd.errors import CTRL_C, SIGTERM


def start_or_join_ray(dashboard: bool | None, *, trials: bool, ray_logs: bool) -> None:
    """Connect this command to Ray, unless it is connected already: the cluster at ``RAY_ADDRESS`` or one
    ``ray start`` began on this machine (which keep their own settings), else a Ray instance of its own, on
    this machine, ending with it. Unless ``ray_logs``, the console then shows only rayoodkd's lines of the
    Ray workers (progress, not Ray's chatter).

    ``dashboard`` (the config's ``ray_dashboard``) decides whether that instance runs Ray's dashboard;
    ``None`` starts it only for a command that runs ``trials`` (sweeps, comparisons): Ray Train's
    placement-group cleaner asks the dashboard's state API whether a stopped trial's controller still lives,
    and without it a long-lived instance keeps the resources of trials that died. A single run's instance
    ends with the run, and the dashboard's processes would only take CPU from the cores that train
    (docs/benchmarks.md, issue #19 goal 3).
    """
    import ray

    if ray.is_initialized():
        return
    # An instance started here runs on this one machine, which nobody preempts: Ray Train's preemption watcher
    # would be one more actor to start (2 s of the demo's start-up). Set before ray.init, since the processes
    # its raylet starts (a sweep's trials, which start the trainers) take their environment from it.
    watcher = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
    watcher_ours = watcher not in os.environ
    if watcher_ours:
        os.environ[watcher] = "0"
    include_dashboard = trials if dashboard is None else dashboard
    ray.init(configure_logging=False, log_to_driver=True, include_dashboard=include_dashboard)
    if watcher_ours and not getattr(ray._private.worker._global_node, "head", False):
        del os.environ[watcher]  # joined a cluster: it keeps its own setting
    exit_on_sigterm()  # in place of ray.init's handler
    if not ray_logs:
        quiet_python_loggers()  # again: starting Ray configures its loggers
        show_only_marked_worker_lines()


# When SIGTERM last arrived (time.monotonic()): a long-lived process (the Python API, a notebook) ascribes it
# only to the run it ended, not to every run after it.
_sigterm_at: float | None = None


def exit_on_sigterm() -> None:
    """In the main thread, make SIGTERM exit with code 143, quietly, and remembered
    (:func:`sigterm_received`). ray.init's handler exits with code 15 after the failure handler of Ray's core
    worker has printed a stack dump for the signal, and a SystemExit raised while the driver waits in ray.get
    reaches a run as Ray's SystemExit(1), so only the record tells a SIGTERM apart."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, frame: FrameType | None) -> None:
    global _sigterm_at
    _sigterm_at = time.monotonic()
    raise SystemExit(128 + signum)


def sigterm_received(since: float = 0.0) -> bool:
    """Whether this process was sent SIGTERM (``ray job stop``, a scheduler, ``kill``) at or after ``since``
    (a ``time.monotonic()`` reading; by default: since it joined Ray)."""
    return _sigterm_at is not None and _sigterm_at >= since


def interruption_reason(since: float = 0.0, error: BaseException | None = None) -> str:
    """Why this process was interrupted: SIGTERM if one arrived at or after ``since``, or if ``error`` is the
    exit of the handler ray.init installs while it starts (``SystemExit(15)``); else Ctrl-C."""
    ray_init_exit = isinstance(error, SystemExit) and error.code == signal.SIGTERM
    return SIGTERM if sigterm_received(since) or ray_init_exit else CTRL_C


def start_ray_for_reads(ray_logs: bool = False, *, progress_bars: bool = False) -> None:
    """For a command that reads corpora through Ray Data outside a run (teacher training and import,
    evaluation, the data CLI): Ray started or joined as a run does, lean and, unless ``ray_logs``, with the
    console kept to our lines, rather than by Ray Data's first read with Ray's defaults (banner, dashboard,
    progress and execution-plan lines)."""
    quiet_ray_data(ray_logs, progress_bars)
    if not ray_logs:
        quiet_python_loggers()
    start_or_join_ray(None, trials=False, ray_logs=ray_logs)
