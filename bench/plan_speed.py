"""How long `fuyou plan` takes, end to end (a fresh process: interpreter and imports included), on the plans
users ask for most: a 175B model on a lab box, a 13B model on a 24 GB card at a large global batch (the
slowest: several batch splits, each a search), and a 70B LoRA plan. The median of ``--repeats`` runs each,
beside the time of `fuyou --help` (the interpreter and fuyou's command line, without torch) measured the same way.

The planner must answer before a user loses interest: the targets are 15 s for each plan on the 2-core
development machine (they were timed unit tests, which a loaded machine failed; timings live here).

    python bench/plan_speed.py --repeats 3 [--markdown bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_header, publish, repo_env  # noqa: E402

PLANS = {
    "175B, H100, 12 SSDs, batch 16": ["--model", "gpt3-175b", "--gpu", "h100", "--cpu-mem", "256GiB", "--ssd",
                                      "12xd7-p5510", "--batch", "16", "--seq", "1024"],
    "13B, RTX 4090, 2 SSDs, global batch 64": ["--model", "gpt3-13b", "--gpu", "rtx4090", "--ssd", "2x990-pro",
                                               "--cpu-mem", "128GiB", "--global-batch", "64", "--seq", "1024"],
    "70B LoRA, RTX 4090, 1 SSD": ["--model", "llama3-70b", "--gpu", "rtx4090", "--ssd", "1x990-pro", "--cpu-mem",
                                  "64GiB", "--batch", "4", "--seq", "1024", "lora.rank=16"],
}
TARGET_S = 15.0


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fuyou.cli", *args], capture_output=True, text=True, timeout=600,
                         env=repo_env())
    if out.returncode not in (0, 1):  # (1: a plan that does not fit, still a plan)
        raise RuntimeError(f"fuyou {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", help="append the report to this file (bench/RESULTS.md)")
    args = ap.parse_args(argv)
    base = statistics.median(timed(["--help"]) for _ in range(args.repeats))
    lines = ["", f"### `fuyou plan` latency ({time.strftime('%Y-%m-%d')})", "", machine_header(), "",
             f"Command: `python bench/plan_speed.py --repeats {args.repeats}`; median of {args.repeats} fresh "
             f"processes each; `fuyou --help` (the interpreter and the command line, no torch) {base:.2f} s.", "",
             "| plan | median s | target s | met |", "|---|---:|---:|---|"]
    ok = True
    for name, flags in PLANS.items():
        t = statistics.median(timed(["plan", *flags]) for _ in range(args.repeats))
        ok &= t <= TARGET_S
        lines.append(f"| {name} | {t:.1f} | {TARGET_S:.0f} | {'yes' if t <= TARGET_S else 'NO'} |")
    publish(lines, args.markdown)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
