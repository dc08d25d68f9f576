"""Compute precision on this CPU: what train.precision=auto decides from (fuyou.models.precision.bf16_native)
against what it costs. A d x d x d matmul in fp32 and in bf16 (median of --repeats, alternating), and the
default run (`fuyou train`, in memory) trained a few steps in each precision in fresh processes (the median
step time past the first step), in one invocation.

    python bench/cpu_precision.py [--steps 4] [--repeats 5] [--markdown bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_header, repo_env  # noqa: E402

from fuyou.models.precision import auto_precision, bf16_native  # noqa: E402


def matmul_s(d: int, dtype: torch.dtype) -> float:
    a, b = torch.randn(d, d, dtype=dtype), torch.randn(d, d, dtype=dtype)
    a @ b
    t = time.perf_counter()
    a @ b
    return time.perf_counter() - t


def run_step_s(precision: str, steps: int, out: Path) -> tuple[float, float]:
    """The default run in ``precision``, ``steps`` steps: (median step time past the first, final loss)."""
    name = f"p-{precision}"
    r = subprocess.run([sys.executable, "-m", "fuyou.cli", "train", "--out", str(out), f"run.name={name}",
                        f"train.steps={steps}", "train.eval_every=0", "train.log_every=1", f"train.precision={precision}",
                        "run.save_weights=false"], capture_output=True, text=True, env=repo_env(), timeout=3600)
    if r.returncode:
        raise SystemExit(f"the {precision} run failed: {r.stderr[-2000:]}")
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps_ = [x for x in lines if "step_time_s" in x]
    return statistics.median(x["step_time_s"] for x in steps_[1:]), steps_[-1]["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=1024, help="the matmul's size (default 1024)")
    p.add_argument("--steps", type=int, default=4, help="steps of the default run in each precision (default 4)")
    p.add_argument("--repeats", type=int, default=5, help="matmul timings in each dtype (default 5)")
    p.add_argument("--markdown", help="append the report to this file")
    args = p.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is not timed)")
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):
        times["fp32"].append(matmul_s(args.d, torch.float32))
        times["bf16"].append(matmul_s(args.d, torch.bfloat16))
    mm = {k: statistics.median(v) for k, v in times.items()}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {k: run_step_s(k, args.steps, Path(tmp)) for k in ("fp32", "bf16")}
    flops = 2 * args.d**3
    report = [
        f"### Compute precision on the CPU ({time.strftime('%Y-%m-%d')})",
        "",
        machine_header(f"CPU capability {torch.backends.cpu.get_cpu_capability()}"),
        f"`python bench/cpu_precision.py --steps {args.steps} --repeats {args.repeats}`; bf16_native('cpu') = "
        f"{bf16_native('cpu')}, so train.precision=auto computes in {auto_precision('cpu')} here.",
        "",
        "| | fp32 | bf16 | bf16 / fp32 |",
        "|---|---|---|---|",
        f"| {args.d}^3 matmul, median of {args.repeats} | {mm['fp32'] * 1e3:.3g} ms ({flops / mm['fp32'] / 1e9:.3g} "
        f"GFLOP/s) | {mm['bf16'] * 1e3:.3g} ms ({flops / mm['bf16'] / 1e9:.3g} GFLOP/s) | "
        f"{mm['bf16'] / mm['fp32']:.3g}x |",
        f"| the default run's step (gpt-tiny, 16 x 128 tokens, in memory), median of steps 2-{args.steps} | "
        f"{runs['fp32'][0]:.3g} s | {runs['bf16'][0]:.3g} s | {runs['bf16'][0] / runs['fp32'][0]:.3g}x |",
        f"| its loss after {args.steps} steps | {runs['fp32'][1]:.4f} | {runs['bf16'][1]:.4f} | |",
        "",
    ]
    text = "\n".join(report)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
