"""bench/gpu.py cannot rot unnoticed: its CPU smoke mode runs the whole script and reports every method."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_smoke_runs_on_cpu_and_names_every_method():
    env = {**os.environ, "COLUMNS": "200"}  # a wide table: no cell wraps
    result = subprocess.run(
        [sys.executable, "bench/gpu.py", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for name in ("HF forward", "fullkv", "fastkv", "snapkv"):  # each row: the method, then its seconds
        assert len(re.findall(rf"{name}\W+\d+\.\d+", result.stdout)) == 2, f"{name} row missing:\n{result.stdout}"
    assert "wrote" not in result.stdout  # --smoke leaves docs/benchmarks.md alone unless --write
