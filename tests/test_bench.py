"""The bench scripts that tests can afford: bench/gpu.py at a tiny size on CPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
