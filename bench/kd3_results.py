"""KD3 against KD on the whole web corpus and DFND-style selection, over seeds: each run a real
``python -m rayoodkd.train`` run (Ray Data corpus, MLflow), one after another in one process.

    python bench/kd3_results.py --config mnist-kd3-web --config mnist-kd-web --config mnist-dfnd-web \
        --sweep seed=0,1,2 num_workers=0
    python bench/kd3_results.py --config mnist-kd3-web --variant kd3.select=false \
        --variant kd3.feature_alignment=false --variant kd3.mix_distribution=false --sweep seed=0,1,2

``--config``, ``--variant`` and ``--sweep`` combine as in ``bench/augkd_results.py``. Reported per run, from
its MLflow metrics: test top-1 at the checkpoint selected on ``data.val`` (never on test), the final test
top-1, student steps and wall seconds; for selecting methods, per epoch, the selection's size, precision
and recall against the corpus's recorded origins, and the mean seconds of a selection pass
(``time/begin_epoch_s``) against the training steps of an epoch (``time/epoch_train_s``). Then per config,
mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from augkd_results import _mean_std, add_run_arguments, by_setting, run_all

from rayoodkd.config import resolve_config
from rayoodkd.launch import launch

SELECTION = ("select/size", "select/precision", "select/recall")
TIMES = ("time/begin_epoch_s", "time/epoch_train_s")


def run_one(config: str, overrides: list[str], storage: str) -> dict:
    """One run of ``config`` with ``overrides`` -> its figures (see the module docstring)."""
    from mlflow.tracking import MlflowClient

    cfg = resolve_config(config, [*overrides, f"storage_path={storage}"])
    started = time.perf_counter()
    summary = launch(cfg)
    client = MlflowClient(summary.tracking_uri)
    metrics = client.get_run(summary.mlflow_run_id).data.metrics
    history = {
        key: [
            m.value
            for m in sorted(client.get_metric_history(summary.mlflow_run_id, key), key=lambda m: m.step)
        ]
        for key in (*SELECTION, *TIMES)
    }
    return {
        "acc": metrics["test/top1_at_best_val"],
        "final_acc": metrics["test/top1"],
        "teacher": summary.teacher_accuracy,
        "steps": float(summary.steps),
        "wall_seconds": time.perf_counter() - started,
        "per_epoch": {key: values for key, values in history.items() if key in SELECTION and values},
        "seconds": {
            key: statistics.mean(values) for key, values in history.items() if key in TIMES and values
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    args = parser.parse_args()
    rows = run_all(args, run_one, "kd3-bench-")
    print(
        "\n| config | run | test top-1 @ best val | final test top-1 | steps | selection s "
        "| epoch train s | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        seconds = row["seconds"]
        print(
            f"| {row['config']} | {' '.join(row['extra'])} | {row['acc']:.2f} | {row['final_acc']:.2f} "
            f"| {row['steps']:.0f} | {seconds.get('time/begin_epoch_s', 0):.2f} "
            f"| {seconds.get('time/epoch_train_s', 0):.2f} | {row['wall_seconds']:.0f} |"
        )
    groups = by_setting(rows)
    print("\n| config | runs | test top-1 @ best val | final test top-1 |\n|---|---|---|---|")
    for label, members in groups.items():
        print(
            f"| {label} | {len(members)} | {_mean_std([r['acc'] for r in members])} "
            f"| {_mean_std([r['final_acc'] for r in members])} |"
        )
    print("\nselection per epoch, mean over runs (size / precision / recall):")
    for label, members in groups.items():
        series = [r["per_epoch"] for r in members if r["per_epoch"]]
        if not series:
            continue
        epochs = min(len(s["select/size"]) for s in series)
        keys = [key for key in SELECTION if all(key in s for s in series)]
        cells = [
            f"e{epoch + 1}: "
            + " / ".join(f"{statistics.mean(s[key][epoch] for s in series):.3g}" for key in keys)
            for epoch in range(epochs)
        ]
        print(f"{label}\n  " + "\n  ".join(cells))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
