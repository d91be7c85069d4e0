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

It also counts the CPU seconds of every process of each run (the command and all it starts, sampled every
0.2 s) from the first step's console line to the last step's: those of the training processes (the command
itself and Ray Train's workers) and those of Ray's own processes (GCS, raylet, dashboard and its agent, log
monitor, Ray Train's and Ray Data's actors...), which share the same cores: part of the Ray tax that no
profile of the training step shows. The progress line of the last step must be printed (``log_every``
divides the steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

# Process titles of the processes that train: the command's own process and Ray Train's workers.
TRAINING = ("rayoodkd.train", "ray::RayTrainWorker")


def _label(process: psutil.Process) -> str:
    """A process's kind: its Ray process title, or the script a Python process runs, or its executable."""
    command = process.cmdline()
    if not command:
        return process.name()
    if "python" in os.path.basename(command[0]) and len(command) > 1:
        script = next((c for c in command[1:] if not c.startswith("-")), command[1])
        return "rayoodkd.train" if "rayoodkd.train" in command else os.path.basename(script)
    return command[0].split(" ")[0].split("/")[-1]


def cpu_seconds(process: subprocess.Popen, reached: dict[str, float], every: float = 0.2) -> dict:
    """Sample ``process`` and its descendants until it exits -> {mark: CPU seconds (user + system) per kind,
    summed at the first sample after another thread put the mark into ``reached``}."""
    last: dict[int, tuple[str, float]] = {}
    snapshots: dict[str, Counter] = {}
    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for member in tree:
            try:
                # Labelled at every sample: a Ray worker takes its title (ray::RayTrainWorker) after start.
                last[member.pid] = (_label(member), sum(member.cpu_times()[:2]))
            except psutil.Error:
                continue
        for mark in list(reached):
            if mark not in snapshots:
                snapshots[mark] = Counter()
                for label, seconds in last.values():
                    snapshots[mark][label] += seconds
        time.sleep(every)
    return snapshots


def one_run(config: str, steps: int, workers: int, threads: int, extra: list[str], storage: Path) -> dict:
    """One training run in a fresh process -> its summary (``summary_json``)."""
    summary = storage / "summary.json"
    command = [sys.executable, "-m", "rayoodkd.train", "--config", config, f"max_steps={steps}"]
    command += [f"eval.every={steps}", f"num_workers={workers}", f"resources.torch_threads={threads}"]
    command += [f"storage_path={storage}", "run_name=scaling", "system_metrics=false"]
    command += [f"summary_json={summary}", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    seen: dict[str, float] = {}

    def read() -> None:
        for line in process.stdout:
            output.append(line)
            if "first step" in line and "after launch" in line:
                seen.setdefault("first step", time.perf_counter())
            if f"step {steps}/{steps} " in line:
                seen.setdefault("last step", time.perf_counter())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    cpu = cpu_seconds(process, seen)
    reader.join()
    if process.returncode != 0 or set(cpu) != {"first step", "last step"}:
        raise SystemExit(f"failed or no first/last step line: {' '.join(command)}\n{''.join(output)[-4000:]}")
    training = cpu["last step"] - cpu["first step"]
    return json.loads(summary.read_text()) | {"cpu": training, "wall": seen["last step"] - seen["first step"]}


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
    rows, cpu_rows = [], []
    with tempfile.TemporaryDirectory(prefix="rayoodkd-scaling-") as scratch:
        for index, (label, workers, threads) in enumerate(layouts):
            summary = one_run(
                args.config, args.steps, workers, threads, args.overrides, Path(scratch) / str(index)
            )
            rate = summary["images_per_second"]
            rows.append((label, workers, threads, rate, summary["train_seconds"] / summary["steps"]))
            print(f"{label}: {rate:.0f} img/s, {rows[-1][4]:.3f} s/step", flush=True)
            cpu_rows.append((label, summary["wall"], summary["cpu"]))
    one_worker = max(rows[1][3], 1e-9)
    print(f"\n{args.config}, {args.steps} steps, load {os.getloadavg()[0]:.1f} after the runs")
    print("| layout | workers | threads each | student img/s | s/step | img/s vs 1 worker |")
    print("|---|---|---|---|---|---|")
    for label, workers, threads, rate, per_step in rows:
        print(f"| {label} | {workers} | {threads} | {rate:.0f} | {per_step:.3f} | {rate / one_worker:.3f} |")
    print("\nCPU seconds of each run's processes from its first step to its last (Ray's own: not training)")
    print("| layout | wall s | training processes | Ray's own | Ray's own, % of one core | largest |")
    print("|---|---|---|---|---|---|")
    for label, wall, cpu in cpu_rows:
        training = sum(seconds for kind, seconds in cpu.items() if kind in TRAINING)
        ray_own = Counter({kind: seconds for kind, seconds in cpu.items() if kind not in TRAINING})
        largest = ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in ray_own.most_common(4))
        share = 100 * ray_own.total() / wall
        print(f"| {label} | {wall:.1f} | {training:.1f} | {ray_own.total():.1f} | {share:.1f} | {largest} |")


if __name__ == "__main__":
    main()
