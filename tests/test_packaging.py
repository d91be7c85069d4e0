"""The package as a library: the wheel (console script, presets, sweep spaces, LICENSE, py.typed) works
outside the checkout, the ``rayoodkd`` command dispatches to each module's CLI, and ``--help`` stays light."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rayoodkd import catalog, cli
from rayoodkd.tune import SPACE_DIR

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", minversion="77", reason="the build backend (the dev extra)")
    source = tmp_path / "src"  # a copy, so the build writes no build/ or egg-info into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "rayoodkd", source / "rayoodkd", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    wheels = tmp_path / "wheels"
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(source)],
        tmp_path,
    )
    (wheel,) = wheels.glob("rayoodkd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.name for p in SPACE_DIR.glob("*.yaml"))
    assert shipped and {f"rayoodkd/tune_spaces/{n}" for n in shipped} <= names
    assert {"rayoodkd/py.typed", "rayoodkd/configs/demo.yaml"} <= names
    dist_info = wheel.name.split("-py")[0]
    assert f"{dist_info}.dist-info/licenses/LICENSE" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}.dist-info/entry_points.txt").decode()
    assert "rayoodkd = rayoodkd.cli:main" in entry_points

    target = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], tmp_path)
    elsewhere = tmp_path / "elsewhere"  # no ./tune_spaces, no checkout: only the installed package
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}

    text = _run([str(target / "bin" / "rayoodkd"), "--help"], elsewhere, env)
    assert all(name in text for name in cli.COMMANDS)
    probe = (
        "import rayoodkd, rayoodkd.config as c, rayoodkd.tune as t;"
        "print(rayoodkd.__file__); print(t.find_space('smoke')); print(','.join(c.preset_names()))"
    )
    package, space, presets = _run([sys.executable, "-c", probe], elsewhere, env).splitlines()
    assert Path(package).is_relative_to(target), f"imported {package}, not the installed package"
    assert Path(space).resolve() == (target / "rayoodkd" / "tune_spaces" / "smoke.yaml").resolve()
    assert "demo" in presets.split(",")
    text = _run(
        [str(target / "bin" / "rayoodkd"), "train", "--config", "demo", "--print-config"], elsewhere, env
    )
    assert "method: kd_ood" in text
    assert _run([str(target / "bin" / "rayoodkd"), "train", "--help"], elsewhere, env).startswith(
        "usage: rayoodkd train "
    )


def test_catalog_matches_the_methods_and_the_run_config_model() -> None:
    from rayoodkd.config import run_config_model
    from rayoodkd.methods import METHODS

    assert tuple(METHODS.names()) == catalog.METHOD_NAMES
    fields = list(run_config_model().model_fields)
    listed = (*catalog.TOP_LEVEL_KEYS, *catalog.SECTIONS, *catalog.METHOD_NAMES)
    assert sorted(fields) == sorted(listed) and len(set(listed)) == len(listed)
    others = [k for k in fields if k not in catalog.METHOD_NAMES and k not in catalog.SECTIONS]
    assert others == list(catalog.TOP_LEVEL_KEYS)


def test_help_imports_no_torch_ray_or_mlflow() -> None:
    code = """
import sys
from rayoodkd.cli import main
commands = [[], ["train"], ["tune"], ["data"], ["compare"], ["teacher"], ["teacher", "import"], ["evaluate"]]
for argv in commands:
    try:
        main([*argv, "--help"])
    except SystemExit as stop:
        assert stop.code == 0, (argv, stop.code)
heavy = sorted(m for m in ("torch", "ray", "mlflow") if m in sys.modules)
assert not heavy, f"--help imported {heavy}"
"""
    text = _run([sys.executable, "-c", code], ROOT)
    assert "usage: rayoodkd" in text and "usage: python -m rayoodkd.train" in text
    text = _run([sys.executable, "-m", "rayoodkd", "--help"], ROOT)  # the same command
    assert text.startswith("usage: rayoodkd") and all(c.summary in text for c in cli.COMMANDS.values())


def test_a_run_imports_sklearn_only_for_ta_dfkd_and_mlflow_only_to_log(tmp_path: Path) -> None:
    """The driver (launch) and every Ray worker (the training loop) import all methods; scikit-learn costs
    ~1 s to import there and only TA-DFKD's GMM uses it; MLflow costs ~1 s and only rank 0 logs
    (docs/benchmarks.md, start-up)."""
    code = """
import sys
import torch
import rayoodkd.engine.loop, rayoodkd.launch
loaded = sorted(m for m in ("sklearn", "mlflow") if m in sys.modules)
assert not loaded, f"the training loop imported {loaded}"
from rayoodkd.methods.tadfkd import gmm_select
assert gmm_select(torch.tensor([0.1, 0.12, 0.9, 0.95]), 0.5, 0).mask.tolist() == [True, True, False, False]
from rayoodkd.engine.tracking import open_store_in_background
client = open_store_in_background("sqlite:///" + sys.argv[1] + "/mlflow.db").result()
assert client.search_experiments()[0].name == "Default"
print("lazy ok")
"""
    assert "lazy ok" in _run([sys.executable, "-c", code, str(tmp_path)], ROOT)


def test_help_lists_each_command_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name, command in cli.COMMANDS.items():
        assert [line.split() for line in lines if command.summary in line] == [
            [name, *command.summary.split()]
        ]
    with pytest.raises(SystemExit) as stop:
        cli.main(["nonsense"])
    assert stop.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli.main([])
    assert stop.value.code == 2


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_reaches_its_module(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for launcher, usage in (
        ("/venv/bin/rayoodkd", f"usage: rayoodkd {name} "),  # the console script
        (str(Path(cli.__file__).with_name("__main__.py")), f"usage: rayoodkd {name} "),  # python -m rayoodkd
        (f"/src/rayoodkd/{name}.py", f"usage: python -m rayoodkd.{name} "),  # python -m rayoodkd.NAME
    ):
        monkeypatch.setattr(sys, "argv", [launcher, name, "--help"])
        with pytest.raises(SystemExit) as stop:  # the module's own parser answers, named as it was started
            cli.main([name, "--help"])
        assert stop.value.code == 0
        assert capsys.readouterr().out.startswith(usage)
    module = sys.modules[cli.COMMANDS[name].module]
    seen: list[list[str]] = []
    monkeypatch.setattr(module, "main", lambda argv: seen.append(argv) or 7)
    assert cli.main([name, "key=1", "--flag"]) == 7 and seen == [["key=1", "--flag"]]


def test_the_teacher_checkpoint_api_is_importable_from_the_teacher_module() -> None:
    import rayoodkd.teacher
    import rayoodkd.teacher_io

    for name in rayoodkd.teacher.CHECKPOINT_API:
        assert getattr(rayoodkd.teacher, name) is getattr(rayoodkd.teacher_io, name)
