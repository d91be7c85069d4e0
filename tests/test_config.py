"""Config: presets, dotted overrides, and one-line errors that name the key and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from rayoodkd.config import (
    ConfigError,
    apply_overrides,
    build_config,
    deep_merge,
    load_preset,
    preset_names,
    resolve_config,
)


def test_required_top_level_keys_exist() -> None:
    cfg = resolve_config("demo")
    for key in (
        "method",
        "seed",
        "max_steps",
        "num_workers",
        "use_gpu",
        "tracking_uri",
        "storage_path",
        "summary_json",
    ):
        assert hasattr(cfg, key)


def test_dotted_overrides_are_parsed_as_yaml_values() -> None:
    cfg = resolve_config(
        "demo",
        ["seed=3", "data.batch_size=64", "kd_ood.temperature=2.5", "use_gpu=true", "summary_json=null"],
    )
    assert (cfg.seed, cfg.data.batch_size, cfg.kd_ood.temperature, cfg.use_gpu) == (3, 64, 2.5, True)
    assert cfg.summary_json is None


def test_override_creates_nested_sections() -> None:
    data = apply_overrides({}, ["data.ood.source=letters", "data.ood.num_images=10"])
    assert data == {"data": {"ood": {"source": "letters", "num_images": 10}}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("foo=1", "unknown key 'foo'; allowed keys: "),
        ("data.bar=1", "unknown key 'data.bar'; allowed keys under 'data': augment, batch_size"),
        ("seed=abc", "invalid value for 'seed'"),
        ("method=nope", "unknown method 'nope'; allowed: "),
        ("backend=mpi", "invalid value for 'backend': Input should be 'auto', 'gloo' or 'nccl'"),
        ("kd_ood.temperature=0", "invalid value for 'kd_ood.temperature'"),
        ("data.ood.format=tiff", "invalid value for 'data.ood.format'"),
        ("noequals", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_config("demo", [override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_every_preset_validates_and_extends_resolve() -> None:
    assert "demo" in preset_names()
    for name in preset_names():
        data = load_preset(name)
        assert "extends" not in data
        build_config(data)


def test_yaml_file_config(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump({"extends": "demo", "seed": 7, "kd_ood": {"optim": {"student": {"lr": 0.02}}}})
    )
    cfg = resolve_config(str(path))
    assert (cfg.seed, cfg.kd_ood.optim.student.lr, cfg.kd_ood.temperature) == (7, 0.02, 5.0)


def test_extends_takes_a_list_whose_later_parents_win(tmp_path) -> None:
    first, second, child = tmp_path / "first.yaml", tmp_path / "second.yaml", tmp_path / "child.yaml"
    first.write_text(yaml.safe_dump({"extends": "demo", "seed": 1, "max_steps": 11, "eval": {"every": 5}}))
    second.write_text(yaml.safe_dump({"seed": 2, "data": {"augment": "none"}}))
    child.write_text(yaml.safe_dump({"extends": [str(first), str(second)], "max_steps": 33}))
    cfg = resolve_config(str(child))
    assert (cfg.seed, cfg.max_steps, cfg.eval.every, cfg.data.augment) == (2, 33, 5, "none")
    assert cfg.data.batch_size == 128  # from demo, through the first parent


@pytest.mark.parametrize("pair", ["uci2mnist", "mnist2printed"])
def test_the_dfq_plus_presets_are_mnist2ucis_on_another_pairs_teacher_and_data(pair: str) -> None:
    """Their two parents share ancestors (demo, mnist2uci-augkd): the last parent brings those keys back."""
    dfq_plus = load_preset("mnist2uci-dfq-finetune")
    domain = load_preset(f"{pair}-augkd")
    expected = build_config(deep_merge(dfq_plus, {"teacher": domain["teacher"], "data": domain["data"]}))
    assert resolve_config(f"{pair}-dfq-finetune") == expected
    assert expected.method == "dfq_finetune" and expected.max_steps == build_config(dfq_plus).max_steps


def test_an_extends_loop_is_one_line(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"extends": ["demo", str(tmp_path / "b.yaml")]}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"extends": str(tmp_path / "a.yaml")}))
    with pytest.raises(ConfigError) as error:
        load_preset(str(tmp_path / "a.yaml"))
    assert "'extends' loops back to it" in str(error.value) and "\n" not in str(error.value)


def test_a_bad_extends_is_one_line_naming_the_file(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"extends": ["demo", 3]}))
    with pytest.raises(ConfigError) as error:
        load_preset(str(path))
    assert "'extends' must be a preset name" in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_cli_bad_override_exits_nonzero_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rayoodkd.train", "data.nope=1"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown key 'data.nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_print_config_and_help() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "rayoodkd.train", "--print-config", "seed=5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0
    assert yaml.safe_load(shown.stdout)["seed"] == 5
    helped = subprocess.run(
        [sys.executable, "-m", "rayoodkd.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert "presets: " in helped.stdout and "demo" in helped.stdout and "summary_json" in helped.stdout


def test_a_teacher_recipe_key_names_only_what_differs_from_the_defaults() -> None:
    """Cached teachers stay valid when the recipe gains an option (label smoothing), and a recipe that
    sets it is another teacher."""
    from rayoodkd.teacher import recipe_key

    plain = resolve_config("mnist-dfq").teacher.recipe
    explicit = resolve_config("mnist-dfq", ["teacher.recipe.label_smoothing=0.0"]).teacher.recipe
    smoothed = resolve_config("mnist-dfq", ["teacher.recipe.label_smoothing=0.1"]).teacher.recipe
    assert recipe_key(plain) == recipe_key(explicit) == "3f737e989d3107db"
    assert recipe_key(smoothed) != recipe_key(plain)
