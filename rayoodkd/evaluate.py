"""``python -m rayoodkd.evaluate CHECKPOINT``: accuracy table of a run checkpoint on its in-domain sets.

    python -m rayoodkd.evaluate runs/kd_ood-20261123-231358/step_0001500
    python -m rayoodkd.evaluate runs/.../step_0001500 data.test.source=/data/cifar10 data.test.split=test

Rebuilds the method exactly as the run did (config and teacher from the checkpoint), restores every player,
and scores the teacher, the final deployable student and the student selected on validation: top-1, top-5
and agreement with the teacher (%), on ``data.val`` and ``data.test`` (overridable).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayoodkd.cli import prog
from rayoodkd.config import ConfigError, apply_overrides, build_config

if TYPE_CHECKING:
    import torch

    from rayoodkd.engine.loop import Worker


def restore_worker(checkpoint: str | Path, overrides: list[str] | None = None) -> Worker:
    """The run's worker rebuilt from a checkpoint in this process: the method exactly as the run built it
    (config and teacher from the checkpoint), every player restored, ``data.val`` and ``data.test``
    (overridable) read through Ray Data as the run's workers read theirs: kept in memory when they fit
    ``eval.cache_mb``, else streamed at every evaluation."""
    import torch

    from rayoodkd.data import describe_corpus, load_corpus
    from rayoodkd.engine.checkpoint import STATE_FILE, load_state
    from rayoodkd.engine.loop import Worker
    from rayoodkd.engine.session import LocalSession
    from rayoodkd.teacher import ensure_teacher
    from rayoodkd.teacher_io import read_teacher

    directory = Path(checkpoint)
    directory = directory.parent if directory.name == STATE_FILE else directory
    state = load_state(directory)
    cfg = build_config(apply_overrides(state["config"], overrides or []))
    teacher_path = ensure_teacher(cfg.teacher, cfg.data.cache_dir, log=lambda *_: None)
    _, info = read_teacher(teacher_path)
    if info.content_hash != state["teacher_hash"]:
        raise ValueError(f"teacher {teacher_path} is not the teacher this checkpoint was distilled from")
    eval_sets = {
        name: load_corpus(
            getattr(cfg.data, name),
            image_size=info.image_size,
            channels=info.channels,
            seed=cfg.seed,
            cache_dir=cfg.data.cache_dir,
        )
        for name in ("val", "test")
    }
    empty = (
        torch.zeros(0, info.channels, info.image_size, info.image_size),
        torch.zeros(0, dtype=torch.long),
    )
    session = LocalSession(
        {s: empty for s in ("ood", "web", "labelled")}, eval_sets, directory, resume_from=directory
    )
    worker = Worker({"config": cfg.model_dump(mode="json"), "teacher_path": str(teacher_path)}, session)
    for name in ("val", "test"):
        if getattr(worker, name).rows == 0:
            raise ValueError(f"data.{name}: no intact image in {describe_corpus(getattr(cfg.data, name))}")
    return worker


def evaluate_checkpoint(
    checkpoint: str | Path, overrides: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """``{"teacher" | "final" | "best_val": {"val/top1": ..., "test/top1": ...}}`` for a run checkpoint."""
    worker = restore_worker(checkpoint, overrides)
    student = worker.method.deployable_student()
    models: dict[str, Any] = {"teacher": worker.teacher, "final": student}
    if worker.best_student is not None:
        models["best_val"] = _with_weights(student, worker.best_student)
    table = {}
    for label, model in models.items():
        row = {}
        for split in ("val", "test"):
            row.update({f"{split}/{k}": v for k, v in worker.evaluate_on(split, model).items()})
        table[label] = row
    return table


def _with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(weights)
    return clone


def format_table(table: dict[str, dict[str, float]]) -> str:
    keys = {key for row in table.values() for key in row}
    columns = sorted(keys, key=lambda key: (not key.startswith("val/"), key))
    lines = ["model     " + "".join(f"{c:>15}" for c in columns)]
    for label, row in table.items():
        lines.append(f"{label:<10}" + "".join(f"{row.get(c, float('nan')):>15.2f}" for c in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog("evaluate"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a run checkpoint directory (…/step_NNNNNNN) or its state.pt")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.test.source=…"
    )
    parser.add_argument("--json", help="also write the table as JSON here")
    parser.add_argument(
        "--ray-logs", action="store_true", help="show Ray's own logging (start-up, Ray Data execution plans)"
    )
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).exists():
        print(f"error: checkpoint: no such file or directory: {args.checkpoint}", file=sys.stderr)
        return 2
    from rayoodkd.raystart import start_ray_for_reads

    start_ray_for_reads(args.ray_logs)  # before the reads of data.val and data.test
    try:
        table = evaluate_checkpoint(args.checkpoint, args.overrides)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(table))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
