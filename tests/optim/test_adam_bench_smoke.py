"""Smoke test of bench/adam_bench.py at a tiny size: it runs, and prints its table and ratio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_adam_bench_smoke(tmp_path):
    md = tmp_path / "adam.md"
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "adam_bench.py"), "--params", "2e5", "--d-model",
         "64", "--repeats", "2", "--warmup", "1", "--no-deepspeed", "--md", str(md)],
        capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
    text = md.read_text()
    assert text == out.stdout.rstrip("\n") + "\n" or text in out.stdout
    assert "torch AdamW(fused=True) + bf16 copy" in text and "fuyou (fp32 grad" in text
    assert text.count("x |") >= 6  # a ratio on every row
