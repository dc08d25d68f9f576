import subprocess
import sys
from pathlib import Path


def test_ooc_adam_bench_smoke(tmp_path):
    bench = Path(__file__).parents[2] / "bench" / "ooc_adam_bench.py"
    out = subprocess.run([sys.executable, str(bench), "--ssd", str(tmp_path), "--params", "1e6", "--repeats", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "out-of-core AdamW" in out.stdout and "of the bound" in out.stdout
