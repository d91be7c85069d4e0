"""DDP gradient traffic of the paper-scale presets, measured, and what it costs at N GPUs.

    python bench/ddp_traffic.py                                   # every preset of bench/gpu.py
    python bench/ddp_traffic.py --gpus 8 --bus-gbs 350 20         # NVSwitch-class and PCIe-class all-reduce

Each preset runs for 2 outer iterations on 2 Ray Train workers (CPU, batch 4, fake data: bench/gpu.py's
random teacher and random images), and the engine's own count of the gradient bytes every DDP wrapper
all-reduces gives the megabytes per outer iteration (``ddp/allreduce_mb_per_step``; it depends on the
players' parameter counts and on how often the method steps each, not on the batch). A ring all-reduce
moves 2·(N − 1)/N of those bytes through every GPU's link, so at a bus bandwidth of ``--bus-gbs`` the
communication takes that many seconds per outer iteration, against ``--step-s`` of compute on one GPU (by
default the independent MosaicKD reproduction's ~2,650 student img/s for wrn40_2 → wrn16_1 and ~930 img/s for
resnet34 → resnet18, i.e. 5 KD steps × 512 images per outer iteration). The efficiency printed assumes no
overlap of communication with the backward pass (DDP overlaps its buckets), so it is a lower bound.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from gpu import PRESETS, fake_teacher

from rayoodkd.config import resolve_config
from rayoodkd.launch import launch

# seconds of compute per outer iteration on one GPU, from the reproduction's student img/s (2,560 KD images)
STEP_SECONDS = {
    "cifar100-mosaickd-cifar10": 2560 / 2650,
    "cifar100-mosaickd-cifar10-resnet": 2560 / 930,
}


def measure(preset: str, work: Path) -> float:
    """The run's all-reduced megabytes per outer iteration on 2 CPU workers."""
    from mlflow.tracking import MlflowClient

    arch, classes, normalizer = PRESETS[preset]
    teacher = fake_teacher(arch, classes, normalizer, work / f"teacher-{preset}.pt", torch.device("cpu"))
    rng = np.random.default_rng(0)
    np.save(work / "ood.npy", rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    np.savez(
        work / "eval.npz",
        images=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
        labels=rng.integers(0, classes, 32),
    )
    base = resolve_config(preset)
    overrides = [
        f"teacher.checkpoint={teacher}",
        "num_workers=2",
        "use_gpu=false",
        "max_steps=2",
        "eval.every=2",
        "data.batch_size=4",
        f"data.val={{source: {work / 'eval.npz'}}}",
        f"data.test={{source: {work / 'eval.npz'}}}",
        f"storage_path={work / 'runs'}",
        f"run_name={preset}",
        "system_metrics=false",
    ]
    if base.data.ood is not None:
        overrides.append(f"data.ood={{source: {work / 'ood.npy'}, labelled: false}}")
    if "batch_size" in type(base.method_config()).model_fields:
        overrides.append(f"{base.method}.batch_size=4")
    summary = launch(resolve_config(preset, overrides))
    tags = MlflowClient(summary.tracking_uri).get_run(summary.mlflow_run_id).data.tags
    return float(tags["ddp/allreduce_mb_per_step"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--bus-gbs", nargs="+", type=float, default=[350.0, 20.0], help="all-reduce bus GB/s")
    parser.add_argument("--step-s", type=float, default=None, help="compute s/iteration (default: see above)")
    args = parser.parse_args()
    ring = 2 * (args.gpus - 1) / args.gpus
    header = " | ".join(f"comm at {gbs:g} GB/s (ms) | efficiency" for gbs in args.bus_gbs)
    print(f"| preset | MB all-reduced per outer iteration | compute s/iteration | {header} |")
    print("|---|---|---|" + "---|---|" * len(args.bus_gbs))
    for preset in args.presets:
        with tempfile.TemporaryDirectory(prefix="rayoodkd-traffic-") as scratch:
            megabytes = measure(preset, Path(scratch))
        compute = args.step_s or STEP_SECONDS.get(preset)
        cells = []
        for gbs in args.bus_gbs:
            seconds = ring * megabytes / 1e3 / gbs
            efficiency = f"{compute / (compute + seconds):.4f}" if compute else "–"
            cells.append(f"{seconds * 1e3:.2f} | {efficiency}")
        compute_text = f"{compute:.2f}" if compute else "–"
        print(f"| {preset} | {megabytes:.2f} | {compute_text} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
