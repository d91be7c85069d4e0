"""KD-step throughput: a plain single-process PyTorch loop vs the engine in TorchTrainer (1 worker).

    python bench/kd_throughput.py --steps 600 --batch-size 256

Both sides run the same work: the frozen teacher and the student forward on a batch of OOD images, the KD
loss, backward and an SGD step, with the same models, batch size and augmentation. The plain loop reads
batches from in-memory tensors; the TorchTrainer side is a real ``python -m rayoodkd.train`` run
(``num_workers=1``) reading the corpus through Ray Data. Images/s counts the student's training images over
the time spent in training steps (start-up and evaluation excluded on both sides). Prints both figures and
their ratio (goal: >= 0.95).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from rayoodkd.augment import augment_batch
from rayoodkd.config import resolve_config
from rayoodkd.data import builtin_arrays
from rayoodkd.launch import launch
from rayoodkd.methods import kd_loss
from rayoodkd.models import build_classifier
from rayoodkd.teacher import ensure_teacher
from rayoodkd.teacher_io import load_teacher


def plain_loop(teacher_path: str, steps: int, batch_size: int, threads: int) -> float:
    torch.set_num_threads(threads)
    teacher, info = load_teacher(teacher_path)
    student = build_classifier("lenet5_half", num_classes=10, in_channels=1, image_size=28)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    images = torch.from_numpy(builtin_arrays("letters", None, 20000, 0)[0]).float().div(255).unsqueeze(1)
    mean, std = torch.tensor(info.mean).view(1, -1, 1, 1), torch.tensor(info.std).view(1, -1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    seen, elapsed = 0, 0.0
    for step in range(steps):
        started = time.perf_counter()
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = (augment_batch(images[index], "crop", generator) - mean) / std
        with torch.no_grad():
            t = teacher(x)
        loss = kd_loss(student(x), t, 5.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 20:  # warm-up excluded
            elapsed += time.perf_counter() - started
            seen += batch_size
    return seen / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in the plain loop (a worker gets 1 CPU)"
    )
    args = parser.parse_args()
    cfg = resolve_config("demo")
    teacher_path = str(ensure_teacher(cfg.teacher))
    plain = plain_loop(teacher_path, args.steps, args.batch_size, args.threads)
    with tempfile.TemporaryDirectory() as storage:
        run = resolve_config(
            "demo",
            [
                "num_workers=1",
                f"max_steps={args.steps}",
                f"eval.every={args.steps}",
                f"data.batch_size={args.batch_size}",
                f"storage_path={storage}",
                "resources.cpus_per_worker=1",
            ],
        )
        summary = launch(run, log=lambda *_: None)
    ratio = summary.images_per_second / plain
    print(f"plain single-process loop : {plain:8.0f} img/s")
    print(f"TorchTrainer, 1 worker    : {summary.images_per_second:8.0f} img/s")
    print(f"ratio                     : {ratio:8.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
