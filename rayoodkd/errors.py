"""Turning exceptions into the one line a user reads."""

from __future__ import annotations

CTRL_C = "interrupted (Ctrl-C)"
SIGTERM = "terminated (SIGTERM)"
EXIT_CODE = {CTRL_C: 130, SIGTERM: 143}  # 128 + the signal's number, as a shell reports it


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run, sweep or comparison: the message says whether and how it resumes;
    ``exit_code`` is the command's (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message (its type name when the message is empty), at most ``limit``."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def one_line(error: BaseException, limit: int = 300) -> str:
    """``Type: message`` in one line; for a message holding a traceback, its last line (the cause)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return f"{type(error).__name__}: {text[:limit]}"
