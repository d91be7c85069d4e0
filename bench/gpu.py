"""Paper-scale presets on fake data at full size: seconds per outer iteration and student img/s for each
precision × eager/compiled, in one process on the first GPU (or the CPU).

    python bench/gpu.py                                   # every preset below, every mode, ≤ --budget-s
    python bench/gpu.py --presets cifar100-mosaickd-cifar10 --modes fp32 fp16 fp16-compiled --steps 50
    python bench/gpu.py --tiny                            # CPU smoke: batch 4, 1 + 1 steps, fp32 and bf16

Each run is the engine's own ``Worker`` on a ``LocalSession`` (exactly the step a Ray Train worker runs,
without Ray Data): the preset as shipped, with a randomly initialised teacher of the preset's architecture
(its BatchNorm statistics set from random images, so that its softmax is not degenerate) and random
uint8 images as the out-of-domain corpus. ``--warmup`` outer iterations (compilation happens there) are not
timed. A mode is a precision (``fp32``; ``bf16`` and ``fp16``: ``amp=true`` with that ``amp_dtype``; fp16
needs CUDA) and optionally ``-compiled`` (``compile=true``). The whole script stops starting new runs once
``--budget-s`` has passed and says which it skipped.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from rayoodkd.config import resolve_config
from rayoodkd.engine.loop import Worker
from rayoodkd.engine.session import LocalSession
from rayoodkd.models import build_classifier
from rayoodkd.teacher_io import TeacherInfo, save_teacher

CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
# preset -> the teacher its checkpoint path names: (architecture, classes, normaliser)
PRESETS = {
    "cifar100-mosaickd-cifar10": ("wrn40_2", 100, CIFAR100),
    "cifar100-mosaickd-cifar10-resnet": ("resnet34", 100, CIFAR100),
    "cifar10-tadfkd": ("resnet34", 10, CIFAR10),
    "cifar100-tadfkd": (
        "resnet34",
        100,
        CIFAR10,
    ),  # the official TA-DFKD normalises with CIFAR-10's statistics
}
MODES = ("fp32", "bf16", "fp16", "fp32-compiled", "bf16-compiled", "fp16-compiled")
PRECISION = {
    "fp32": [],
    "bf16": ["amp=true", "amp_dtype=bfloat16"],
    "fp16": ["amp=true", "amp_dtype=float16"],
}


def fake_teacher(arch: str, classes: int, normalizer: tuple, path: Path, device: torch.device) -> Path:
    """A random ``arch`` teacher whose BatchNorm statistics come from random images, saved as a checkpoint."""
    torch.manual_seed(0)
    model = build_classifier(arch, num_classes=classes, in_channels=3, image_size=32).to(device)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(64, 3, 32, 32, device=device))
    return save_teacher(path, model.cpu().eval(), TeacherInfo(arch, classes, 3, 32, *normalizer))


def run_mode(preset: str, mode: str, args: argparse.Namespace, work: Path, device: torch.device) -> dict:
    """One timed run -> ``{"seconds": median s/iteration, "images": student images per iteration}``."""
    arch, classes, normalizer = PRESETS[preset]
    base = resolve_config(preset)
    teacher_file = work / f"teacher-{preset}.pt"
    if not teacher_file.exists():
        fake_teacher(arch, classes, normalizer, teacher_file, device)
    precision, _, compiled = mode.partition("-")
    steps = args.warmup + args.steps
    overrides = [
        f"teacher.checkpoint={teacher_file}",
        f"max_steps={steps}",
        f"eval.every={steps}",
        f"use_gpu={str(device.type == 'cuda').lower()}",
        f"channels_last={str(args.channels_last).lower()}",
        f"compile={str(bool(compiled)).lower()}",
        "system_metrics=false",
        *PRECISION[precision],
    ]
    if args.batch_size:
        overrides.append(f"data.batch_size={args.batch_size}")
        if "batch_size" in type(base.method_config()).model_fields:
            overrides.append(f"{base.method}.batch_size={args.batch_size}")
    cfg = resolve_config(preset, overrides)
    batch = cfg.data.batch_size
    generator = torch.Generator().manual_seed(0)
    ood = torch.randint(0, 256, (8 * batch, 3, 32, 32), dtype=torch.uint8, generator=generator)
    evaluated = (
        torch.rand(64, 3, 32, 32, generator=generator),
        torch.randint(0, classes, (64,), generator=generator),
    )
    session = LocalSession(
        streams={"ood": (ood, torch.full((len(ood),), -1))},
        eval_sets={"val": evaluated, "test": evaluated},
        checkpoint_root=work / f"{preset}-{mode}",
        device=device,
    )
    worker = Worker(
        {
            "config": cfg.model_dump(mode="json"),
            "teacher_path": str(teacher_file),
            "tracking_uri": None,
            "mlflow_run_id": None,
        },
        session,
    )
    seconds, images = [], []
    train_step = worker.method.train_step

    def timed(data: object) -> dict:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        metrics = train_step(data)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
        images.append(float(metrics["images"]))
        return metrics

    worker.method.train_step = timed
    worker.run()
    timed_seconds = seconds[args.warmup :]
    return {"seconds": statistics.median(timed_seconds), "images": statistics.mean(images[args.warmup :])}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument(
        "--modes", nargs="+", default=None, choices=MODES, help="default: all (fp16: CUDA only)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed outer iterations per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed outer iterations first (compilation)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--channels-last", action="store_true", help="channels_last=true for every run")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no run after this many seconds")
    parser.add_argument(
        "--tiny", action="store_true", help="CPU smoke test: batch 4, 1 + 1 steps, fp32/bf16 eager"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.batch_size, args.steps, args.warmup = args.batch_size or 4, 1, 1
        args.modes = args.modes or ["fp32", "bf16"]
    modes = args.modes or [m for m in MODES if device.type == "cuda" or not m.startswith("fp16")]
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"device: {name}; torch {torch.__version__}")
    print("| preset | mode | batch | s / outer iteration | student img/s |\n|---|---|---|---|---|")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rayoodkd-gpu-bench-") as scratch:
        for preset in args.presets:
            for mode in modes:
                if time.perf_counter() - started > args.budget_s:
                    print(f"| {preset} | {mode} | | skipped (--budget-s {args.budget_s:.0f} spent) | |")
                    continue
                figures = run_mode(preset, mode, args, Path(scratch), device)
                batch = args.batch_size or resolve_config(preset).data.batch_size
                print(
                    f"| {preset} | {mode} | {batch} | {figures['seconds']:.3f} "
                    f"| {figures['images'] / figures['seconds']:,.0f} |",
                    flush=True,
                )
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
