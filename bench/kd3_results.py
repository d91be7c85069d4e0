"""KD3 against KD on the whole web corpus and DFND-style selection, over seeds: a thin call of
``rayoodkd compare``, one run at a time, plus the selection per epoch.

    python bench/kd3_results.py --configs mnist-kd3-web mnist-kd-web mnist-dfnd-web --seeds 0 1 2 \
        --override num_workers=0
    python bench/kd3_results.py --seeds 0 1 2 --override num_workers=0 \\
        --configs "mnist-kd3-web kd3.select=false" "mnist-kd3-web kd3.feature_alignment=false" \\
        "mnist-kd3-web kd3.mix_distribution=false"

Prints compare's table (per config, mean ± std over the seeds of the final test top-1, the best val top-1,
the test top-1 at the best-val checkpoint, wall time and img/s) with the mean seconds of a selection pass
(``time/begin_epoch_s``) and of an epoch's training steps (``time/epoch_train_s``); then, for the selecting
methods, per epoch and averaged over the seeds, the selection's size, precision and recall against the
corpus's recorded origins (from each run's MLflow history).
"""

from __future__ import annotations

import statistics

from augkd_results import parse_bench_arguments, run_bench

from rayoodkd.compare import CompareResult

SELECTION = ("select/size", "select/precision", "select/recall")
TIMES = ("time/begin_epoch_s", "time/epoch_train_s")


def selection_per_epoch(result: CompareResult) -> dict[str, list[str]]:
    """Per config with a selection: one ``e<k>: size / precision / recall`` line per epoch (seed means)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result.tracking_uri)
    lines: dict[str, list[str]] = {}
    for label in dict.fromkeys(r.label for r in result.results):
        runs = [r for r in result.results if r.label == label and r.status == "FINISHED"]
        series = [
            {
                key: [
                    m.value
                    for m in sorted(client.get_metric_history(r.mlflow_run_id, key), key=lambda m: m.step)
                ]
                for key in SELECTION
            }
            for r in runs
        ]
        series = [s for s in series if s["select/size"]]
        if not series:
            continue
        keys = [key for key in SELECTION if all(s[key] for s in series)]
        epochs = min(len(s["select/size"]) for s in series)
        lines[label] = [
            f"e{epoch + 1}: "
            + " / ".join(f"{statistics.mean(s[key][epoch] for s in series):.3g}" for key in keys)
            for epoch in range(epochs)
        ]
    return lines


def main() -> None:
    result = run_bench(parse_bench_arguments(__doc__), TIMES, "kd3-bench-")
    print("selection per epoch, mean over seeds (size / precision / recall):")
    for label, lines in selection_per_epoch(result).items():
        print(f"{label}\n  " + "\n  ".join(lines))


if __name__ == "__main__":
    main()
