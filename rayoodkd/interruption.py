"""Ctrl-C and SIGTERM during a Ray Tune fit (sweeps, comparisons): Tune's graceful stop, remembered.

Tune stops on Ctrl-C by itself (its SIGINT handler ends the run loop, saves the experiment state and stops the
trials), but ``fit`` then returns as if the sweep were over, and SIGTERM (``ray job stop``, a scheduler,
``kill``) kills the driver without stopping anything. Here SIGTERM takes Tune's graceful path too (Tune stops
on SIGUSR1 as on SIGINT), and the :class:`Interruption` says that a signal cut the fit short, why, with which
exit code, and which trials were running.

SIGINT stays Tune's: its handler puts back the one it replaced when it fires, which is how a Ctrl-C is told
apart from a fit that ran to its end. After a fit that ran to its end, only a plain SIGINT handler (Python's)
is put back: re-installing another one would keep alive what it holds (Ray Train's holds its run's controller
actor), and releasing such an actor handle while the next run creates its controller was seen to leave that
run waiting for ever (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from rayoodkd.errors import CTRL_C, EXIT_CODE, SIGTERM, RunInterrupted
from rayoodkd.raystart import exit_on_sigterm, interruption_reason

if TYPE_CHECKING:
    from ray.tune import Callback

    from rayoodkd.engine.tracking import Tracker


@dataclass
class Interruption:
    """Ctrl-C or SIGTERM during a Tune fit: why (None: the fit ran to its end), the command's exit code, and
    the trials it cut short (trial ID: the trial's config)."""

    reason: str | None = None
    exit_code: int = 0
    cut_short: dict[str, dict[str, Any]] = field(default_factory=dict)


# The trials started and not yet ended, kept by the callback of running_trials(): trial ID -> its config.
_running: dict[str, dict[str, Any]] = {}


def running_trials() -> Callback:
    """A Tune callback that keeps this module's record of the running trials. A trial that Tune ends because
    the fit was interrupted stays in it (Tune's clean-up reports no completion). The record is module state,
    not the callback's, since a restored Tuner brings back the callback it was first pickled with."""
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


def close_cut_short(runs: list[tuple[Tracker, str]], wait_s: float = 10.0) -> None:
    """Close the MLflow runs of the trials an interruption cut short, each ``KILLED`` with its reason, once
    their trials have closed them themselves or after ``wait_s`` in all (Tune does not wait for a trial's
    actor, which may still be recording its own end after ``fit`` returned; one killed outright never does).
    A run that finished meanwhile stays ``FINISHED``."""
    deadline = time.monotonic() + wait_s
    while any(run.status() == "RUNNING" for run, _ in runs) and time.monotonic() < deadline:
        time.sleep(0.5)
    for run, reason in runs:
        if run.status() != "FINISHED":
            run.end("KILLED", reason)


class _HeldSignals:
    """From its creation, in the main thread, Ctrl-C and SIGTERM are held back until :meth:`deliver`; a second
    one is delivered at once (the way to stop an opening that hangs). If either handler was installed from C,
    which Python cannot put back, neither signal is held."""

    def __init__(self) -> None:
        self._held: int | None = None
        self._before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        self._armed = (
            threading.current_thread() is threading.main_thread() and None not in self._before.values()
        )
        if self._armed:
            for signum in self._before:
                signal.signal(signum, self._hold)

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        forced = self._held is not None
        self._held = signum
        if forced:
            self.deliver()

    def deliver(self) -> None:
        """Put the handlers back, and raise the signal held, if any (its handler runs in this thread before
        its next few bytecodes). SIGTERM's default would end the process with nothing closed, so where no
        one handled it, it now exits as a command's does once Ray starts (:func:`exit_on_sigterm`)."""
        if not self._armed:
            return
        self._armed = False
        signal.signal(signal.SIGINT, self._before[signal.SIGINT])
        if self._before[signal.SIGTERM] is signal.SIG_DFL:
            exit_on_sigterm()
        else:
            signal.signal(signal.SIGTERM, self._before[signal.SIGTERM])
        if self._held is not None:
            signal.raise_signal(self._held)


@contextmanager
def parent_killed_if_stopped_at_once(open_parent: Callable[[], Tracker]) -> Iterator[Tracker]:
    """Open a sweep's or comparison's parent MLflow run (``open_parent``: create it, or take the one to
    resume, and record it) and guard the work after it: Ctrl-C or SIGTERM that stops the command at once
    (outside Tune's fit, before Tune listens, a second signal) closes the parent ``KILLED`` with the reason,
    and is raised as :class:`RunInterrupted`. A signal while the parent is being opened waits until it is
    open, so that no parent is left ``RUNNING``. (The runs of trials stopped at once with it close themselves
    if their actors get to; a resumed sweep reopens them.)"""
    began = time.monotonic()
    held = _HeldSignals()
    try:
        parent = open_parent()
    except BaseException:
        held.deliver()
        raise
    try:
        held.deliver()
        yield parent
    except (KeyboardInterrupt, SystemExit) as error:
        if isinstance(error, RunInterrupted):
            stopped = error
            reason = SIGTERM if error.exit_code == EXIT_CODE[SIGTERM] else CTRL_C
        else:  # SIGTERM exits through exit_on_sigterm's handler (ray.init's while it runs); Ray Train's
            # SIGINT handler exits too
            reason = interruption_reason(began, error)
            stopped = RunInterrupted(f"{reason}: stopped at once", EXIT_CODE[reason])
        with contextlib.suppress(Exception):  # the interruption is what the user must see
            parent.end("KILLED", reason)
        if stopped is error:
            raise
        raise stopped from error


def stopped_line(error: KeyboardInterrupt, command: str, resume: str) -> tuple[str, int]:
    """The line a sweep's or comparison's CLI prints when Ctrl-C or SIGTERM stopped it at once, and its exit
    code: after the ``command`` was recorded (a :class:`RunInterrupted`), with how to ``resume`` it; before,
    that nothing was started."""
    if isinstance(error, RunInterrupted):
        return f"{error}; {resume}", error.exit_code
    return f"{CTRL_C} before the {command} started", EXIT_CODE[CTRL_C]


def _tune_not_listening(signum: int, frame: FrameType | None) -> None:
    """SIGUSR1's handler until Tune's run loop installs its own (which ends the run on SIGUSR1 as on SIGINT):
    SIGUSR1's default would kill the process."""


@contextmanager
def stop_gracefully_on_signals() -> Iterator[Interruption]:
    """Around ``tuner.fit()`` in the main thread: Ctrl-C and SIGTERM stop the fit the way Tune stops on
    Ctrl-C (state saved, trials ended, ``fit`` returns), and the :class:`Interruption` says so, with the
    trials that were running (:func:`running_trials` must be among the Tuner's callbacks). A signal before
    Tune listens, or a second one, stops at once (:class:`RunInterrupted`)."""
    stop = Interruption()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    _running.clear()
    sigint_before = signal.getsignal(signal.SIGINT)
    tune_takes_sigint = not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))  # as Tune decides
    sigterm_before = signal.getsignal(signal.SIGTERM)
    sigusr1_before = signal.getsignal(signal.SIGUSR1)

    def tune_listens() -> bool:
        return signal.getsignal(signal.SIGUSR1) is not _tune_not_listening

    def tune_stopped() -> bool:
        """Tune's handler (of SIGINT, and of SIGUSR1 which SIGTERM is relayed as) puts back the SIGINT handler
        before it when it fires."""
        return tune_listens() and tune_takes_sigint and signal.getsignal(signal.SIGINT) is sigint_before

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if stop.reason is not None or not tune_listens() or tune_stopped():
            raise RunInterrupted(f"{SIGTERM}: stopped at once", EXIT_CODE[SIGTERM])
        stop.reason, stop.exit_code = SIGTERM, EXIT_CODE[SIGTERM]
        os.kill(os.getpid(), signal.SIGUSR1)

    signal.signal(signal.SIGUSR1, _tune_not_listening)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield stop
    except RunInterrupted:
        raise
    # Python's SIGINT handler raises KeyboardInterrupt; a Ray Train one that Tune put back exits.
    except (KeyboardInterrupt, SystemExit) as error:
        raise RunInterrupted(f"{CTRL_C}: stopped at once", EXIT_CODE[CTRL_C]) from error
    finally:
        stopped = tune_stopped()
        # Without a stop Tune's SIGINT handler stays after the fit: a plain one before it (Python's, which a
        # command has) is taken back so that Ctrl-C works again.
        if not stopped and sigint_before in (signal.default_int_handler, signal.SIG_DFL, signal.SIG_IGN):
            signal.signal(signal.SIGINT, sigint_before)
        signal.signal(signal.SIGTERM, sigterm_before)
        if not tune_listens():  # else Tune's stays, as after any fit
            signal.signal(signal.SIGUSR1, sigusr1_before)
    if stopped and stop.reason is None:
        stop.reason, stop.exit_code = CTRL_C, EXIT_CODE[CTRL_C]
    if stop.reason is not None:
        stop.cut_short = dict(_running)
