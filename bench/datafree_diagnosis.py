"""Why a data-free run fails with some teachers (issue #20): measurements on the finished panel runs.

    python bench/datafree_diagnosis.py --storage S                  # S: the --storage of teacher_panel.py
    python bench/datafree_diagnosis.py --storage S --methods mnist-dfq --teachers lenet5_bn cnn_tiny-long

For every finished (method, teacher, seed) run of ``bench/teacher_panel.py``, its final checkpoint is
restored in this process (``rayoodkd.evaluate.restore_worker``) and 1,024 generator samples, drawn as the
method draws its KD batches, are compared with the 1,000 real MNIST-5k test digits:

- agreement of student and teacher (top-1, %) on the generated images and on the real digits: a student
  that follows the teacher on what it was trained on but not on real digits was given the wrong images (the
  generator), one that follows it on neither did not learn (optimisation);
- the teacher on the generated images: the entropy of its predicted classes (1 = all ten classes equally
  often) and its mean top-1 probability, next to that probability on real digits;
- L_BN (the ``sum`` variant, spec §1.3) of a generated batch and of a real batch against the teacher's
  running statistics: how far each is from what the BN statistics prior asks for;
- the student's worst class on real digits (recall) and that class's share of the generated images.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import teacher_panel  # bench/, next to this script
import torch
from torch import Tensor

from rayoodkd.compare import Entry, plan
from rayoodkd.engine.checkpoint import newest_intact
from rayoodkd.evaluate import restore_worker
from rayoodkd.methods.losses import BNStatistics

SAMPLES = 1024


def generated(method, count: int) -> Tensor:
    """``count`` generator samples as the method's KD step sees them (normalised teacher input)."""
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        images = method.generator(torch.randn(count, method.cfg.nz, generator=noise))
    if getattr(method, "output_space", "unit") == "unit":
        images = method.ctx.normalize(images.clamp(0, 1))
    return images


def bn_distance(teacher, images: Tensor) -> float:
    stats = BNStatistics(teacher, "sum")
    try:
        with torch.enable_grad():  # the hooks record grad-enabled forwards only
            teacher(images)
        return float(stats.loss())
    finally:
        for handle in stats.handles:
            handle.remove()


def diagnose(checkpoint: str) -> dict[str, float]:
    worker = restore_worker(checkpoint)
    method, teacher = worker.method, worker.teacher
    student = method.deployable_student().eval()
    fake = generated(method, SAMPLES)
    batches = list(worker.test)
    real, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    with torch.no_grad():
        t_fake, s_fake = teacher(fake).float(), student(fake).float()
        t_real, s_real = teacher(real).float(), student(real).float()
    fake_classes = t_fake.argmax(1)
    shares = torch.bincount(fake_classes, minlength=t_fake.shape[1]).float() / len(fake_classes)
    entropy = -(shares[shares > 0] * shares[shares > 0].log()).sum() / math.log(t_fake.shape[1])
    correct = s_real.argmax(1) == labels
    recalls = torch.stack([correct[labels == c].float().mean() for c in range(t_real.shape[1])])
    worst = int(recalls.argmin())
    return {
        "student_test": 100 * correct.float().mean().item(),
        "agree_fake": 100 * (s_fake.argmax(1) == fake_classes).float().mean().item(),
        "agree_real": 100 * (s_real.argmax(1) == t_real.argmax(1)).float().mean().item(),
        "class_entropy_fake": entropy.item(),
        "teacher_conf_fake": t_fake.softmax(1).amax(1).mean().item(),
        "teacher_conf_real": t_real.softmax(1).amax(1).mean().item(),
        "bn_fake": bn_distance(teacher, fake),
        "bn_real": bn_distance(teacher, real),
        "worst_class": worst,
        "worst_recall": 100 * recalls[worst].item(),
        "worst_share_fake": 100 * shares[worst].item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storage", type=Path, required=True, help="teacher_panel.py's --storage")
    parser.add_argument("--methods", nargs="+", default=["mnist-dfq", "mnist-tadfkd"])
    parser.add_argument("--teachers", nargs="+", default=list(teacher_panel.PANEL))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = parser.parse_args()
    import ray

    from rayoodkd.console import quiet_python_loggers

    ray.init(configure_logging=False, log_to_driver=False)
    quiet_python_loggers()
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    print(
        "| method | teacher | seed | student test | agreement on generated | agreement on real "
        "| teacher class entropy, generated | teacher confidence generated / real | L_BN generated / real "
        "| student's worst class: recall, share of generated |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for method in args.methods:
        entries = [Entry.parse(f"{method} {teacher_panel.PANEL[t][0]}".strip()) for t in args.teachers]
        name = f"teacher-panel-{method}"  # and its run directories, as rayoodkd.compare lays them out
        cells = plan(entries, args.seeds, [f"storage_path={args.storage / 'runs'}"], name)
        trials = args.storage / "runs" / name / "trials"
        for teacher, cell in zip([t for t in args.teachers for _ in args.seeds], cells, strict=True):
            checkpoint = newest_intact(str(trials / cell.run_name)).directory
            if checkpoint is None or not checkpoint.endswith(f"step_{cell.config['max_steps']:07d}"):
                continue  # not finished (yet)
            d = diagnose(checkpoint)
            print(
                f"| {method} | {teacher} | {cell.seed} | {d['student_test']:.1f} | {d['agree_fake']:.1f} | "
                f"{d['agree_real']:.1f} | {d['class_entropy_fake']:.3f} | "
                f"{d['teacher_conf_fake']:.3f} / {d['teacher_conf_real']:.3f} | "
                f"{d['bn_fake']:.2f} / {d['bn_real']:.2f} | "
                f"{d['worst_class']}: {d['worst_recall']:.0f} %, {d['worst_share_fake']:.1f} % |",
                flush=True,
            )


if __name__ == "__main__":
    main()
