"""``rayoodkd COMMAND [ARGS ...]``: one command for the package's command-line tools.

Each command is a module with ``main(argv) -> int`` (``rayoodkd train ARGS`` is ``python -m rayoodkd.train
ARGS``); the module is imported only when its command runs, so ``rayoodkd --help`` imports no torch, Ray or
MLflow. A new command is one more entry in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import NamedTuple

from rayoodkd import __version__


class Command(NamedTuple):
    module: str  # has ``main(argv: list[str]) -> int``
    summary: str  # the one line ``rayoodkd --help`` shows


COMMANDS: dict[str, Command] = {
    "train": Command("rayoodkd.train", "one distillation run on Ray Train, logged to MLflow"),
    "tune": Command("rayoodkd.tune", "a hyperparameter sweep with Ray Tune and ASHA"),
    "teacher": Command("rayoodkd.teacher", "train a teacher checkpoint, import foreign weights or show one"),
    "evaluate": Command("rayoodkd.evaluate", "the accuracy table of a run checkpoint on its in-domain sets"),
    "data": Command("rayoodkd.data.__main__", "materialise or inspect an image corpus; show the cache"),
    "compare": Command("rayoodkd.compare", "configs x seeds as concurrent trials, in mean ± std"),
}


def prog(command: str) -> str:
    """``command`` as this process was started, for its usage and error lines: ``rayoodkd train`` from the
    console script or ``python -m rayoodkd``, ``python -m rayoodkd.train`` when the module itself runs."""
    launcher = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    through_cli = launcher.stem == "rayoodkd" or launcher == Path(__file__).with_name("__main__.py")
    return f"rayoodkd {command}" if through_cli else f"python -m rayoodkd.{command}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayoodkd",
        description="Out-of-domain and data-free knowledge distillation on Ray Train, Ray Data, Ray Tune "
        "and MLflow.",
        epilog="`rayoodkd COMMAND --help` describes a command; `python -m rayoodkd.COMMAND` runs the same.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.summary, add_help=False)
    return parser


def run(name: str, argv: list[str]) -> int:
    """Run command ``name`` with its arguments ``argv``; its exit code."""
    return importlib.import_module(COMMANDS[name].module).main(argv)


def main(argv: list[str] | None = None) -> int:
    """The ``rayoodkd`` console script (and ``python -m rayoodkd``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return run(argv[0], argv[1:])
    # No command first: --help and --version exit here, and so does a missing or unknown command.
    args = _parser().parse_args(argv)
    return run(args.command, [])


if __name__ == "__main__":
    sys.exit(main())
