"""Argument and source errors of the data layer and its CLI (no Ray instance needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayoodkd.data import CorpusConfig, load_corpus, resolve_format
from rayoodkd.data.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def test_missing_source_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="source: path not found"):
        resolve_format(CorpusConfig(source=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="channels"):
        load_corpus(CorpusConfig(source="letters"), image_size=28, channels=2)


def test_cli_missing_path_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["materialize", str(tmp_path / "not-here"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(
        [sys.executable, "-m", "rayoodkd.data", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"python -m rayoodkd.data: error: source: path not found: {tmp_path / 'not-here'}"
    ]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["inspect", "letters", "--format", "tfrecord"],
            "argument --format: invalid choice: 'tfrecord'",
        ),
        (["inspect", "mnist5k", "--split", "holdout"], "split: 'holdout' is not valid"),
        (["inspect", "letters", "--num-images", "0"], "argument --num-images: expected a positive integer"),
        (["materialize", "letters"], "the following arguments are required: --out"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(args: list[str], expected: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]


def test_the_cache_command_shows_each_part_and_clears_the_decoded_corpora(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = (("decoded", "a1b2", 3 * 2**20), ("decoded", "c3d4", 2**20), ("teachers", "t", 10))
    for part, entry, size in entries:
        (tmp_path / part / entry).mkdir(parents=True)
        (tmp_path / part / entry / "image.npy").write_bytes(b"\0" * size)
    (tmp_path / "decoded" / "over-limit-e5f6").touch()  # a marker, not an entry
    assert main(["cache", "--cache-dir", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "decoded         2 entries        4.0 MB" in shown and "teachers        1 entries" in shown
    assert main(["cache", "--cache-dir", str(tmp_path), "--clear-decoded"]) == 0
    assert "deleted 2 decoded corpora (4.0 MB)" in capsys.readouterr().out
    assert not (tmp_path / "decoded").exists() and (tmp_path / "teachers" / "t").is_dir()
