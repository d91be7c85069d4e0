"""The engine in one process (LocalSession): learning, exact resumption, checkpoints, evaluation."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rayoodkd.augment import augment_batch
from rayoodkd.config import resolve_config
from rayoodkd.engine.checkpoint import load_state
from rayoodkd.engine.evaluation import EvalSet, evaluate, score
from rayoodkd.engine.loop import InjectedFailure, NonFiniteLoss, Worker, run_worker
from rayoodkd.engine.metrics import MetricAccumulator
from rayoodkd.engine.session import LocalSession
from rayoodkd.engine.streams import tensor_source
from rayoodkd.engine.teacher_inference import NoGradRoute
from rayoodkd.methods import METHODS

TINY_MOSAIC = {"mosaickd.nz": 8, "mosaickd.ngf": 4, "mosaickd.ndf": 4, "mosaickd.kd_steps": 1}


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 28, 28, generator=generator)
    return images, torch.randint(0, 10, (n,), generator=generator)


def _session(tmp_path: Path, resume_from: Path | None = None) -> LocalSession:
    ood = _blobs(256, 1)
    return LocalSession(
        streams={"ood": (ood[0], torch.full((256,), -1)), "labelled": _blobs(256, 2)},
        eval_sets={"val": _blobs(64, 3), "test": _blobs(64, 4)},
        checkpoint_root=tmp_path,
        resume_from=resume_from,
    )


def _config(teacher: Path, method: str = "kd_ood", **extra: object) -> dict:
    overrides = [
        f"method={method}",
        "max_steps=8",
        "eval.every=4",
        "log_every=2",
        "data.batch_size=32",
        f"teacher.checkpoint={teacher}",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return {
        "config": resolve_config("demo", overrides).model_dump(mode="json"),
        "teacher_path": str(teacher),
        "tracking_uri": None,
        "mlflow_run_id": None,
    }


@pytest.mark.parametrize("method", ["kd_ood", "kd_id"])
def test_resumed_run_equals_uninterrupted(tmp_path: Path, tiny_teacher: Path, method: str) -> None:
    straight = _session(tmp_path / "a")
    run_worker(_config(tiny_teacher, method), straight)
    resumed = _session(tmp_path / "b", resume_from=straight.checkpoints[0])
    run_worker(_config(tiny_teacher, method), resumed)
    assert resumed.reports[-1]["resumed_from_step"] == 4
    for key in ("loss/kd", "val/top1", "test/top1"):
        assert resumed.reports[-1][key] == pytest.approx(straight.reports[-1][key], rel=1e-6)
    final_a = load_state(straight.checkpoints[-1])["players"]["student"]
    final_b = load_state(resumed.checkpoints[-1])["players"]["student"]
    for name, tensor in final_a.items():
        torch.testing.assert_close(final_b[name], tensor, rtol=0, atol=0)


def _after_each_kd_step(monkeypatch: pytest.MonkeyPatch, after: object) -> list[int]:
    """Patch kd_ood's ``train_step``: ``after(method, metrics, step)`` runs after each step and returns the
    metrics reported; returns the list of steps taken so far (1-based)."""
    method_class = METHODS.get("kd_ood")
    real_step = method_class.train_step
    steps: list[int] = []

    def step(self: object, data: object) -> dict:
        metrics = real_step(self, data)
        steps.append(len(steps) + 1)
        return after(self, metrics, steps[-1])

    monkeypatch.setattr(method_class, "train_step", step)
    return steps


def test_a_worker_takes_its_torch_threads_from_the_config(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads_during_steps = []

    def count_threads(method: object, metrics: dict, step: int) -> dict:
        threads_during_steps.append(torch.get_num_threads())
        return metrics

    _after_each_kd_step(monkeypatch, count_threads)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_worker(_config(tiny_teacher, max_steps=2, **{"resources.torch_threads": 1}), _session(tmp_path))
    finally:
        torch.set_num_threads(before)
    assert threads_during_steps == [1, 1]


def test_a_nan_loss_stops_the_run_naming_the_loss_and_the_step(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nan_at_step_3(method: object, metrics: dict, step: int) -> dict:
        return {**metrics, "loss/kd": metrics["loss/kd"] * float("nan")} if step == 3 else metrics

    steps = _after_each_kd_step(monkeypatch, nan_at_step_3)
    session = _session(tmp_path)
    config = {**_config(tiny_teacher, max_steps=8, log_every=2), "launched_at": 1.0}
    with pytest.raises(NonFiniteLoss, match=r"^step 4 \(stage train\): loss/kd not finite"):
        run_worker(config, session)
    assert len(steps) == 4 and session.checkpoints == []  # stopped at the log after it, nothing checkpointed
    with pytest.raises(NonFiniteLoss, match=r"^step 4 "):  # a retry of the same launch stops at once
        run_worker(config, _session(tmp_path))
    assert len(steps) == 4
    run_worker({**config, "launched_at": 2.0}, _session(tmp_path))  # a new launch trains (and passes step 3)
    assert len(steps) == 4 + 8


def test_nan_weights_after_a_finite_loss_stop_the_run_before_they_are_checkpointed(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def break_the_weights_at_step_4(method: object, metrics: dict, step: int) -> dict:
        if step == 4:  # the loss was computed before this update
            with torch.no_grad():
                next(method.student.parameters()).fill_(float("nan"))
        return metrics

    _after_each_kd_step(monkeypatch, break_the_weights_at_step_4)
    session = _session(tmp_path)
    with pytest.raises(NonFiniteLoss, match=r"^step 4 \(stage train\): the weights of student are not"):
        run_worker(_config(tiny_teacher, max_steps=8, log_every=4), session)
    assert session.checkpoints == []  # the evaluation at step 4 would have checkpointed them


def test_kd_loss_decreases_and_checkpoint_is_complete(tmp_path: Path, tiny_teacher: Path) -> None:
    session = _session(tmp_path)
    config = _config(
        tiny_teacher, max_steps=60, **{"eval.every": 30, "log_every": 10, "kd_ood.optim.student.lr": 0.05}
    )
    run_worker(config, session)
    first, last = session.reports[0]["loss/kd"], session.reports[-1]["loss/kd"]
    assert last < 0.7 * first
    state = load_state(session.checkpoints[-1])
    assert state["step"] == 60
    assert set(state) >= {
        "players",
        "optimizers",
        "schedulers",
        "ranks",
        "config",
        "teacher_hash",
        "versions",
    }
    assert session.reports[-1]["student/changed_from_init"] == 1.0
    assert session.reports[-1]["val/agreement"] > session.reports[0]["val/agreement"] - 1e-9


def test_injected_failure_fires_once_per_run(tmp_path: Path, tiny_teacher: Path) -> None:
    first = _session(tmp_path / "run")
    with pytest.raises(InjectedFailure):
        run_worker(_config(tiny_teacher, **{"debug.fail_at_step": 6}), first)
    assert [r["step"] for r in first.reports] == [4]
    retry = _session(tmp_path / "run", resume_from=tmp_path / "run")
    run_worker(_config(tiny_teacher, **{"debug.fail_at_step": 6}), retry)
    assert retry.reports[-1]["step"] == 8 and retry.reports[-1]["resumed_from_step"] == 4


def test_every_method_is_registered_with_a_config() -> None:
    for name in METHODS.names():
        method = METHODS.get(name)
        assert method.name == name
        method.Config()


def test_evaluate_counts_exactly() -> None:
    Fixed = FirstPixel
    images = torch.arange(10).float().view(10, 1, 1, 1).expand(10, 1, 2, 2).clone()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 0])
    result = evaluate(Fixed(), images, labels, teacher=Fixed(), batch_size=3)
    assert result["top1"] == pytest.approx(80.0)
    assert result["agreement"] == pytest.approx(100.0)


class FirstPixel(torch.nn.Module):
    """Predicts the class written in an image's first pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x.flatten(1)[:, 0].long(), 10).float()


