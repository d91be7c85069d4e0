"""AuG-KD against its baselines over seeds: each run a real ``python -m rayoodkd.train`` run (Ray Train,
Ray Data corpora, MLflow), one after another in one process, on the presets' data.

    python bench/augkd_results.py --config mnist2uci-augkd --config mnist2uci-kd --config mnist2uci-finetune \
        --sweep seed=0,1,2
    python bench/augkd_results.py --config mnist2uci-augkd --variant augkd.use_anchors=false \
        --sweep seed=0,1,2
    python bench/augkd_results.py --config mnist2uci-kd --sweep data.labelled.per_class=50 --sweep seed=0,1,2

Each ``--config`` is run as is and once per ``--variant`` (a space-separated list of overrides), each of
those for every combination of the ``--sweep`` values (several ``--sweep``: their cross product). Reported
per run, from the run's MLflow metrics: test Acc / Acc@3 at the checkpoint selected on ``data.val`` (never
on test), the final test Acc, the teacher's test Acc on the same split (the domain shift), and wall
seconds; then, per config and sweep value other than the seed, mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

from rayoodkd.config import resolve_config
from rayoodkd.launch import launch

FIGURES = {
    "acc": "test/top1_at_best_val",
    "acc3": "test/top3_at_best_val",
    "final_acc": "test/top1",
}


def run_one(config: str, overrides: list[str], storage: str) -> dict[str, float]:
    """One run of ``config`` with ``overrides`` -> its figures (see the module docstring)."""
    from mlflow.tracking import MlflowClient

    cfg = resolve_config(config, [*overrides, f"storage_path={storage}"])
    started = time.perf_counter()
    summary = launch(cfg)
    metrics = MlflowClient(summary.tracking_uri).get_run(summary.mlflow_run_id).data.metrics
    return {
        **{name: metrics[key] for name, key in FIGURES.items()},
        "teacher": summary.teacher_accuracy,
        "steps": float(summary.steps),
        "wall_seconds": time.perf_counter() - started,
    }


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--variant``, ``--variants-only``, ``--sweep``, ``--storage`` and overrides."""
    parser.add_argument("--config", action="append", required=True, help="preset name or YAML (repeat)")
    parser.add_argument(
        "--sweep", action="append", default=[], help="KEY=V1,V2,...: a run per value (repeat: cross product)"
    )
    parser.add_argument(
        "--variant", action="append", default=[], help="'KEY=V KEY=V': one more run per variant (repeat)"
    )
    parser.add_argument("--variants-only", action="store_true", help="skip the configs run as they are")
    parser.add_argument("--storage", default=None, help="storage_path of the runs (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")


def run_combinations(args: argparse.Namespace) -> list[list[str]]:
    """The overrides of every run of a config: as is and per variant, times every sweep combination."""
    combos = ([] if args.variants_only else [[]]) + [variant.split() for variant in args.variant]
    for sweep in args.sweep:
        key, _, values = sweep.partition("=")
        combos = [[*combo, f"{key}={value}"] for combo in combos for value in values.split(",")]
    return combos


def run_all(args: argparse.Namespace, run: Callable[[str, list[str], str], dict], prefix: str) -> list[dict]:
    """Every config × run combination through ``run(config, overrides, storage)``, one after another:
    rows of ``{"config", "extra", **figures}``."""
    storage = args.storage or tempfile.mkdtemp(prefix=prefix)
    rows = []
    for config in args.config:
        for extra in run_combinations(args):
            print(f"== {config} {' '.join([*args.overrides, *extra])}", flush=True)
            figures = run(config, [*args.overrides, *extra], storage)
            print(f"   {json.dumps(figures)}", flush=True)
            rows.append({"config": config, "extra": extra, **figures})
    return rows


def by_setting(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by config and overrides other than the seed (the runs a mean ± std is taken over)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        label = " ".join([row["config"], *(e for e in row["extra"] if not e.startswith("seed="))])
        groups[label].append(row)
    return groups


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    args = parser.parse_args()
    rows = run_all(args, run_one, "augkd-bench-")
    print(
        "\n| config | run | test Acc @ best val | test Acc@3 @ best val | final test Acc | teacher | wall s |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['config']} | {' '.join(row['extra'])} | {row['acc']:.2f} | {row['acc3']:.2f} "
            f"| {row['final_acc']:.2f} | {row['teacher']:.2f} | {row['wall_seconds']:.0f} |"
        )
    groups = by_setting(rows)
    print(
        "\n| config | runs | test Acc @ best val | test Acc@3 @ best val | teacher |\n|---|---|---|---|---|"
    )
    for label, members in groups.items():
        print(
            f"| {label} | {len(members)} | {_mean_std([r['acc'] for r in members])} "
            f"| {_mean_std([r['acc3'] for r in members])} | {_mean_std([r['teacher'] for r in members])} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
