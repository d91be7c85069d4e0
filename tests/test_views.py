"""Per-stream transforms and views, the RandomResizedCrop augmentation, collectives on the run context,
and the run inputs a user must give explicitly (engine v2)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import small_context

from rayoodkd.augment import augment_batch
from rayoodkd.config import ConfigError, DataConfig, StreamTransform, build_section, resolve_config
from rayoodkd.engine.streams import DeviceStreams, tensor_source
from rayoodkd.train import main


def test_each_stream_has_its_own_augmentation_and_normaliser_and_a_unit_view() -> None:
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(16)
    data = build_section(
        DataConfig,
        {"augment": "none", "transforms": {"web": {"augment": "crop_flip", "normalizer": [[0.1], [0.2]]}}},
    )
    sources = {name: tensor_source(images, labels, batch_size=16, seed=0) for name in ("ood", "web")}
    streams = DeviceStreams(sources, small_context(), {name: data.transform(name) for name in sources})
    ood, web = streams.next("ood"), streams.next("web")
    assert torch.equal(ood["unit"].sort(0).values, images.sort(0).values)  # no augmentation, a reshuffle
    torch.testing.assert_close(ood["image"], (ood["unit"] - 0.5) / 0.25)
    torch.testing.assert_close(web["image"], (web["unit"] - 0.1) / 0.2)
    web_rows = {tuple(row.flatten().tolist()) for row in web["unit"]}
    assert len(web_rows & {tuple(row.flatten().tolist()) for row in images}) < 16  # augmented
    assert data.transform("labelled").augment == "none" and data.transform("labelled").normalizer is None


def test_stream_transform_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match="unknown stream 'val'; allowed: ood, web, labelled"):
        resolve_config("demo", ["data.transforms={val: {augment: crop}}"])
    with pytest.raises(ConfigError, match="one value per channel"):
        build_section(StreamTransform, {"normalizer": [[0.1, 0.2], [0.3]]})


def test_resized_crop_flip_is_random_per_image_reproducible_and_keeps_the_range() -> None:
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(64, 3, 32, 32).contiguous()
    out = augment_batch(ramp, "resized_crop_flip", torch.Generator().manual_seed(0))
    again = augment_batch(ramp, "resized_crop_flip", torch.Generator().manual_seed(0))
    assert out.shape == ramp.shape and torch.equal(out, again)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    spans = out[:, 0, 16, -1] - out[:, 0, 16, 0]  # a crop zooms into the ramp, a flip reverses it
    assert (spans < 0).any() and (spans > 0).any()
    assert spans.abs().min() < 0.9 * spans.abs().max()  # crops of different sizes


def _collectives(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ctx = small_context(world_size=2, rank=rank)
    counts = torch.tensor([rank + 1.0, 10.0 * rank])
    results[rank] = (ctx.all_reduce(counts).tolist(), ctx.all_gather(counts).tolist())
    dist.destroy_process_group()


def test_run_context_collectives_sum_and_gather_over_two_ranks() -> None:
    init_file = Path(tempfile.mkdtemp()) / "init"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_collectives, args=(str(init_file), results), nprocs=2)
        for rank in (0, 1):
            summed, gathered = results[rank]
            assert summed == [3.0, 10.0]
            assert gathered == [[1.0, 0.0], [2.0, 10.0]]
    assert small_context().all_gather(torch.ones(2)).shape == (1, 2)


def test_a_run_without_val_or_test_sets_says_so(
    tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [f"teacher.checkpoint={tiny_teacher}", f"storage_path={tmp_path}", "data.test=null"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "error: data.test: not set; the student is selected on data.val and scored on data.test "
        "(e.g. data.test.source=mnist5k data.test.split=test)"
    )


def test_teacher_recipe_takes_adam_and_a_fixed_normaliser() -> None:
    cfg = resolve_config(
        "demo",
        ["teacher.recipe.optimizer=adam", "teacher.recipe.mean=[0.1307]", "teacher.recipe.std=[0.3081]"],
    )
    assert cfg.teacher.recipe.optimizer == "adam" and cfg.teacher.recipe.mean == (0.1307,)
    with pytest.raises(ConfigError, match="set both"):
        resolve_config("demo", ["teacher.recipe.mean=[0.5]"])


def test_evaluation_reports_the_configured_top_k() -> None:
    from rayoodkd.engine.evaluation import evaluate

    class Ranked(torch.nn.Module):
        """Ranks class (label + 2) first, then (label + 1), then label itself: top-3 hits, top-2 misses."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            label = x.flatten(1)[:, 0].long()
            logits = torch.zeros(len(x), 10)
            rows = torch.arange(len(x))
            logits[rows, (label + 2) % 10], logits[rows, (label + 1) % 10], logits[rows, label] = (
                3.0,
                2.0,
                1.0,
            )
            return logits

    images = torch.arange(10).float().view(10, 1, 1, 1)
    result = evaluate(Ranked(), images, torch.arange(10), topk=(2, 3))
    assert result == {"top1": 0.0, "top2": 0.0, "top3": 100.0}
    assert resolve_config("demo", ["eval.topk=[5, 3]"]).eval.topk == (1, 3, 5)


def test_player_options_add_sync_batchnorm_only_where_it_helps() -> None:
    from rayoodkd.methods.base import PlayerOptions
    from rayoodkd.models import build_classifier

    model = build_classifier("cnn_small", num_classes=10, in_channels=1, image_size=28)
    weights = {id(p) for p in model.parameters()}
    synced = PlayerOptions(sync_batchnorm=True).prepare(model, world_size=2, device=torch.device("cuda"))
    kinds = {type(m).__name__ for m in synced.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm2d" not in kinds
    assert {id(p) for p in synced.parameters()} == weights  # optimizers built on them keep working
    cpu = PlayerOptions(sync_batchnorm=True).prepare(model, world_size=2, device=torch.device("cpu"))
    assert cpu is model and PlayerOptions().prepare(model, 2, torch.device("cuda")) is model


def test_a_full_image_resized_crop_is_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    import rayoodkd.augment as augment

    monkeypatch.setattr(augment, "RESIZED_CROP_SCALE", (1.0, 1.0))
    monkeypatch.setattr(augment, "RESIZED_CROP_RATIO", (1.0, 1.0))
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(augment._resized_crop(images, torch.Generator().manual_seed(0)), images)
