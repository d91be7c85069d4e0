"""Stages: a method declares phases (players trained, budget, selection); the engine runs them in order,
namespaces their metrics, reloads a stage's selected snapshot, and resumes inside a stage exactly.

The two-stage method under test is ``dfq_finetune`` (DFQ+: data-free DFQ, then fine-tuning on labelled
student-domain data), the AuG-KD paper's two-stage baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ray_run_config, run_in_process, small_context
from mlflow.tracking import MlflowClient

from rayoodkd.config import resolve_config
from rayoodkd.engine.checkpoint import load_state
from rayoodkd.engine.loop import InjectedFailure
from rayoodkd.engine.session import LocalSession
from rayoodkd.launch import launch
from rayoodkd.methods import METHODS

STAGED = [
    "method=dfq_finetune",
    "data.ood=null",
    "data.labelled={source: mnist5k, split: train}",
    "eval.every=2",
    "log_every=1",
    "data.batch_size=16",
    "dfq_finetune.batch_size=8",
    "dfq_finetune.ngf=4",
    "dfq_finetune.nz=8",
    "dfq_finetune.kd_steps=1",
    "dfq_finetune.datafree_steps=4",
    "dfq_finetune.finetune_steps=4",
]


def _run(run_dir: Path, teacher: Path, *extra: str, resume: bool = False) -> LocalSession:
    return run_in_process(run_dir, teacher, [*STAGED, *extra], labelled=128, evaluated=64, resume=resume)


def test_epoch_of_a_stream_follows_its_rows_per_rank_and_batch() -> None:
    ctx = small_context(world_size=2, rank=1, batch_size=16)
    ctx.stream_rows = {"labelled": 200}
    assert ctx.steps_per_epoch("labelled") == 6
    epochs = []
    for step in range(1, 14):
        ctx.stage_step = step
        epochs.append(ctx.epoch("labelled"))
    assert epochs == [0] * 6 + [1] * 6 + [2]
    with pytest.raises(KeyError, match="no known size"):
        ctx.steps_per_epoch("web")


def test_single_stage_methods_are_one_implicit_stage(tiny_teacher: Path) -> None:
    from rayoodkd.engine.loop import build_method, build_student, run_context
    from rayoodkd.teacher_io import load_teacher

    teacher, info = load_teacher(tiny_teacher)
    cfg = resolve_config("demo", [f"teacher.checkpoint={tiny_teacher}", "max_steps=37"])
    cpu = torch.device("cpu")
    ctx = run_context(cfg, info, cpu, torch.Generator())
    [stage] = build_method(cfg, teacher, build_student(cfg, info, cpu), ctx).stages()
    assert (stage.name, stage.steps, stage.trains, stage.reload_best) == ("train", 37, None, False)
    assert "dfq_finetune" in METHODS.names()


def test_a_run_killed_in_stage_two_resumes_there_and_ends_identical(tmp_path: Path, bn_teacher: Path) -> None:
    straight = _run(tmp_path / "straight", bn_teacher)
    assert [(r["step"], r["stage"]) for r in straight.reports] == [(2, 0), (4, 0), (6, 1), (8, 1)]
    assert "datafree/loss/kd" in straight.reports[1] and "finetune/loss/ce" in straight.reports[3]
    assert "finetune/loss/ce" not in straight.reports[1] and "datafree/loss/kd" not in straight.reports[3]

    stage_end = load_state(tmp_path / "straight" / "step_0000004")
    assert (stage_end["stage"], stage_end["stage_step"]) == (0, 4)
    best = stage_end["stage_best"]
    assert best["step"] in (2, 4) and set(best["players"]) == {"student", "generator"}
    in_stage_two = load_state(tmp_path / "straight" / "step_0000006")
    assert (in_stage_two["stage"], in_stage_two["stage_step"]) == (1, 2)

    killed = tmp_path / "killed"
    with pytest.raises(InjectedFailure):
        _run(killed, bn_teacher, "debug.fail_at_step=7")
    resumed = _run(killed, bn_teacher, "debug.fail_at_step=7", resume=True)
    assert resumed.reports[-1]["resumed_from_step"] == 6 and resumed.reports[-1]["stage"] == 1
    final_a = load_state(tmp_path / "straight" / "step_0000008")
    final_b = load_state(killed / "step_0000008")
    for player, weights in final_a["players"].items():
        for name, tensor in weights.items():
            torch.testing.assert_close(final_b["players"][player][name], tensor, rtol=0, atol=0)
    assert resumed.reports[-1]["test/top1"] == straight.reports[-1]["test/top1"]
    assert final_a["ranks"][0]["streams"]["labelled"] == {"epoch": 0, "consumed": 4}  # 8 batches per epoch


def test_the_progress_line_of_a_new_stage_shows_no_best_before_its_first_evaluation(
    tmp_path: Path, bn_teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path / "run", bn_teacher)
    finetune = [line for line in capsys.readouterr().out.splitlines() if "finetune [2/2]" in line]
    assert "step 1/4" in finetune[0] and "val " in finetune[0] and "(best" not in finetune[0]
    assert "step 2/4" in finetune[1] and "(best " in finetune[1]  # evaluated at its step 2


def test_the_selected_snapshot_of_stage_one_is_what_stage_two_starts_from(
    tmp_path: Path, bn_teacher: Path
) -> None:
    """With a negligible fine-tuning learning rate, the student after two fine-tuning steps is stage 1's
    selected snapshot (and not its last step, when the two differ)."""
    session = _run(
        tmp_path / "run", bn_teacher, "dfq_finetune.optim.finetune.lr=1e-9", "dfq_finetune.finetune_steps=2"
    )
    stage_end = load_state(tmp_path / "run" / "step_0000004")
    selected = stage_end["stage_best"]["players"]["student"]
    after = load_state(tmp_path / "run" / "step_0000006")["players"]["student"]
    last = stage_end["players"]["student"]
    weights = [k for k, v in selected.items() if v.is_floating_point() and "running" not in k]
    distance_to_selected = sum(float((after[k] - selected[k]).abs().sum()) for k in weights)
    assert distance_to_selected < 1e-3
    if stage_end["stage_best"]["step"] != 4:
        assert sum(float((after[k] - last[k]).abs().sum()) for k in weights) > 1e-2
    assert len(session.reports) == 3


@pytest.mark.ray
def test_two_workers_resume_in_stage_two_and_log_per_stage_metrics(
    tmp_path: Path, bn_teacher: Path, ray_local
) -> None:
    cfg = ray_run_config(
        tmp_path,
        bn_teacher,
        *[
            f"summary_json={tmp_path / 'summary.json'}",
            "run_name=staged",
            "num_workers=2",
            "max_failures=1",
            "debug.fail_at_step=7",
            *STAGED,
        ],
    )
    summary = launch(cfg)
    assert summary.steps == 8 and summary.resumed_from_step == 6
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 8
    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ddp/replicas_identical"] == "true"
    history = {
        key: [m.step for m in client.get_metric_history(summary.mlflow_run_id, key)]
        for key in ("datafree/loss/kd", "finetune/loss/ce", "val/top1")
    }
    assert history["datafree/loss/kd"] == [1, 2, 3, 4]
    assert history["finetune/loss/ce"] == [5, 6, 7, 8]
    assert history["val/top1"] == [2, 4, 6, 8]
    assert run.data.tags["stage"] == "finetune"


@pytest.mark.ray
def test_epochs_of_a_sharded_stream_have_the_length_every_rank_computes(
    tmp_path: Path, bn_teacher: Path, ray_local
) -> None:
    """200 labelled rows on 2 workers, batches of 16: 6 steps per epoch on each rank; 8 fine-tuning steps
    end 2 batches into the second epoch of both ranks' shards (Ray Data's equal split)."""
    cfg = ray_run_config(
        tmp_path,
        bn_teacher,
        *[
            "run_name=epochs",
            "num_workers=2",
            *STAGED,
            "data.labelled={source: mnist5k, split: train, num_images: 200}",
            "dfq_finetune.datafree_steps=1",
            "dfq_finetune.finetune_steps=8",
            "eval.every=9",
        ],
    )
    summary = launch(cfg)
    ranks = load_state(summary.checkpoint)["ranks"]
    assert [rank["streams"]["labelled"] for rank in ranks] == [{"epoch": 1, "consumed": 2}] * 2
