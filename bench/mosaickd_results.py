"""MosaicKD vs KD on raw OOD data on the embedded MNIST demo: the table of issue #4.

    python bench/mosaickd_results.py                          # 4 presets x seeds 0 1 2, one run at a time
    python bench/mosaickd_results.py --presets mnist-mosaickd-textures --seeds 0 --override num_workers=1
    python bench/mosaickd_results.py --storage DIR ...        # reuses the runs already finished in DIR

Every run is a real ``python -m rayoodkd.train --config PRESET seed=S`` (TorchTrainer, Ray Data, MLflow) in
its own process; its ``summary_json`` is read back. Prints, per preset, mean ± std over the seeds of the
final test accuracy, the best validation accuracy, the test accuracy of the best-validation student, and the
wall / training time of one run, followed by the MosaicKD − KD gaps the issue asks about (same OOD corpus,
equal student steps).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PRESETS = ("mnist-kd-letters", "mnist-mosaickd-letters", "mnist-kd-textures", "mnist-mosaickd-textures")
FIELDS = (
    ("student_accuracy", "test (final)"),
    ("best_val_accuracy", "best val"),
    ("test_accuracy_at_best_val", "test @ best val"),
    ("wall_seconds", "wall s"),
    ("train_seconds", "train s"),
)


def run(preset: str, seed: int, storage: Path, overrides: list[str]) -> dict[str, float]:
    """One training run through the CLI; its summary as a dict (read back if the run already finished).

    Runs with extra overrides get their own name (a hash of the overrides), so a summary or checkpoint of
    the same preset and seed under other settings is never reused or resumed.
    """
    name = f"{preset}-seed{seed}"
    if overrides:
        name += "-" + hashlib.sha1(" ".join(overrides).encode()).hexdigest()[:8]
    summary = storage / f"{name}.json"
    if summary.exists():
        print(f"# {preset} seed {seed}: finished earlier, reading {summary}", flush=True)
        return json.loads(summary.read_text())
    command = [
        sys.executable,
        "-m",
        "rayoodkd.train",
        "--config",
        preset,
        f"seed={seed}",
        f"storage_path={storage / 'runs'}",
        f"run_name={name}",
        f"summary_json={summary}",
        *overrides,
    ]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} ± {spread:4.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--override", nargs="*", default=[], help="extra KEY=VALUE for every run")
    parser.add_argument("--storage", type=Path, default=None, help="where runs go (default: a temp dir)")
    args = parser.parse_args()
    storage = args.storage or Path(tempfile.mkdtemp(prefix="mosaickd-bench-"))
    results = {
        preset: [run(preset, seed, storage, args.override) for seed in args.seeds] for preset in args.presets
    }

    header = f"{'preset':26s}" + "".join(f"{label:>18s}" for _, label in FIELDS)
    print(f"\nseeds {args.seeds}; mean ± std over seeds; accuracies in %\n{header}\n{'-' * len(header)}")
    for preset, runs in results.items():
        print(f"{preset:26s}" + "".join(f"{mean_std([r[key] for r in runs]):>18s}" for key, _ in FIELDS))
    for corpus in ("letters", "textures"):
        kd, mosaic = results.get(f"mnist-kd-{corpus}"), results.get(f"mnist-mosaickd-{corpus}")
        if kd and mosaic:
            for key, label in FIELDS[:3]:
                gap = statistics.mean(r[key] for r in mosaic) - statistics.mean(r[key] for r in kd)
                print(f"MosaicKD − KD on {corpus:8s} {label:15s}: {gap:+.2f} points")


if __name__ == "__main__":
    main()
