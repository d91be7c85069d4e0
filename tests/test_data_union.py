"""Unions of several sources in one corpus: config forms and errors, pre-flight, loading, and the data CLI."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rayoodkd.config import (
    ConfigError,
    DataConfig,
    TeacherConfig,
    apply_overrides,
    build_section,
    load_preset,
    preset_names,
    resolve_config,
)
from rayoodkd.data import CorpusConfig, class_names_of, describe_corpus, load_corpus
from rayoodkd.data.__main__ import main
from rayoodkd.data.builtin import encode_png
from rayoodkd.data.config import SPLIT_PARTS
from rayoodkd.preflight import check_corpus, corpora

# (pixel hash, label) -> how many rows hold that decoded image with that label
Contents = Counter[tuple[str, int]]
FOLDER_CLASSES = {"cats": (0, 40, 80), "dogs": (120, 160)}  # class subfolder -> the gray value of each image
PARQUET_ROWS = [(200 + 5 * i, 7 + i % 3) for i in range(8)]  # (gray value, label) of each row


def _contents(corpus: CorpusConfig | list[CorpusConfig]) -> Contents:
    counts: Contents = Counter()
    ds = load_corpus(corpus, image_size=6, channels=1)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        assert not batch["corrupt"].any()
        for image, label in zip(batch["image"], batch["label"], strict=True):
            counts[(hashlib.sha256(image.tobytes()).hexdigest(), int(label))] += 1
    return counts


def _write_folder(root: Path, classes: dict[str, tuple[int, ...]]) -> Path:
    for name, values in classes.items():
        (root / name).mkdir(parents=True)
        for value in values:
            (root / name / f"{value}.png").write_bytes(encode_png(np.full((6, 6), value, np.uint8)))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cats/ (3 PNGs) and dogs/ (2 PNGs), each image one gray value."""
    return _write_folder(tmp_path_factory.mktemp("folder"), FOLDER_CLASSES)


