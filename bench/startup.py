"""Start-up of a run: seconds from the command to the end of the first training step, and where they go.

    python bench/startup.py                         # the demo, 3 runs after one that warms the caches
    python bench/startup.py --config mnist-mosaickd-letters --runs 2 num_workers=1

Each run is ``python -m rayoodkd.train --config CONFIG max_steps=2 eval.every=2`` in a fresh process and its
own storage (a new MLflow store each time, as a first run in a new directory has). The warm-up run fills the
caches (the builtin sets, the teacher, the decoded corpora); add ``data.decoded_cache_mb=0`` to time
decoding the corpora at every launch, as before the decoded cache. The wall time to the
worker's "first step" console line is measured from outside (Python start-up and imports included); the
breakdown is the run's own account (MLflow tags ``startup/*``; ``total`` counts from ``launch()`` on): the
driver's checks, Ray start, corpus materialisation and MLflow run, the worker group's start (Ray Train
workers, their imports, the process group), the worker's set-up, its evaluation sets, the teacher's test
accuracy and the first step itself.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = (
    "total",
    "checks",
    "ray",
    "data",
    "mlflow",
    "workers",
    "setup",
    "eval_sets",
    "teacher_test",
    "first_step",
)


def one_run(config: str, overrides: list[str], storage: Path) -> dict[str, float]:
    """One run in a fresh process -> {"command": wall s to the first step line, phase: s, ...}."""
    from mlflow.tracking import MlflowClient

    command = [sys.executable, "-m", "rayoodkd.train", "--config", config, "max_steps=2", "eval.every=2"]
    command += [*overrides, f"storage_path={storage}", "run_name=startup", "system_metrics=false"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step = None
    for line in process.stdout:
        if first_step is None and "first step" in line and "after launch" in line:
            first_step = time.perf_counter() - started
    if process.wait() != 0 or first_step is None:
        raise SystemExit(f"run failed or printed no first-step line: {' '.join(command)}")
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    run = client.search_runs(client.get_experiment_by_name("rayoodkd").experiment_id)[0]
    tags = run.data.tags
    return {"command": first_step} | {p: float(tags.get(f"startup/{p}_s", "nan")) for p in PHASES}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="demo")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up run")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rayoodkd-startup-") as scratch:
        for index in range(args.runs + 1):
            row = one_run(args.config, args.overrides, Path(scratch) / f"run{index}")
            print(
                ("warm-up " if index == 0 else f"run {index}   ")
                + "  ".join(f"{k} {v:.1f}" for k, v in row.items())
            )
            if index:
                rows.append(row)
    print(f"\n| {args.config} | " + " | ".join(("command", *PHASES)) + " |")
    print("|---|" + "---|" * (len(PHASES) + 1))
    print(
        "| median s | "
        + " | ".join(f"{statistics.median(r[k] for r in rows):.1f}" for k in ("command", *PHASES))
        + " |"
    )


if __name__ == "__main__":
    main()
