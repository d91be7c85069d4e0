"""What KD3's per-epoch selection pass costs against its training steps, through the method's own code
(``KD3.begin_epoch`` and ``KD3.train_step`` on in-memory images), and what that means at the official scale.

    python bench/kd3_selection_cost.py                         # the paper pair, resnet34 → resnet18 at 32 px
    python bench/kd3_selection_cost.py --teacher lenet5 --student lenet5_half --channels 1 --size 28

Prints the seconds per image of a selection pass (teacher + deployable student, eval mode, no gradients) and
of a training step (teacher on x and x̃, student forward/backward on both, projector, embeddings), their
ratio, and the extrapolation to the official epoch: every worker scores its own 1/N of 1.28 M ImageNet-32
images, then trains on its share of the selection. Both passes are dense convolutions of the same networks,
so the ratio carries over to other hardware to first order; the absolute figures are this machine's.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from rayoodkd.config import DataConfig, build_section
from rayoodkd.engine.streams import DeviceStreams, tensor_source
from rayoodkd.methods.base import RunContext
from rayoodkd.methods.kd3 import KD3, KD3Config
from rayoodkd.models import build_classifier

OFFICIAL_WEB_IMAGES = 1_281_167


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default="resnet34")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--images", type=int, default=2048, help="images scored in the timed selection pass")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch")
    parser.add_argument("--scan-batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps (after one warm-up)")
    parser.add_argument("--selected", type=float, default=0.5, help="selected fraction for the extrapolation")
    args = parser.parse_args()
    torch.manual_seed(0)
    ctx = RunContext(
        device=torch.device("cpu"),
        rank=0,
        world_size=1,
        generator=torch.Generator().manual_seed(0),
        num_classes=args.classes,
        image_size=args.size,
        channels=args.channels,
        mean=(0.5,) * args.channels,
        std=(0.25,) * args.channels,
        max_steps=1,
        batch_size=args.batch_size,
    )
    shape = dict(num_classes=args.classes, in_channels=args.channels, image_size=args.size)
    teacher = build_classifier(args.teacher, **shape).eval()
    method = KD3(teacher, build_classifier(args.student, **shape), KD3Config(select=False), ctx)
    images = torch.rand(
        args.images, args.channels, args.size, args.size, generator=torch.Generator().manual_seed(1)
    )
    streams = DeviceStreams(
        {"web": tensor_source(images, torch.full((args.images,), -1), args.batch_size, seed=0)},
        ctx,
        {"web": build_section(DataConfig, {"augment": "crop_flip"}).transform("web")},
    )
    method.cfg.scan_batch_size = args.scan_batch_size
    started = time.perf_counter()
    method.begin_epoch(streams, epoch=0)
    scan_per_image = (time.perf_counter() - started) / args.images
    method.train_step(streams)
    started = time.perf_counter()
    for _ in range(args.steps):
        method.train_step(streams)
    train_per_image = (time.perf_counter() - started) / (args.steps * args.batch_size)
    print(
        f"{args.teacher} → {args.student}, {args.size} px, {torch.get_num_threads()} threads, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    print(f"selection pass : {scan_per_image * 1e3:.3f} ms/image ({args.images} images)")
    print(f"training step  : {train_per_image * 1e3:.3f} ms/image ({args.steps} steps of {args.batch_size})")
    print(f"ratio          : scoring an image costs {scan_per_image / train_per_image:.2f} of training on it")
    epoch_fraction = scan_per_image / (scan_per_image + args.selected * train_per_image)
    print(
        f"per epoch      : with {args.selected:.0%} of the web set selected, selection is "
        f"{epoch_fraction:.0%} of the epoch's compute"
    )
    for workers in (1, 4, 8):
        scan = OFFICIAL_WEB_IMAGES / workers * scan_per_image
        train = OFFICIAL_WEB_IMAGES * args.selected / workers * train_per_image
        print(
            f"1.28 M images, {workers} worker(s) at this machine's speed: selection {scan / 3600:.2f} h, "
            f"training {train / 3600:.2f} h per epoch"
        )


if __name__ == "__main__":
    main()