@pytest.fixture(scope="module")
def parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One parquet file of 8 PNGs (columns image, label), labels 7..9."""
    path = tmp_path_factory.mktemp("parquet") / "rows.parquet"
    images = [encode_png(np.full((6, 6), value, np.uint8)) for value, _ in PARQUET_ROWS]
    labels = pa.array([label for _, label in PARQUET_ROWS], pa.int64())
    pq.write_table(pa.table({"image": images, "label": labels}), path)
    return path


# ------------------------------------------------------------------------------------------------- config


def test_a_corpus_is_one_mapping_or_a_list_of_them() -> None:
    yaml_data = yaml.safe_load(
        "ood: [{source: letters}, {source: /x/imgs, num_images: 500}]\nval: {source: uci-digits}"
    )
    data = build_section(DataConfig, yaml_data, "data.")
    assert [m.source for m in data.ood] == ["letters", "/x/imgs"]
    assert (data.ood[0].num_images, data.ood[1].num_images) == (None, 500)
    assert isinstance(data.val, CorpusConfig) and describe_corpus(data.ood) == "letters + /x/imgs"

    overridden = apply_overrides(
        {"data": yaml_data}, ["data.test=[{source: letters}, {source: textures}]", "data.ood.1.num_images=9"]
    )
    data = build_section(DataConfig, overridden["data"], "data.")
    assert [m.source for m in data.test] == ["letters", "textures"] and data.ood[1].num_images == 9
    assert build_section(DataConfig, data.model_dump(mode="json"), "data.") == data
    recipe = build_section(TeacherConfig, {"recipe": {"train": yaml_data["ood"]}}, "teacher.").recipe
    assert [m.source for m in recipe.train] == ["letters", "/x/imgs"]
    cfg = resolve_config("demo", ["data.ood=[{source: letters}, {source: textures, num_images: 50}]"])
    assert [(m.source, m.num_images) for m in corpora(cfg)["data.ood"]] == [
        ("letters", None),
        ("textures", 50),
    ]


def test_presets_keep_single_corpora() -> None:
    for name in preset_names():
        preset = load_preset(name)
        data = build_section(DataConfig, preset.get("data", {}), "data.")
        recipe = build_section(TeacherConfig, preset.get("teacher", {}), "teacher.").recipe
        corpora = [getattr(data, key) for key in ("ood", "web", "labelled", "val", "test")]
        corpora += [recipe.train, recipe.val, recipe.test]
        assert all(corpus is None or isinstance(corpus, CorpusConfig) for corpus in corpora), name


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (
            {"source": "letters", "colour": True},
            "unknown key 'data.ood.1.colour'; allowed keys under 'data.ood.1'",
        ),
        ({"num_images": 5}, "invalid value for 'data.ood.1.source': Field required"),
        (
            {"source": "mnist5k", "split": "holdout"},
            "invalid value for 'data.ood.1': split: 'holdout' is not valid",
        ),
        ({"source": "letters", "num_images": 0}, "invalid value for 'data.ood.1.num_images'"),
        ("letters", "invalid value for 'data.ood.1': Input should be a valid dictionary"),
    ],
)
def test_a_bad_member_is_one_line_naming_its_index(member: object, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_section(DataConfig, {"ood": [{"source": "textures"}, member]}, "data.")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_empty_unions_and_overrides_past_the_members_are_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"^invalid value for 'data.ood': a union needs one or more corpora"
    ):
        build_section(DataConfig, {"ood": []}, "data.")
    union = {"data": {"ood": [{"source": "letters"}, {"source": "textures"}]}}
    with pytest.raises(ConfigError, match=r"^data.ood.2: no such item; data.ood has 2 \(0 to 1\)$"):
        apply_overrides(union, ["data.ood.2.num_images=5"])
    with pytest.raises(
        ConfigError, match=r"^data.ood: a list of 2; name an item by its index, e.g. data.ood.0.num"
    ):
        apply_overrides(union, ["data.ood.num_images=5"])
    assert apply_overrides(union, ["data.ood={source: letters}"])["data"]["ood"] == {"source": "letters"}


# ----------------------------------------------------------------------------------------------- pre-flight


def test_preflight_names_the_member_at_fault(tmp_path: Path, folder: Path, parquet: Path) -> None:
    check_corpus("data.ood", [CorpusConfig(source=str(folder)), CorpusConfig(source=str(parquet))])
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as error:
        check_corpus("data.ood", [CorpusConfig(source="letters"), CorpusConfig(source=str(missing))])
    assert str(error.value) == f"data.ood.1.source: path not found: {missing}"
    columnless = CorpusConfig(source=str(parquet), image_column="img")
    with pytest.raises(ConfigError, match=r"^data.ood.1.image_column: column 'img' is not in"):
        check_corpus("data.ood", [CorpusConfig(source=str(folder)), columnless])


def test_labelled_members_must_number_their_classes_alike(tmp_path: Path, folder: Path) -> None:
    fewer = _write_folder(tmp_path / "fewer", {"cats": (10,)})
    assert class_names_of([CorpusConfig(source=str(folder)), CorpusConfig(source=str(fewer))]) == [
        "cats",
        "dogs",
    ]
    other = _write_folder(tmp_path / "other", {"cats": (10,), "mice": (20,)})
    union = [CorpusConfig(source=str(folder)), CorpusConfig(source=str(other))]
    with pytest.raises(ConfigError) as error:
        check_corpus("data.labelled", union)
    assert str(error.value).startswith(
        "data.labelled.1.source: label 1 is class 'mice' here but 'dogs' in member 0"
    )
    union[1] = union[1].model_copy(update={"labelled": False})
    check_corpus("data.labelled", union)


# -------------------------------------------------------------------------------------------------- loading


@pytest.mark.ray
def test_union_has_every_row_of_each_member_with_its_labels(ray_local, folder: Path, parquet: Path) -> None:
    folder_cfg, parquet_cfg = CorpusConfig(source=str(folder)), CorpusConfig(source=str(parquet))
    union = _contents([folder_cfg, parquet_cfg])
    assert union == _contents(folder_cfg) + _contents(parquet_cfg)
    assert union.total() == 5 + 8
    assert sorted(label for (_, label), n in union.items() for _ in range(n)) == sorted(
        [0, 0, 0, 1, 1] + [label for _, label in PARQUET_ROWS]
    )
    unlabelled = _contents([folder_cfg, parquet_cfg.model_copy(update={"labelled": False})])
    assert Counter(label for _, label in unlabelled.elements()) == Counter({-1: 8, 0: 3, 1: 2})
    assert _contents([folder_cfg, parquet_cfg]) == union  # the same rows on every read


@pytest.mark.ray
def test_member_keys_apply_to_that_member_only(ray_local, folder: Path, parquet: Path) -> None:
    folder_cfg, parquet_cfg = CorpusConfig(source=str(folder)), CorpusConfig(source=str(parquet))
    folder_rows = _contents(folder_cfg)
    capped = _contents([folder_cfg, parquet_cfg.model_copy(update={"num_images": 3})])
    assert capped.total() == 5 + 3 and folder_rows <= capped

    split = {"split_fractions": (0.5, 0.25, 0.25), "split_seed": 1}
    parts = [
        _contents([folder_cfg, parquet_cfg.model_copy(update={**split, "split": part})])
        for part in SPLIT_PARTS
    ]
    assert all(folder_rows <= part for part in parts)
    parquet_parts = [part - folder_rows for part in parts]
    assert sum(parquet_parts, Counter()) == _contents(parquet_cfg)
    assert sum(len(part) for part in parquet_parts) == len(set().union(*parquet_parts))  # disjoint


@pytest.mark.ray
def test_load_errors_name_the_member(ray_local, tmp_path: Path, folder: Path, parquet: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"^1.source: path not found: {missing}$"):
        load_corpus(
            [CorpusConfig(source=str(folder)), CorpusConfig(source=str(missing))], image_size=6, channels=1
        )
    columnless = CorpusConfig(source=str(parquet), image_column="img")
    with pytest.raises(ValueError, match=r"^1.image_column: column 'img' not in the parquet schema"):
        load_corpus([CorpusConfig(source=str(folder)), columnless], image_size=6, channels=1)


@pytest.mark.ray
def test_data_cli_reads_several_sources_as_one(ray_local, folder: Path, parquet: Path, capsys) -> None:
    assert main(["inspect", str(folder), str(parquet), "--image-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"{folder} (format image_folder) + {parquet} (format parquet)" in printed
    assert "rows: 13" in printed and "cats" in printed
