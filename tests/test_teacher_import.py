"""Bring the teacher you have: ``python -m rayoodkd.teacher import`` for ``torchvision:NAME``, ``timm:NAME``
and a user's own ``module.path:ClassName``; the teacher file rebuilds it anywhere, Ray Train workers included
(they find ``tests.fixtures.user_models`` through the driver's working directory, the repository root)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient

from rayoodkd.teacher import main as teacher_main
from rayoodkd.teacher_io import TeacherFileError, load_teacher, read_teacher

REPO = Path(__file__).resolve().parents[1]
USER_ARCH = "tests.fixtures.user_models:MyNet"
GREY = ["image_size=28", "channels=1", "mean=[0.13]", "std=[0.31]", "num_classes=10"]
RGB = ["image_size=32", "channels=3", "mean=[0.5,0.5,0.5]", "std=[0.25,0.25,0.25]", "num_classes=10"]


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver sees the repository root as ``python -m`` run from it does (pytest's own ``sys.path``
    has ``tests/`` instead); Ray workers get it from the driver's working directory."""
    monkeypatch.syspath_prepend(str(REPO))


def _import(capsys: pytest.CaptureFixture[str], weights: Path, out: Path, *spec: str) -> str:
    """Run ``import``; it must succeed and end with its summary line, which is returned."""
    assert teacher_main(["import", "--weights", str(weights), "--out", str(out), *spec]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("teacher: imported"), lines
    return lines[-1]


def _refused(capsys: pytest.CaptureFixture[str], weights: Path, out: Path, *spec: str) -> str:
    """Run ``import``; it must exit 2 with one ``error:`` line on stderr (no traceback), which is returned."""
    assert teacher_main(["import", "--weights", str(weights), "--out", str(out), *spec]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not out.exists()
    return err


def _resnet18(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    weights = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), weights)
    return model.eval(), weights


def _mynet(tmp_path: Path, width: int = 8) -> tuple[torch.nn.Module, Path]:
    from tests.fixtures.user_models import MyNet

    torch.manual_seed(0)
    model = MyNet(num_classes=10, in_channels=1, width=width)
    for module in model.modules():  # non-trivial BN statistics, so eval-mode outputs depend on them
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    weights = tmp_path / "mynet.pt"
    torch.save({"epoch": 7, "model_state_dict": model.state_dict()}, weights)
    return model.eval(), weights


def _same_outputs(original: torch.nn.Module, teacher_file: Path, shape: tuple[int, ...]) -> None:
    teacher, _ = load_teacher(teacher_file)
    x = torch.rand(4, *shape)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), original(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------- the three forms


def test_torchvision_resnet18_state_dict_imports_as_a_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, weights = _resnet18(tmp_path)
    out = tmp_path / "teacher.pt"
    line = _import(capsys, weights, out, "arch=torchvision:resnet18", *RGB)
    assert line == f"teacher: imported torchvision:resnet18 (10 classes, 3x32x32) -> {out}"
    _same_outputs(model, out, (3, 32, 32))
    _, info = read_teacher(out)
    assert info.arch == "torchvision:resnet18" and info.accuracy == {}
    assert info.recipe == {"imported_from": str(weights)}


def test_user_module_class_imports_with_its_kwargs_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, weights = _mynet(tmp_path, width=6)
    out = tmp_path / "teacher.pt"
    _import(capsys, weights, out, f"arch={USER_ARCH}", "kwargs.width=6", *GREY)
    _same_outputs(model, out, (1, 28, 28))
    _, info = read_teacher(out)
    assert info.arch == USER_ARCH and info.kwargs == {"width": 6} and info.channels == 1
    teacher, _ = load_teacher(out)
    with pytest.raises(TypeError, match=r"plain nn\.Module: it gives logits only"):
        teacher.forward_feature_map(torch.rand(1, 1, 28, 28))


def test_timm_model_imports_as_a_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1).eval()
    weights = tmp_path / "timm.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "teacher.pt"
    _import(capsys, weights, out, "arch=timm:resnet18", *GREY)
    _same_outputs(model, out, (1, 28, 28))
    teacher, _ = load_teacher(out)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        features = teacher.pool_features(teacher.forward_feature_map(x))
        torch.testing.assert_close(teacher.fc(features), model(x))
    assert teacher.feature_dim == 512 and teacher.feature_map_channels == 512


def test_timm_arch_without_timm_says_pip_install_timm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    _, weights = _resnet18(tmp_path)
    err = _refused(capsys, weights, tmp_path / "t.pt", "arch=timm:resnet18", *RGB)
    assert (
        err == "error: arch: arch 'timm:resnet18' needs timm, which is not installed here: pip install timm"
    )


# ------------------------------------------------------------------------------------ one-line refusals


