"""AuG-KD against its baselines over seeds: a thin call of ``rayoodkd compare``, one run at a time.

    python bench/augkd_results.py --configs mnist2uci-augkd mnist2uci-kd mnist2uci-finetune --seeds 0 1 2
    python bench/augkd_results.py --storage R --seeds 0 1 2 --configs \\
        "mnist2uci-augkd init_from.checkpoint=R/runs/m2u-prefix-s{seed} init_from.stage=mixup" \\
        "mnist2uci-augkd init_from.checkpoint=R/runs/m2u-prefix-s{seed} init_from.stage=mixup augkd.b=1.0"
    python bench/augkd_results.py --configs mnist2uci-kd --seeds 0 1 2 --override data.labelled.per_class=50

Every run is a full rayoodkd run (TorchTrainer, Ray Data, MLflow child run of the comparison), one after
another so that wall times are those of an otherwise idle machine. ``{seed}`` in an item's overrides is the
run's seed: the second command runs stage 3 of each seed from that seed's stages 1-2, run once before with
``python -m rayoodkd.train --config mnist2uci-augkd seed=S stop_after=anchor storage_path=R/runs
run_name=m2u-prefix-sS``. Prints compare's table (per config, mean ± std over the seeds of the final test
Acc, the best val Acc, the test Acc at the best-val checkpoint — the figure methods are compared by — wall
time and img/s) with two more columns: test Acc@3 at the best-val checkpoint and the teacher's own test Acc
on the student domain (the shift the method must bridge).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rayoodkd.compare import CompareResult, Entry, run_compare

METRICS = ("test/top3_at_best_val", "teacher/test_top1")


def parse_bench_arguments(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """``--configs``, ``--seeds``, ``--storage`` and ``--override`` for every run (the bench scripts' CLI)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", required=True, help='presets; "PRESET KEY=VALUE ..." items')
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--storage", type=Path, default=None, help="where runs go (default: a temp dir)")
    parser.add_argument("--name", default=None, help="the comparison's name (default: from the configs)")
    # An option, not trailing positionals, which --configs and --seeds would take as theirs.
    parser.add_argument(
        "--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="for every run"
    )
    return parser.parse_args(argv)


def run_bench(args: argparse.Namespace, metrics: tuple[str, ...], prefix: str) -> CompareResult:
    """``run_compare`` of the bench's configs, one run at a time, in ``args.storage`` (or a temp dir)."""
    storage = args.storage or Path(tempfile.mkdtemp(prefix=prefix))
    return run_compare(
        [Entry.parse(text) for text in args.configs],
        args.seeds,
        [f"storage_path={storage / 'runs'}", *args.override],
        name=args.name,
        output=storage / "compare",
        max_concurrent=1,
        metrics=metrics,
    )


def main() -> None:
    run_bench(parse_bench_arguments(__doc__), METRICS, "augkd-bench-")


if __name__ == "__main__":
    main()
