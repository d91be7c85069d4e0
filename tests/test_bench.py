"""The bench scripts that tests can afford: bench/gpu.py at a tiny size on CPU, bench/ingest.py's corpora, the
teacher panel's report, bench/ray_processes.py's accounting."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_bench_times_paper_scale_presets_at_a_tiny_size_on_cpu(tmp_path: Path) -> None:
    presets = ["cifar100-mosaickd-cifar10", "cifar10-tadfkd"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--modes", "fp32", "--presets", *presets],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=True,
    )
    rows = re.findall(r"^\| (\S+) \| fp32 \| 4 \| ([0-9.]+) \| ([0-9,]+) \|$", result.stdout, re.MULTILINE)
    assert [row[0] for row in rows] == presets
    assert all(float(seconds) > 0 and int(rate.replace(",", "")) > 0 for _, seconds, rate in rows)


def test_the_ingest_bench_writes_the_same_cifar_shaped_pngs_to_a_folder_and_parquet(tmp_path: Path) -> None:
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import ingest
    finally:
        sys.path.remove(str(ROOT / "bench"))
    folder, parquet = ingest.write_corpora(tmp_path, 12)
    files = sorted(folder.iterdir())
    rows = pq.read_table(parquet).column("image").to_pylist()
    assert [f.read_bytes() for f in files] == rows and len(rows) == 12
    images = [Image.open(io.BytesIO(data)) for data in rows]
    assert {(image.size, image.mode) for image in images} == {((32, 32), "RGB")}
    assert len({image.tobytes() for image in images}) == 12  # crops of different places and scales


def test_the_panel_report_takes_the_worst_held_out_teacher_and_the_synthesis_rate(
    monkeypatch, capsys, tmp_path: Path
) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import teacher_panel
    finally:
        sys.path.remove(str(ROOT / "bench"))

    def run(top1: float, wall: float = 100.0, **extra: float) -> dict[str, float]:
        figures = {"test/top1_at_best_val": top1, "summary/wall_seconds": wall, "teacher/test_top1": 98.0}
        return figures | extra

    finished = {
        "mnist-dfq": [("lenet5_bn", run(96)), ("resnet8", run(50)), ("resnet8", run(60))],
        "mnist-tadfkd": [("lenet5_bn", run(90)), ("resnet8", run(70)), ("resnet8", run(72))],
        "mnist-deepinv": [("lenet5_bn", run(94, wall=400, **{"pool/size": 3200.0}))],
    }
    monkeypatch.setattr(teacher_panel, "_finished", lambda method, *_: finished[method])
    teacher_panel.report(list(finished), ["lenet5_bn", "resnet8"], [0, 1], tmp_path, [])
    out = capsys.readouterr().out
    assert "| resnet8 | held out | 98.00 | 55.00 ± 7.07 | 71.00 ± 1.41 | – |" in out
    assert "| **worst held-out teacher** | | | 55.00 (resnet8) | 71.00 (resnet8) | – |" in out
    assert "| **images synthesised per s of wall time** | | | – | – | 8.0 |" in out
    assert "+16.00 points (goal >= +5): holds." in out


def test_the_results_benches_take_overrides_for_every_run_wherever_they_stand(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from augkd_results import parse_bench_arguments

    argv = ["--override", "num_workers=0", "--configs", "mnist-kd-web", "mnist-kd3-web kd3.select=false"]
    argv += ["--seeds", "0", "1", "--override", "data.labelled.per_class=50"]
    args = parse_bench_arguments("", argv)
    assert args.configs == ["mnist-kd-web", "mnist-kd3-web kd3.select=false"] and args.seeds == [0, 1]
    assert args.override == ["num_workers=0", "data.labelled.per_class=50"]


def test_the_teacher_inference_bench_times_the_loaded_and_the_fused_teacher_and_their_agreement(
    tmp_path: Path,
) -> None:
    args = ["--archs", "cnn_small", "--classes", "10", "--channels", "1", "--image-size", "28"]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "teacher_inference.py"),
            *args,
            "--batch-size",
            "4",
            "--reps",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=True,
    )
    rows = re.findall(
        r"^\| cnn_small \| (\w+) \| ([\w ]+) \| ([0-9.]+) \| ([0-9.]+) \| (\S+) \|$", result.stdout, re.M
    )
    assert [(precision, setting) for precision, setting, *_ in rows] == [
        (precision, setting)
        for precision in ("fp32", "bf16")
        for setting in ("as_loaded", "as_loaded channels_last", "fused")
    ]
    fp32_fused = rows[2]
    assert float(fp32_fused[2]) > 0 and 0 < float(fp32_fused[4]) < 1e-3  # folded: not bit-equal, but close


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_ray_processes_bench_charges_the_cpu_to_the_process_and_thread_that_burn_it() -> None:
    burn = "import time\nwhile True:\n    time.sleep(0.01)\n    sum(range(200000))"
    burner = subprocess.Popen([sys.executable, "-c", burn, "burner"])
    bench = [
        sys.executable,
        str(ROOT / "bench" / "ray_processes.py"),
        "--window",
        "2",
        "--threads-of",
        "burner",
    ]
    try:
        result = subprocess.run(bench, capture_output=True, text=True, timeout=60, check=True)
    finally:
        burner.kill()
        burner.wait()
    rows = re.findall(r"^ *([0-9.]+) %  +(\d+)  ", result.stdout, re.MULTILINE)
    shares = {int(pid): float(share) for share, pid in rows}
    assert shares[burner.pid] > 5  # ~20 % of a core alone; less on a busy machine, never nothing
    # its one thread sleeps 10 ms between bursts: about 100 wake-ups a second, which the bench counts
    (section,) = re.findall(rf"^threads of {burner.pid} .*?(?=^threads of |\Z)", result.stdout, re.M | re.S)
    threads = re.findall(r"^ *([0-9.]+) % +(\d+)/s  ", section, re.MULTILINE)
    assert len(threads) == 1 and 50 < int(threads[0][1]) <= 110
