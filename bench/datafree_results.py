"""Accuracy of the data-free presets, each run in one process (LocalSession, MNIST-5k in memory).

    python bench/datafree_results.py --config mnist-dfq
    python bench/datafree_results.py --config mnist-tadfkd --sweep tadfkd.gmm_threshold=0.3,0.5,0.7,0.9
    python bench/datafree_results.py --config mnist-tadfkd --sweep teacher.recipe.arch=lenet5_bn,cnn_tiny \
        --sweep seed=0,1                      # cross product; prints mean, std and min over the runs

The teacher recipe of the preset is trained once and cached (``rayoodkd.teacher.ensure_teacher``). Each run
goes through the engine's ``run_worker`` exactly as a one-worker Ray Train run would, with the val/test
splits of the builtin set held in memory and one intra-op thread. ``--sweep KEY=V1,V2,...`` repeats the run
for each value (several ``--sweep``: their cross product). Prints, per run: the final test top-1, the test
top-1 of the best-validation checkpoint, the teacher's test top-1 and the training seconds (evaluation
excluded); over several runs also the mean, std and min.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from rayoodkd.config import resolve_config
from rayoodkd.data import builtin_arrays
from rayoodkd.engine.loop import run_worker
from rayoodkd.engine.session import LocalSession
from rayoodkd.teacher import ensure_teacher


def _split(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = builtin_arrays(name, split)
    return torch.from_numpy(images).float().div(255).unsqueeze(1), torch.from_numpy(labels).long()


class _PrintingSession(LocalSession):
    """A LocalSession that prints every report's accuracy and loss terms as it arrives."""

    def report(self, metrics: dict, checkpoint_dir: object, step: int) -> None:
        super().report(metrics, checkpoint_dir, step)
        keys = sorted(k for k in metrics if k.startswith(("loss/", "select/", "val/top1", "pool/")))
        print(f"  step {step}: " + "  ".join(f"{k}={metrics[k]:.4g}" for k in keys), flush=True)


def run_one(config: str, overrides: list[str]) -> dict[str, float]:
    """One run of ``config`` with ``overrides`` -> its final figures."""
    cfg = resolve_config(config, [*overrides, "num_workers=1"])
    teacher = ensure_teacher(cfg.teacher)
    val, test = cfg.data.val, cfg.data.test
    session = _PrintingSession(
        streams={},
        eval_sets={"val": _split(val.source, val.split), "test": _split(test.source, test.split)},
        checkpoint_root=tempfile.mkdtemp(prefix="datafree-bench-"),
    )
    started = time.perf_counter()
    run_worker(
        {
            "config": cfg.model_dump(mode="json"),
            "teacher_path": str(teacher),
            "tracking_uri": None,
            "mlflow_run_id": None,
        },
        session,
    )
    last = session.reports[-1]
    return {
        "test_top1": last["test/top1"],
        "test_top1_at_best_val": last.get("test/top1_at_best_val", float("nan")),
        "teacher_test_top1": last["teacher/test_top1"],
        "train_seconds": last["train_seconds"],
        "wall_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="preset name or YAML file")
    parser.add_argument(
        "--sweep", action="append", default=[], help="KEY=V1,V2,...: a run per value (repeat: cross product)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs: list[list[str]] = [[]]
    for sweep in args.sweep:
        key, _, values = sweep.partition("=")
        runs = [[*run, f"{key}={value}"] for run in runs for value in values.split(",")]
    rows = []
    for extra in runs:
        print(f"{args.config} {' '.join([*args.overrides, *extra])}", flush=True)
        rows.append(
            {"run": " ".join(extra) or args.config, **run_one(args.config, [*args.overrides, *extra])}
        )
    print("\n| run | test top-1 | test top-1 @ best val | teacher | train s |\n|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['run']} | {row['test_top1']:.2f} | {row['test_top1_at_best_val']:.2f} "
            f"| {row['teacher_test_top1']:.2f} | {row['train_seconds']:.0f} |"
        )
    if len(rows) > 1:
        for key in ("test_top1", "test_top1_at_best_val"):
            values = [row[key] for row in rows]
            print(
                f"{key}: mean {statistics.mean(values):.2f}  std {statistics.stdev(values):.2f}  "
                f"min {min(values):.2f}  over {len(values)} runs"
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