def test_wrong_keys_and_shapes_are_one_line_in_the_files_own_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, weights = _mynet(tmp_path, width=8)
    out = tmp_path / "t.pt"
    err = _refused(capsys, weights, out, f"arch={USER_ARCH}", "kwargs.width=4", *GREY)
    assert err.startswith(f"error: --weights: the state dict does not fit arch={USER_ARCH}: shape of ")
    assert "body.0.weight (file torch.Size([8, 1, 3, 3]), arch torch.Size([4, 1, 3, 3]))" in err

    renamed = tmp_path / "renamed.pt"
    state = torch.load(weights, weights_only=True)["model_state_dict"]
    torch.save({k.replace("head.", "classifier."): v for k, v in state.items()}, renamed)
    err = _refused(capsys, renamed, out, f"arch={USER_ARCH}", *GREY)
    assert "missing keys head.weight, head.bias; unexpected keys classifier.weight, classifier.bias" in err

    _, resnet = _resnet18(tmp_path)
    err = _refused(capsys, resnet, out, "arch=torchvision:resnet18", *RGB[:-1], "num_classes=100")
    assert "shape of fc.weight (file torch.Size([10, 512]), arch torch.Size([100, 512]))" in err


def test_logits_of_another_class_count_and_reserved_kwargs_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, weights = _mynet(tmp_path)
    out = tmp_path / "t.pt"
    # The builder names neither num_classes nor in_channels: it keeps its own 10-class head, the weights fit,
    # and the probe forward catches the class count.
    arch = "tests.fixtures.user_models:mynet_grey"
    err = _refused(capsys, weights, out, f"arch={arch}", *GREY[:-1], "num_classes=12")
    assert err == (
        f"error: num_classes: arch={arch} maps 2 images of 1x28x28 to [2, 10], not [2, 12] "
        "(logits of num_classes classes)"
    )
    err = _refused(capsys, weights, out, f"arch={arch}", *RGB)  # a 1-channel network, fed 3 channels
    assert err.startswith(f"error: arch: {arch} fails on a 3x32x32 input: RuntimeError")
    err = _refused(capsys, weights, out, f"arch={USER_ARCH}", "kwargs.num_classes=10", *GREY)
    assert err.startswith("error: invalid value for 'kwargs': num_classes is set by the key num_classes=")


def test_a_module_class_that_is_a_classifier_is_used_as_it_is() -> None:
    from rayoodkd.models import build_classifier
    from rayoodkd.models.classifiers import LeNet5

    model = build_classifier("rayoodkd.models.classifiers.small:LeNet5", 10, in_channels=1, image_size=28)
    assert type(model) is LeNet5 and model.conv1.in_channels == 1 and model.fc.out_features == 10


def test_missing_module_class_and_bad_arch_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, weights = _mynet(tmp_path)
    out = tmp_path / "t.pt"
    err = _refused(capsys, weights, out, "arch=no_such_package.models:Net", *GREY)
    assert err.startswith(
        "error: arch: module 'no_such_package.models' of arch 'no_such_package.models:Net' cannot be "
        "imported (ModuleNotFoundError: No module named 'no_such_package'); it must be importable where "
        "rayoodkd runs: the current directory, PYTHONPATH or an installed package"
    )
    err = _refused(capsys, weights, out, "arch=tests.fixtures.user_models:NoNet", *GREY)
    assert err == (
        "error: arch: module 'tests.fixtures.user_models' has no 'NoNet' "
        "(arch 'tests.fixtures.user_models:NoNet')"
    )
    err = _refused(capsys, weights, out, f"arch={USER_ARCH}", "kwargs.depth=3", *GREY)
    assert err.startswith(
        f"error: arch: {USER_ARCH}(num_classes=10, in_channels=1, depth=3) failed: TypeError"
    )


def test_teacher_whose_module_is_not_importable_here_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a Ray worker that cannot see the user's module: the file names it, loading says so."""
    package = tmp_path / "elsewhere"
    package.mkdir()
    (package / "their_models.py").write_text((REPO / "tests/fixtures/user_models.py").read_text())
    monkeypatch.syspath_prepend(str(package))
    _, weights = _mynet(tmp_path)
    out = tmp_path / "teacher.pt"
    _import(capsys, weights, out, "arch=their_models:MyNet", *GREY)
    sys.path.remove(str(package))
    sys.modules.pop("their_models")
    with pytest.raises(TeacherFileError) as error:
        load_teacher(out)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"teacher.checkpoint: {out} records arch=their_models:MyNet, which does not")
    assert "module 'their_models' of arch 'their_models:MyNet' cannot be imported" in message