def _digit_share(rows: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose first pixel is (row % 10); labels right except for every row divisible by 3."""
    images = torch.tensor([float(r % 10) for r in rows]).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    labels = torch.tensor([(r % 10) if r % 3 else (r + 1) % 10 for r in rows])
    return images, labels


class CountingReader:
    """A rank's share read in batches of 4, counting the passes (each is a Ray Data read when streamed)."""

    def __init__(self, rows: range) -> None:
        self.images, self.labels = _digit_share(rows)
        self.passes = 0

    def __call__(self):
        self.passes += 1
        return zip(self.images.split(4), self.labels.split(4), strict=True)


def _prepare(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images.float(), labels


def test_an_eval_set_keeps_a_share_that_fits_and_streams_one_that_does_not() -> None:
    expected = evaluate(FirstPixel(), *_digit_share(range(30)))
    share_bytes = 30 * 4 * 4  # float32, 1 x 2 x 2 per image
    for cache_bytes, streamed in ((share_bytes, False), (share_bytes - 1, True)):
        reader = CountingReader(range(30))
        val = EvalSet(reader, _prepare, cache_bytes=cache_bytes, device=torch.device("cpu"))
        assert val.streamed is streamed and val.rows == 30
        assert torch.equal(val.example, reader.images[:2])
        for _ in range(3):
            assert score(FirstPixel(), val, device=torch.device("cpu")) == expected
        assert reader.passes == (4 if streamed else 1)  # the first pass decides, then one per evaluation
        first_pixel_mean = val.mean(lambda images, _: images[:, 0, 0, 0])
        assert first_pixel_mean == pytest.approx(sum(r % 10 for r in range(30)) / 30)


def _two_rank_eval(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rows = range(0, 20) if rank == 0 else range(20, 50)  # uneven, as streaming_split(equal=False) may give
    reader = CountingReader(rows)
    share_bytes = 20 * 4 * 4  # rank 0's share fits, rank 1's does not: both must stream
    val = EvalSet(reader, _prepare, cache_bytes=share_bytes, device=torch.device("cpu"), world_size=2)
    figures = score(FirstPixel(), val, device=torch.device("cpu"), world_size=2)
    results[rank] = (val.streamed, val.rows, figures, val.mean(lambda images, _: images[:, 0, 0, 0]))
    dist.destroy_process_group()


def test_two_ranks_agree_to_stream_and_sum_their_shares_exactly() -> None:
    expected = evaluate(FirstPixel(), *_digit_share(range(50)))
    init_file = Path(tempfile.mkdtemp()) / "init"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_rank_eval, args=(str(init_file), results), nprocs=2)
        for rank in (0, 1):
            streamed, rows, figures, mean = results[rank]
            assert streamed and rows == 50
            assert figures == expected
            assert mean == pytest.approx(sum(r % 10 for r in range(50)) / 50)


def test_an_epoch_source_closes_its_open_iterator_when_asked_not_at_garbage_collection() -> None:
    from rayoodkd.engine.streams import EpochSource

    closed = []

    def epoch(index: int):
        try:
            while True:
                yield {"image": torch.zeros(1)}
        finally:
            closed.append(index)  # where a Ray Data iterator shuts its executor down

    source = EpochSource(epoch, lambda batch_size: iter(()))
    source.next_batch()
    source.close()
    assert closed == [0]
    source.next_batch()  # a closed source opens the epoch again when asked for more
    source.load_state_dict({"epoch": 3, "consumed": 0})
    assert closed == [0, 0]


def test_tensor_source_reshuffles_per_epoch_and_resumes_mid_epoch() -> None:
    images, labels = torch.arange(12).float().view(12, 1, 1, 1), torch.arange(12)
    source = tensor_source(images, labels, batch_size=4, seed=0)
    epoch0 = [source.next_batch()["label"].tolist() for _ in range(3)]
    epoch1_first = source.next_batch()["label"].tolist()
    assert sorted(label for batch in epoch0 for label in batch) == list(range(12))
    assert epoch1_first != epoch0[0]
    copy = tensor_source(images, labels, batch_size=4, seed=0)
    copy.load_state_dict(source.state_dict())
    assert copy.next_batch()["label"].tolist() == source.next_batch()["label"].tolist()


def test_augment_translates_without_changing_content_mass() -> None:
    images = torch.zeros(16, 1, 28, 28)
    images[:, :, 10:18, 10:18] = 1.0
    out = augment_batch(images, "crop", torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert torch.allclose(out.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)))
    assert not torch.equal(out, images)


def test_a_run_relaunched_with_a_larger_budget_anneals_over_the_new_budget(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    first = _session(tmp_path / "run")
    run_worker(_config(tiny_teacher), first)
    longer = _session(tmp_path / "run", resume_from=tmp_path / "run")
    run_worker(_config(tiny_teacher, max_steps=16), longer)
    assert longer.reports[-1]["step"] == 16 and longer.reports[-1]["resumed_from_step"] == 8
    scheduler = load_state(longer.checkpoints[-1])["schedulers"]["student"]
    assert scheduler["last_epoch"] == 16
    assert scheduler["_last_lr"] == pytest.approx([0.0], abs=1e-12)  # not back at lr, as a T_max of 8 gives


def test_step_metrics_are_averaged_on_the_device_and_images_are_summed() -> None:
    pending = MetricAccumulator()
    pending.add({"loss/kd": torch.tensor(1.0), "images": 32.0, "lr/student": 0.1})
    pending.add(
        {"loss/kd": torch.tensor(3.0), "loss/ce": torch.tensor(0.5), "images": 32.0, "lr/student": 0.1}
    )
    assert pending.flush() == pytest.approx(
        {"loss/kd": 2.0, "loss/ce": 0.5, "images": 64.0, "lr/student": 0.1}
    )
    assert pending.flush() == {}


def test_the_worker_fuses_the_teacher_unless_asked_to_keep_it_as_loaded(
    tmp_path: Path, bn_teacher: Path
) -> None:
    def batchnorm_calls_without_grad(worker: Worker) -> int:
        calls: list[bool] = []
        for layer in worker.method.teacher.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.register_forward_hook(lambda *_: calls.append(True))
        with torch.no_grad():
            worker.method.teacher(torch.rand(2, 1, 28, 28))
        return len(calls)

    fused = Worker(_config(bn_teacher), _session(tmp_path / "fused"))
    assert isinstance(fused.teacher.forward, NoGradRoute) and fused.method.teacher is fused.teacher
    assert batchnorm_calls_without_grad(fused) == 0  # the method's no-grad calls run the folded copy
    loaded = Worker(_config(bn_teacher, teacher_inference="as_loaded"), _session(tmp_path / "loaded"))
    assert "forward" not in vars(loaded.teacher)
    assert batchnorm_calls_without_grad(loaded) > 0


@pytest.mark.parametrize(
    "speedup",
    [{"teacher_inference": "fused"}, {"channels_last": "true"}, {"compile": "true"}],
    ids=["fused_teacher", "channels_last", "compile"],
)
def test_the_speedups_train_like_the_eager_contiguous_run(
    tmp_path: Path, bn_teacher: Path, speedup: dict[str, str]
) -> None:
    """The same arithmetic up to float reassociation, the same state dict keys (a checkpoint of one loads
    into the other)."""
    plain = _session(tmp_path / "plain")
    run_worker(_config(bn_teacher, "mosaickd", **TINY_MOSAIC, teacher_inference="as_loaded"), plain)
    fast = _session(tmp_path / "fast")
    run_worker(_config(bn_teacher, "mosaickd", **TINY_MOSAIC, **speedup), fast)
    assert fast.reports[-1]["loss/kd"] == pytest.approx(plain.reports[-1]["loss/kd"], rel=1e-3)
    players_plain = load_state(plain.checkpoints[-1])["players"]
    players_fast = load_state(fast.checkpoints[-1])["players"]
    assert players_fast.keys() == players_plain.keys()
    for player, weights in players_plain.items():
        assert players_fast[player].keys() == weights.keys()
        for name, tensor in weights.items():
            torch.testing.assert_close(players_fast[player][name], tensor, rtol=1e-3, atol=1e-4)
