"""Smoke run of bench/io_bench.py: tiny size, one repetition, a timeout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "io_bench.py"


def test_io_bench_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--dir", str(tmp_path), "--size", "4MiB", "--reps", "1",
                          "--block-size", "256KiB", "--queue-depth", "4", "--no-deepspeed",
                          "--markdown", str(tmp_path / "r.md")],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert "fuyou TensorStore" in out.stdout
    assert "fuyou TensorStore" in (tmp_path / "r.md").read_text()
