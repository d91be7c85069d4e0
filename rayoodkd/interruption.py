"""Ctrl-C and SIGTERM during a Ray Tune fit (sweeps, comparisons): a graceful stop that is remembered.

Tune catches SIGINT only, and ends ``fit`` as if the run were over. Here both signals become Tune's own
graceful stop, and the :class:`Interruption` says why, with which exit code, and which trials it cut short.
The running trials are module state, kept by a Tune callback: a restored Tuner brings back the callback it was
first pickled with, and this module (never run as ``__main__``) is the one both sides see.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from rayoodkd.errors import RunInterrupted


@dataclass
class Interruption:
    """Ctrl-C or SIGTERM during a Tune fit: why, the command's exit code, and the trials it cut short (trial
    ID: the trial's config)."""

    reason: str | None = None
    exit_code: int = 0
    cut_short: dict[str, dict[str, Any]] = field(default_factory=dict)


# The trials started and not yet ended, kept by the callback of running_trials(): trial ID -> its config.
_running: dict[str, dict[str, Any]] = {}


def running_trials() -> Any:
    """A Tune callback that keeps this module's record of the running trials. A trial Tune ends because its
    run was interrupted stays in it (Tune's clean-up reports no completion). The record is module state, not
    the callback's, since a restored Tuner brings back the callback it was first pickled with."""
    from ray.tune import Callback

    class RunningTrials(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            from rayoodkd import interruption

            interruption._running[trial.trial_id] = dict(trial.config)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            from rayoodkd import interruption

            interruption._running.pop(trial.trial_id, None)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            from rayoodkd import interruption

            interruption._running.pop(trial.trial_id, None)

    return RunningTrials()


def close_cut_short(run: Any, reason: str, wait_s: float = 10.0) -> None:
    """Close the MLflow run (a :class:`Tracker`) of a trial an interruption cut short: ``KILLED`` with
    ``reason``, once its trial has closed it itself or after ``wait_s`` (Tune does not wait for a trial's
    actor, which may still be recording its own failure after ``fit`` returned; one killed outright never
    does). A run that finished meanwhile stays ``FINISHED``."""
    from rayoodkd.engine.tracking import FAILURE_TAG

    deadline = time.monotonic() + wait_s
    while (status := run.status()) == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    if status != "FINISHED":
        run.set_tags({FAILURE_TAG: reason})
        run.terminate("KILLED")


def _tune_not_listening(signum: int, frame: FrameType | None) -> None:
    """SIGUSR1's handler until Tune's run loop installs its own (it ends the run on SIGUSR1 as on SIGINT)."""


@contextmanager
def stop_gracefully_on_signals() -> Iterator[Interruption]:
    """Around ``tuner.fit()`` in the main thread: Ctrl-C and SIGTERM stop the run the way Tune stops on
    Ctrl-C (state saved, trials ended, ``fit`` returns), and the :class:`Interruption` says so, with the
    trials that were running (:func:`running_trials` must be among the Tuner's callbacks). Tune catches
    SIGINT only and ends ``fit`` normally: without this a sweep stopped by Ctrl-C looked finished. A signal
    before Tune listens, or a second one, stops at once (:class:`RunInterrupted`)."""
    stop = Interruption()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        reason = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
        if stop.reason is not None or signal.getsignal(signal.SIGUSR1) is _tune_not_listening:
            raise RunInterrupted(f"{reason}: stopped at once", 128 + signum)
        stop.reason, stop.exit_code = reason, 128 + signum
        os.kill(os.getpid(), signal.SIGUSR1)

    _running.clear()
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in (*stops, signal.SIGUSR1)}
    tune_sigint = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGUSR1, _tune_not_listening)
    for signum in stops:
        signal.signal(signum, handler)
    try:
        yield stop
        if stop.reason is not None:
            stop.cut_short = dict(_running)
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)
        if tune_sigint is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_sigint
