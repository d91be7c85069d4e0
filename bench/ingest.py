"""Ingest against consumption: what Ray Data reads, decodes and augments per second, next to what the
student learns from per second (issue #19 goal 5).

    python bench/ingest.py                                  # the demo corpus and 50,000 CIFAR-shaped PNGs
    python bench/ingest.py --images 5000 --workdir /tmp/ingest

Corpora: the demo's font-rendered letters (builtin, 28 px gray, 20,000 images as the demo reads them), and
``--images`` CIFAR-shaped images (32 x 32 RGB PNGs: random crops, at several scales, of the photos bundled
with scikit-image and scikit-learn) as an image folder and as parquet shards of the same PNG bytes, written
once under ``--workdir``. Each is read through the run's own pipeline: ``load_corpus`` (read, hash split,
decode, resize), then ``iter_torch_batches`` with the default shuffle buffer and prefetch, as a worker's
stream reads it. Per corpus, in images/s over one whole pass:

- ``read+decode``: the lazy pipeline (``data.materialize=false``: every epoch decodes again);
- ``+augment``: the same with the stream's augmentation (``augment_batch``, one thread, on the CPU, where a
  CPU worker runs it; on a GPU it runs on the device);
- ``materialised``: a pass over the decoded dataset in the object store (every epoch but the first with the
  default ``data.materialize=true``), and the object store memory it takes.

Consumption: images/s of one KD step (frozen teacher forward, student forward and backward, SGD step) with
one thread, as one CPU worker of this machine runs it: the demo's LeNet-5 -> LeNet-5-half at batch 128 and
the paper-scale WRN-40-2 -> WRN-16-1 (100 classes) at batch 256. The two sides are measured one after the
other, each with the machine to itself; in a run they share its cores.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rayoodkd.augment import augment_batch, unit_images
from rayoodkd.config import resolve_config
from rayoodkd.data.config import CorpusConfig
from rayoodkd.data.readers import load_corpus
from rayoodkd.models import build_classifier

SHARD_ROWS = 5000


def _photos() -> list[np.ndarray]:
    """The RGB photos that ship with scikit-image and scikit-learn (no download)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")]
    photos.append(skimage.data.stereo_motorcycle()[0])
    photos.extend(load_sample_images().images)
    return [p for p in photos if p.ndim == 3 and p.shape[2] == 3]


