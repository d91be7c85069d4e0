"""Turning exceptions into the one line a user reads."""

from __future__ import annotations


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
