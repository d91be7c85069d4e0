"""The data-free methods over a panel of differently made MNIST-5k teachers (issue #20), through compare.

    python bench/teacher_panel.py --train                 # train (or find cached) every panel teacher
    python bench/teacher_panel.py --seeds 0 1             # DFQ, TA-DFKD, DFAD, DeepInversion × teachers
    python bench/teacher_panel.py --seeds 0 1 --methods mnist-tadfkd --storage S   # one method (resumable)

The panel varies what TA-DFKD's teacher-agnostic claim is about: the architecture (LeNet-5 with BN, two
small conv nets, a CIFAR-style ResNet-8) and the training recipe (another seed, label smoothing 0.1,
three times the epochs; the narrow ``cnn_tiny`` reaches 93.8 % at 15 epochs, so it is in the panel with
45), every teacher trained by ``python -m rayoodkd.teacher``'s recipe and cached by content, so the panel
is this one command on any machine. Presets are used as shipped for every teacher
(``mnist-dfq``, ``mnist-tadfkd``, ``mnist-dfad``, ``mnist-deepinv``); the teachers marked ``tuning`` are
the ones preset settings may be tuned on, the others are held out. ``--train`` prints every teacher's
MNIST-5k test top-1 (each must be ≥ 94 %).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rayoodkd.compare import Entry, run_compare
from rayoodkd.config import resolve_config

# name -> (recipe overrides on top of the data-free presets' teacher, role)
PANEL = {
    "lenet5_bn": ("", "tuning"),
    "cnn_small": ("teacher.recipe.arch=cnn_small", "tuning"),
    "lenet5_bn-seed1": ("teacher.recipe.seed=1", "held out"),
    "lenet5_bn-smooth": ("teacher.recipe.label_smoothing=0.1", "held out"),
    "lenet5_bn-long": ("teacher.recipe.epochs=45", "held out"),
    "cnn_tiny-long": ("teacher.recipe.arch=cnn_tiny teacher.recipe.epochs=45", "held out"),
    "resnet8": ("teacher.recipe.arch=resnet8", "held out"),
}
METHODS = ("mnist-dfq", "mnist-tadfkd", "mnist-dfad", "mnist-deepinv")
# Besides accuracy: the teacher's own score, and agreement with the teacher on real digits (val) next to
# agreement on what the student trained on (DFQ's synthetic batches), to tell a generator that misses the
# real digits from a student that cannot follow the teacher.
METRICS = ("teacher/test_top1", "val/agreement", "train/agreement")


def train_panel() -> None:
    """Every panel teacher trained once (cached) and its test top-1."""
    import ray
    import ray.data

    from rayoodkd.console import quiet_python_loggers
    from rayoodkd.teacher import ensure_teacher
    from rayoodkd.teacher_io import read_teacher

    ray.init(configure_logging=False, log_to_driver=False)
    quiet_python_loggers()
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False

    print("| teacher | role | MNIST-5k test top-1 | checkpoint |\n|---|---|---|---|")
    for name, (overrides, role) in PANEL.items():
        cfg = resolve_config("mnist-dfq", overrides.split())
        path = ensure_teacher(cfg.teacher, cfg.data.cache_dir, lambda _line: None)
        _, info = read_teacher(path)
        print(f"| {name} | {role} | {info.accuracy['test']:.2f} | {path} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", action="store_true", help="only train the panel's teachers")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--teachers", nargs="+", default=list(PANEL), choices=list(PANEL))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--storage", type=Path, default=None, help="where runs go (default: a temp dir)")
    parser.add_argument("--max-concurrent", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for every run")
    args = parser.parse_args()
    if args.train:
        train_panel()
        return
    storage = args.storage or Path(tempfile.mkdtemp(prefix="teacher-panel-"))
    for method in args.methods:  # one comparison per method: several methods can run side by side
        entries = [Entry.parse(f"{method} {PANEL[teacher][0]}".strip()) for teacher in args.teachers]
        run_compare(
            entries,
            args.seeds,
            [f"storage_path={storage / 'runs'}", *args.overrides],
            name=f"teacher-panel-{method}",
            output=storage / f"compare-{method}",
            max_concurrent=args.max_concurrent,
            metrics=METRICS,
        )


if __name__ == "__main__":
    main()