def cifar_shaped_pngs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` 32 x 32 RGB PNGs: square crops of 32-256 px at random places of the photos, resized."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    encoded = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(32, min(256, *photo.shape[:2]) + 1))
        top, left = (int(rng.integers(0, photo.shape[d] - side + 1)) for d in (0, 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((32, 32), Image.BILINEAR)
        buffer = io.BytesIO()
        crop.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def write_corpora(workdir: Path, count: int) -> tuple[Path, Path]:
    """The image folder and the parquet directory of ``count`` CIFAR-shaped PNGs (written once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, parquet = workdir / f"folder-{count}", workdir / f"parquet-{count}"
    if folder.is_dir() and parquet.is_dir():
        return folder, parquet
    pngs = cifar_shaped_pngs(count)
    for directory in (folder, parquet):
        directory.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(pngs):
        (folder / f"{index:06d}.png").write_bytes(data)
    for start in range(0, count, SHARD_ROWS):
        table = pa.table({"image": pa.array(pngs[start : start + SHARD_ROWS], type=pa.binary())})
        pq.write_table(table, parquet / f"part-{start // SHARD_ROWS:04d}.parquet")
    return folder, parquet


def _pass(
    dataset, batch_size: int, shuffle_buffer: int, prefetch: int, augment: str | None
) -> tuple[int, float]:
    """Images and seconds of one whole pass, as a worker's stream iterates (and augments) it."""
    generator = torch.Generator().manual_seed(0)
    images, start = 0, time.perf_counter()
    for batch in dataset.iter_torch_batches(
        batch_size=batch_size, local_shuffle_buffer_size=shuffle_buffer or None, prefetch_batches=prefetch
    ):
        if augment is not None:  # as a CPU worker does: to float32 in [0, 1], then augment
            augment_batch(unit_images(batch["image"]), augment, generator)
        images += len(batch["image"])
    return images, time.perf_counter() - start


def ingest_rates(corpus: CorpusConfig, image_size: int, channels: int, augment: str, cache_dir: str) -> dict:
    data = resolve_config("demo").data
    options = {
        "batch_size": data.batch_size,
        "shuffle_buffer": data.shuffle_buffer,
        "prefetch": data.prefetch_batches,
    }
    lazy = load_corpus(corpus, image_size=image_size, channels=channels, cache_dir=cache_dir)
    rows, seconds = _pass(lazy, augment=None, **options)
    rates = {"images": rows, "read+decode": rows / seconds}
    rows, seconds = _pass(lazy, augment=augment, **options)
    rates["+augment"] = rows / seconds
    materialised = lazy.materialize()
    rates["object store MB"] = materialised.size_bytes() / 2**20
    rows, seconds = _pass(materialised, augment=None, **options)
    rates["materialised"] = rows / seconds
    return rates


def consumption(
    teacher_arch: str, student_arch: str, classes: int, size: int, channels: int, batch: int
) -> float:
    """Images/s of KD steps (teacher forward, student forward + backward, SGD) with one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = build_classifier(
            teacher_arch, num_classes=classes, in_channels=channels, image_size=size
        ).eval()
        student = build_classifier(student_arch, num_classes=classes, in_channels=channels, image_size=size)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
        images = torch.rand(batch, channels, size, size)
        for step in range(12):
            if step == 2:  # after two warm-up steps
                start = time.perf_counter()
            with torch.no_grad():
                target = teacher(images).softmax(1)
            loss = torch.nn.functional.cross_entropy(student(images), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return 10 * batch / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=50_000, help="CIFAR-shaped PNGs to write and read")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rayoodkd-ingest"))
    args = parser.parse_args()

    import ray

    from rayoodkd.console import quiet_python_loggers

    ray.init(configure_logging=False, log_to_driver=False)
    quiet_python_loggers()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False

    demo = resolve_config("demo")
    started = time.perf_counter()
    folder, parquet = write_corpora(args.workdir, args.images)
    seconds = time.perf_counter() - started
    print(f"CIFAR-shaped corpora of {args.images} PNGs under {args.workdir} ({seconds:.0f} s)")
    cache = str(args.workdir / "cache")
    consumes = {
        "demo": consumption("lenet5", "lenet5_half", 10, 28, 1, demo.data.batch_size),
        "cifar": consumption("wrn40_2", "wrn16_1", 100, 32, 3, 256),
    }
    corpora = [
        ("demo letters (builtin, 28 px gray)", demo.data.ood, 28, 1, demo.data.augment, "demo"),
        (
            f"{args.images} PNGs, image folder (32 px RGB)",
            CorpusConfig(source=str(folder), labelled=False),
            32,
            3,
            "crop_flip",  # the paper-scale presets' augmentation
            "cifar",
        ),
        (
            f"{args.images} PNGs, parquet (32 px RGB)",
            CorpusConfig(source=str(parquet), labelled=False, label_column=None),
            32,
            3,
            "crop_flip",
            "cifar",
        ),
    ]
    print(f"{os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.2f}")
    print(
        "| corpus | images | read+decode img/s | +augment img/s | materialised img/s | object store MB "
        "| student consumes img/s (1 thread) | ratio (+augment / consumes) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for label, corpus, size, channels, augment, pair in corpora:
        rates = ingest_rates(corpus, size, channels, augment, cache)
        eaten = consumes[pair]
        print(
            f"| {label} | {rates['images']} | {rates['read+decode']:,.0f} | {rates['+augment']:,.0f} | "
            f"{rates['materialised']:,.0f} | {rates['object store MB']:,.1f} | {eaten:,.0f} | "
            f"{rates['+augment'] / eaten:.1f} |",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
