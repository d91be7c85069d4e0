"""Data-parallel efficiency on one machine: the same cores as one worker with N threads or N workers of one.

    python bench/scaling.py                                   # mnist-mosaickd-letters on 2 cores
    python bench/scaling.py --config demo --steps 300 --cores 2

Runs ``python -m rayoodkd.train --config CONFIG max_steps=STEPS`` three ways, one after another (never side
by side): in the driver with ``--cores`` torch threads (``num_workers=0``, no Ray Train), on one Ray Train
worker with ``--cores`` threads, and on ``--cores`` workers with one thread each (DDP over gloo). Each worker
keeps the config's batch, so N workers train N times the images per step. It prints the student images per
second over the training steps (the run's ``throughput/images_per_second``: start-up and evaluation
excluded), seconds per step, and the efficiency of N workers against one worker with N threads (their img/s
ratio: 1.0 means splitting the cores into DDP ranks costs nothing over torch's own threads).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def one_run(config: str, steps: int, workers: int, threads: int, extra: list[str], storage: Path) -> dict:
    """One training run in a fresh process -> its summary (``summary_json``)."""
    summary = storage / "summary.json"
    command = [sys.executable, "-m", "rayoodkd.train", "--config", config, f"max_steps={steps}"]
    command += [f"eval.every={steps}", f"num_workers={workers}", f"resources.torch_threads={threads}"]
    command += [f"storage_path={storage}", "run_name=scaling", "system_metrics=false"]
    command += [f"summary_json={summary}", *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="mnist-mosaickd-letters")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--cores", type=int, default=2, help="threads of one worker")
    parser.add_argument("overrides", nargs="*", help="more config overrides for every run")
    args = parser.parse_args()
    cores = args.cores
    layouts = [("driver", 0, cores), ("1 worker", 1, cores), (f"{cores} workers", cores, 1)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rayoodkd-scaling-") as scratch:
        for index, (label, workers, threads) in enumerate(layouts):
            summary = one_run(
                args.config, args.steps, workers, threads, args.overrides, Path(scratch) / str(index)
            )
            rate = summary["images_per_second"]
            rows.append((label, workers, threads, rate, summary["train_seconds"] / summary["steps"]))
            print(f"{label}: {rate:.0f} img/s, {rows[-1][4]:.3f} s/step", flush=True)
    one_worker = max(rows[1][3], 1e-9)
    print(f"\n{args.config}, {args.steps} steps, load {os.getloadavg()[0]:.1f} after the runs")
    print("| layout | workers | threads each | student img/s | s/step | img/s vs 1 worker |")
    print("|---|---|---|---|---|---|")
    for label, workers, threads, rate, per_step in rows:
        print(f"| {label} | {workers} | {threads} | {rate:.0f} | {per_step:.3f} | {rate / one_worker:.3f} |")


if __name__ == "__main__":
    main()
