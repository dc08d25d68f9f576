"""bench/planner_validation.py end to end on one configuration, one repeat: the probe, the
prediction and the engine's measured step, in a report with their ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "planner_validation.py"


@pytest.mark.bench
def test_one_config_reports_predicted_and_measured(tmp_path):
    md = tmp_path / "val.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--configs", "optimizer-bound", "--steps", "1", "--repeats", "1",
         "--io-bytes", "16MiB", "--ssd", str(tmp_path / "ssd"), "--markdown", str(md)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = md.read_text()
    row = next(line for line in report.splitlines() if line.startswith("| optimizer-bound |"))
    predicted, measured, ratio = (float(x) for x in re.findall(r"\| \**([0-9.]+)\**(?: s)? \(", row)[:3])
    assert predicted > 0 and measured > 0
    assert ratio == pytest.approx(predicted / measured, rel=0.02)
    assert "Within 15%:" in report
    assert not any((tmp_path / "ssd").glob("planner-val-*"))  # the run deleted its SSD state


def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cuda", "--ssd", str(tmp_path / "ssd")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "ssd").exists()  # refused before the SSD directory was made
