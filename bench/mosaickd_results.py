"""MosaicKD vs KD on raw OOD data on the embedded MNIST demo: the table of issue #4, through ``compare``.

    python bench/mosaickd_results.py                          # 4 presets x seeds 0 1 2, one run at a time
    python bench/mosaickd_results.py --presets mnist-mosaickd-textures --seeds 0 --override num_workers=1
    python bench/mosaickd_results.py --storage DIR ...        # reuses the runs already finished in DIR

A thin call of ``rayoodkd compare`` (every run a full TorchTrainer run with Ray Data and MLflow, an MLflow
child run of the comparison) with one run at a time, so that wall times are those of an idle machine. Prints
compare's table (per preset, mean ± std over seeds of the final test top-1, the best validation top-1, the
test top-1 of the best-validation student, wall time and img/s), then the MosaicKD − KD gaps the issue asks
about (same OOD corpus, equal student steps).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from rayoodkd.compare import Entry, run_compare

PRESETS = ("mnist-kd-letters", "mnist-mosaickd-letters", "mnist-kd-textures", "mnist-mosaickd-textures")
GAPS = (
    ("test/top1", "test (final)"),
    ("best_val/top1", "best val"),
    ("test/top1_at_best_val", "test @ best val"),
)


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
    result = run_compare(
        [Entry.parse(preset) for preset in args.presets],
        args.seeds,
        [f"storage_path={storage / 'runs'}", *args.override],
        output=storage / "compare",
        max_concurrent=1,
    )
    by_preset = {
        preset: [r.metrics for r in result.results if r.label == preset and r.status == "FINISHED"]
        for preset in args.presets
    }
    for corpus in ("letters", "textures"):
        kd, mosaic = by_preset.get(f"mnist-kd-{corpus}"), by_preset.get(f"mnist-mosaickd-{corpus}")
        if kd and mosaic:
            for key, label in GAPS:
                gap = statistics.mean(m[key] for m in mosaic) - statistics.mean(m[key] for m in kd)
                print(f"MosaicKD − KD on {corpus:8s} {label:15s}: {gap:+.2f} points")


if __name__ == "__main__":
    main()