def test_a_module_in_the_current_directory_imports_without_it_on_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a console script (``rayoodkd teacher import``), whose sys.path lacks the current directory that
    ``python -m`` and Ray's workers have."""
    from rayoodkd.models import build_classifier

    (tmp_path / "cwd_models.py").write_text((REPO / "tests/fixtures/user_models.py").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_models", raising=False)
    model = build_classifier("cwd_models:MyNet", 10, in_channels=1, image_size=28)
    assert type(model.model).__name__ == "MyNet" and sys.path[-1] == str(tmp_path)
    sys.modules.pop("cwd_models")


def test_foreign_file_hint_names_the_arch_forms(tmp_path: Path) -> None:
    _, weights = _resnet18(tmp_path)
    with pytest.raises(TeacherFileError) as error:
        read_teacher(weights)
    message = str(error.value)
    assert "holds a plain state dict, not a rayoodkd teacher" in message
    assert "python -m rayoodkd.teacher import" in message
    assert "arch=NAME|torchvision:NAME|timm:NAME|module.path:Class" in message


def test_an_import_refused_for_its_test_set_or_its_weights_never_starts_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import rayoodkd.raystart

    def no_ray(*_: object, **__: object) -> None:
        raise AssertionError("Ray was started before the import was refused")

    monkeypatch.setattr(rayoodkd.raystart, "start_ray_for_reads", no_ray)
    _, weights = _mynet(tmp_path)
    test = ["test.source=mnist5k", "test.split=test"]
    err = _refused(capsys, weights, tmp_path / "t.pt", f"arch={USER_ARCH}", *GREY, "test.source=nowhere")
    assert err == "error: test.source: path not found: nowhere"
    err = _refused(capsys, weights, tmp_path / "t.pt", "arch=lenet5", *GREY, *test)
    assert err.startswith("error: --weights: the state dict does not fit arch=lenet5")


# ----------------------------------------------------------------------------------------- with Ray


@pytest.mark.ray
def test_import_scores_the_teacher_on_a_labelled_test_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ray_local
) -> None:
    from rayoodkd.data import CorpusConfig
    from rayoodkd.engine.evaluation import evaluate
    from rayoodkd.teacher import load_tensors

    model, weights = _mynet(tmp_path)
    out = tmp_path / "teacher.pt"
    test = ["test.source=mnist5k", "test.split=test", "test.num_images=200"]
    line = _import(capsys, weights, out, f"arch={USER_ARCH}", *GREY, *test, "--cache-dir", str(tmp_path))
    _, info = read_teacher(out)
    corpus = CorpusConfig(source="mnist5k", split="test", num_images=200)
    images, labels, _ = load_tensors(corpus, 28, 1, str(tmp_path))
    expected = evaluate(model, (images - 0.13) / 0.31, labels)
    assert info.accuracy == pytest.approx({"test": expected["top1"], "test_top5": expected["top5"]})
    assert info.recipe["test"] == {"source": "mnist5k", "split": "test", "num_images": 200}
    assert info.recipe["test_images"] == 200
    assert f"test top-1 {expected['top1']:.2f}% on 200 images of mnist5k (test)" in line

    capsys.readouterr()  # Ray Data's log lines of the load above
    err = _refused(capsys, weights, tmp_path / "t.pt", f"arch={USER_ARCH}", *GREY, "test.source=nowhere")
    assert err == "error: test.source: path not found: nowhere"


@pytest.mark.ray
@pytest.mark.parametrize("arch", ["torchvision:resnet18", USER_ARCH])
def test_imported_teachers_distil_on_two_ray_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ray_local, arch: str
) -> None:
    """kd_ood on 2 workers; each worker rebuilds the teacher from the recorded arch (the user's module comes
    from the driver's working directory, which Ray puts on every worker's sys.path)."""
    from rayoodkd.config import resolve_config
    from rayoodkd.launch import launch

    assert Path.cwd() == REPO, "run pytest from the repository root (Ray workers import the module from it)"
    _, weights = _mynet(tmp_path) if arch == USER_ARCH else _resnet18(tmp_path)
    spec = GREY if arch == USER_ARCH else RGB
    teacher = tmp_path / "teacher.pt"
    _import(capsys, weights, teacher, f"arch={arch}", *spec)
    cfg = resolve_config(
        "demo",
        [
            f"teacher.checkpoint={teacher}",
            f"storage_path={tmp_path / 'runs'}",
            f"summary_json={tmp_path / 'summary.json'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.ood.num_images=256",
            "data.val.num_images=64",
            "data.test.num_images=64",
            "data.batch_size=16",
            "max_steps=4",
            "eval.every=4",
            "log_every=2",
            "num_workers=2",
            "run_name=imported",
        ],
    )
    summary = launch(cfg)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["steps"] == 4 and written["num_workers"] == 2
    run = MlflowClient(summary.tracking_uri).get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    for key in ("ddp/replicas_identical", "student/changed_from_init"):  # a metric, or (newer) a run tag
        assert run.data.tags.get(key) == "true" or run.data.metrics.get(key) == 1.0, key
