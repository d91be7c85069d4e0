"""Stages budgeted in epochs of a per-epoch selection (engine v2 for KD3-style methods): scanning a stream,
selecting rows, ranks agreeing on the epoch length, exact resumption inside an epoch — exercised through
``dfnd`` (teacher-only confidence selection on web images, the KD3 paper's DFND-style baseline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ray_run_config, small_context
from mlflow.tracking import MlflowClient

from rayoodkd.config import DataConfig, build_section, resolve_config
from rayoodkd.engine.checkpoint import load_state
from rayoodkd.engine.loop import InjectedFailure, run_worker
from rayoodkd.engine.session import LocalSession
from rayoodkd.engine.streams import DeviceStreams, tensor_source
from rayoodkd.launch import launch
from rayoodkd.methods.selection import class_adaptive_thresholds, select_confident

DFND = [
    "method=dfnd",
    "data.ood=null",
    "data.web={source: letters, num_images: 800, labelled: false}",
    "data.batch_size=16",
    "eval.every=5",
    "log_every=1",
    "dfnd.epochs=2",
    # The untrained test teacher is near-uniform (top probability about 0.11 on letters): a cut at its
    # median keeps about half of the rows.
    "dfnd.p_cutoff=0.1099",
    "dfnd.scan_batch_size=64",
    "dfnd.eval_every_epochs=null",
]


def test_a_scan_visits_every_row_once_with_stable_ids_and_a_selection_sets_the_epoch() -> None:
    images = torch.randint(0, 256, (30, 1, 8, 8), generator=torch.Generator().manual_seed(0)).float() / 255
    data = build_section(DataConfig, {})
    streams = DeviceStreams(
        {"web": tensor_source(images, torch.arange(30), batch_size=4, seed=0)},
        small_context(batch_size=4),
        {"web": data.transform("web")},
    )
    first = list(streams.scan("web", batch_size=7, row_ids=True))
    ids = torch.cat([batch["row_id"] for batch in first])
    assert len(ids) == 30 == len(set(ids.tolist()))
    assert torch.equal(torch.cat([b["label"] for b in first]), torch.arange(30))
    assert torch.equal(torch.cat([b["row_id"] for b in streams.scan("web", 30, row_ids=True)]), ids)

    unit = torch.cat([batch["unit"] for batch in first])
    steps = streams.use_selection("web", unit[:10], torch.arange(10), epoch=0)
    assert steps == 2  # 10 selected rows, batches of 4
    drawn = torch.cat([streams.next("web", augment=False)["label"] for _ in range(2)])
    assert set(drawn.tolist()) <= set(range(10)) and len(set(drawn.tolist())) == 8


def test_class_adaptive_thresholds_and_selection_follow_flexmatch() -> None:
    thresholds = class_adaptive_thresholds(torch.tensor([10, 5, 0]), p_cutoff=0.9)
    torch.testing.assert_close(thresholds, torch.tensor([0.9, 0.9 * 0.5 / 1.5, 0.0]))
    probabilities = torch.tensor([[0.95, 0.05, 0.0], [0.8, 0.2, 0.0], [0.35, 0.65, 0.0], [0.2, 0.1, 0.7]])
    confidence, prediction = probabilities.max(1)
    ctx = small_context()
    ctx.num_classes = 3
    keep, used = select_confident(confidence, prediction, 0.9, class_adaptive=True, ctx=ctx)
    assert keep.tolist() == [True, False, True, True]
    torch.testing.assert_close(used, class_adaptive_thresholds(torch.tensor([2, 1, 1]), p_cutoff=0.9))


def _web(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.rand(n, 1, 28, 28, generator=generator), torch.full((n,), -1)


def _run(run_dir: Path, teacher: Path, *extra: str, resume: bool = False) -> LocalSession:
    val = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(6)), torch.randint(0, 10, (32,))
    session = LocalSession(
        streams={"web": _web(200)},
        eval_sets={"val": val, "test": val},
        checkpoint_root=run_dir,
        resume_from=run_dir if resume else None,
    )
    cfg = resolve_config("demo", [f"teacher.checkpoint={teacher}", *DFND, "dfnd.p_cutoff=0.1144", *extra])
    run_worker({"config": cfg.model_dump(mode="json"), "teacher_path": str(teacher)}, session)
    return session


def test_epochs_of_a_selection_run_and_resume_inside_an_epoch_exactly(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    straight = _run(tmp_path / "straight", tiny_teacher)
    steps_per_epoch = int(straight.reports[0]["select/steps"])
    assert steps_per_epoch >= 2
    assert straight.reports[-1]["step"] == 2 * steps_per_epoch
    assert 0 < straight.reports[0]["select/fraction"] < 1

    fail_at = steps_per_epoch + 2  # inside the second epoch
    killed = tmp_path / "killed"
    with pytest.raises(InjectedFailure):
        _run(killed, tiny_teacher, f"debug.fail_at_step={fail_at}", f"eval.every={steps_per_epoch + 1}")
    resumed = _run(
        killed,
        tiny_teacher,
        f"debug.fail_at_step={fail_at}",
        f"eval.every={steps_per_epoch + 1}",
        resume=True,
    )
    assert resumed.reports[-1]["resumed_from_step"] == steps_per_epoch + 1
    reference = _run(tmp_path / "reference", tiny_teacher, f"eval.every={steps_per_epoch + 1}")
    final_a = load_state(reference.checkpoints[-1])["players"]["student"]
    final_b = load_state(resumed.checkpoints[-1])["players"]["student"]
    for name, tensor in final_a.items():
        torch.testing.assert_close(final_b[name], tensor, rtol=0, atol=0)


@pytest.mark.ray
def test_two_ranks_with_different_selections_end_every_epoch_together(
    tmp_path: Path, tiny_teacher: Path, ray_local
) -> None:
    cfg = ray_run_config(tmp_path, tiny_teacher, "run_name=dfnd", "num_workers=2", *DFND)
    summary = launch(cfg)
    state = load_state(summary.checkpoint)
    sizes = [len(rank["streams"]["selections"]["web"]["images"]) for rank in state["ranks"]]
    client = MlflowClient(summary.tracking_uri)
    run_id = summary.mlflow_run_id
    steps = [m.value for m in client.get_metric_history(run_id, "select/steps")]
    assert len(steps) == 2 and steps[-1] == min(sizes) // 16
    assert summary.steps == sum(steps)
    sizes_seen = [m.value for m in client.get_metric_history(run_id, "select/size")]
    assert sizes_seen[-1] == sum(sizes)
    assert client.get_run(run_id).data.metrics["select/scanned"] == 800  # every row once, over both ranks
