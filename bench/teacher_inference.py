"""The frozen teacher's no-grad forward: as loaded against fused (``teacher_inference``), per architecture.

    python bench/teacher_inference.py                            # wrn40_2 and resnet34, 32 px, B = 128
    python bench/teacher_inference.py --archs wrn40_2 --compile   # also the compiled, weight-frozen copy

What each row runs is what the engine runs for a teacher's KD targets: ``as_loaded`` is the module as
loaded (``channels_last=true`` turns its weights and the batch to NHWC), ``fused`` is
``rayoodkd.engine.teacher_inference.route_no_grad_forwards`` (BatchNorm folded into the convolutions,
channels-last weights; ``--compile`` adds ``compile=true``'s inductor weight freezing). The weights are
random, the BatchNorm statistics come from random images. Prints a markdown table: milliseconds per
forward (median of ``--reps`` after two warm-ups), the ratio to ``as_loaded`` in the same precision, and
the largest logit difference from it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from rayoodkd.engine.teacher_inference import route_no_grad_forwards
from rayoodkd.models import build_classifier


def teacher(arch: str, classes: int, channels: int, size: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = build_classifier(arch, num_classes=classes, in_channels=channels, image_size=size).to(device)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, channels, size, size, device=device))
    return model.eval().requires_grad_(False)


def milliseconds(
    forward: Callable[[Tensor], Tensor], x: Tensor, reps: int, precision: str
) -> tuple[float, Tensor]:
    """Median milliseconds of ``forward(x)`` under no_grad (and autocast for bf16/fp16), and its output."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(x.device.type, dtype) if dtype else nullcontext()
    times = []
    with torch.no_grad(), autocast:
        for _ in range(2):
            out = forward(x)
        for _ in range(reps):
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = forward(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times), out.float()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["wrn40_2", "resnet34"])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also the compiled, weight-frozen fused copy")
    parser.add_argument(
        "--matmul", action="store_true", help="first, the fp32 matmul rate on these threads (a ceiling)"
    )
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    shape = (opts.batch_size, opts.channels, opts.image_size, opts.image_size)
    threads = torch.get_num_threads()
    print(f"device {device}, threads {threads}, batch {list(shape)}, torch {torch.__version__}\n")
    if opts.matmul:
        for n in (2048, 4096):
            a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
            ms, _ = milliseconds(lambda x, b=b: x @ b, a, opts.reps, "fp32")
            print(f"fp32 matmul {n}×{n}: {2 * n**3 / ms / 1e6:.0f} GFLOP/s (median of {opts.reps})")
        print()
    print("| arch | precision | teacher | ms / forward | vs as_loaded | max logit diff |")
    print("|---|---|---|---|---|---|")
    settings = ["as_loaded", "as_loaded channels_last", "fused"] + (
        ["fused compiled"] if opts.compile else []
    )
    for arch in opts.archs:
        x = torch.randn(*shape, device=device)
        for precision in opts.precisions:
            baseline: tuple[float, Tensor] | None = None
            for setting in settings:
                model = teacher(arch, opts.classes, opts.channels, opts.image_size, device)
                batch = x
                if setting == "as_loaded channels_last":
                    model.to(memory_format=torch.channels_last)
                    batch = x.contiguous(memory_format=torch.channels_last)
                elif setting.startswith("fused"):
                    reason = route_no_grad_forwards(
                        model, (2, *shape[1:]), compile=setting == "fused compiled"
                    )
                    if reason:
                        print(f"| {arch} | {precision} | {setting} | stays as loaded: {reason} | | |")
                        continue
                ms, out = milliseconds(model, batch, opts.reps, precision)
                baseline = baseline or (ms, out)
                diff = (out - baseline[1]).abs().max().item()
                print(
                    f"| {arch} | {precision} | {setting} | {ms:.1f} | {ms / baseline[0]:.2f} | {diff:.1e} |"
                )
                if setting == "fused compiled":
                    torch._dynamo.reset()


if __name__ == "__main__":
    main()
