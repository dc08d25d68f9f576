"""A model whose training state is several times the CPU budget: does the budget hold? (issue 5)

Runs ``fuyou train`` with SSD offload in a fresh process (default: GPT-3 1.3B, about 21 GB of fp32
weights, Adam moments and bf16 weights, under a 4 GiB CPU budget) for a few real steps, then reads
the run's metrics: step times, the engine's counters and the peak resident memory (VmHWM), against
the fixed overhead the engine measured at start plus the budget.

    python bench/budget_bench.py --ssd /tmp/fuyou-budget --markdown bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuyou.engine.commit import state_name
from fuyou.models import ModelConfig, StageModel, preset
from fuyou.units import format_size, parse_size
from common import publish, repo_env  # bench/ is the script's directory: what all benchmarks share


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt3-1.3b")
    p.add_argument("--cpu-mem", default="4GiB")
    p.add_argument("--ssd", default="/tmp/fuyou-budget")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides")
    p.add_argument("--markdown", help="append the report here")
    args = p.parse_args(argv)
    ssd = Path(args.ssd)
    ssd.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="fuyou-budget-runs-"))
    model = StageModel(ModelConfig(**preset(args.model)))
    state = 14 * model.num_params
    cmd = [sys.executable, "-m", "fuyou.cli", "train", "--model", args.model, "--offload", "ssd", "--ssd", str(ssd),
           "--cpu-mem", args.cpu_mem, "--out", str(out), "data.source=synthetic", f"data.seq_len={args.seq}",
           f"train.micro_batch_size={args.batch}",
           f"train.steps={args.steps}", "train.grad_clip=none", "train.eval_every=0", "train.log_every=1",
           "run.save_weights=false", *args.extra]
    before = set(ssd.iterdir())
    try:  # (fuyou from PATH measured whatever was installed, not this checkout: a pass)
        return _measure(args, argv, cmd, out, model, state)
    finally:  # the run and its state (kept: the run saves no weights) are the benchmark's: 32 GB a run was left
        for run_dir in out.iterdir():
            made = ssd / state_name(run_dir.name)
            if made not in before:  # (not a state of that name that was there before: another run's)
                shutil.rmtree(made, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def _measure(args, argv, cmd, out: Path, model, state: int) -> int:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=repo_env())
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        print(res.stderr[-4000:], file=sys.stderr)
        return 1
    overhead = parse_size(re.search(r"fixed overhead before the engine: ([0-9.]+ \w+)", res.stderr).group(1).replace(" ", ""))
    (run_dir,) = out.iterdir()
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss" in l]
    peak = next(l for l in lines if l.get("summary"))["peak_rss_bytes"]
    budget = parse_size(args.cpu_mem)
    ok = peak <= overhead + budget
    rows = [f"### {args.model} under a {args.cpu_mem} CPU budget ({time.strftime('%Y-%m-%d')})", "",
            f"`python bench/budget_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
            f"(runs `fuyou train ...` with the overrides shown in the script)", "",
            f"- parameters {model.num_params / 1e9:.3g} B; training state on SSD + cache {format_size(state)} "
            f"= {state / budget:.1f}x the budget; batch {args.batch} x {args.seq} tokens",
            f"- peak resident memory {format_size(peak)} <= fixed overhead {format_size(overhead)} + budget "
            f"{format_size(budget)} = {format_size(overhead + budget)}: **{'kept' if ok else 'EXCEEDED'}**",
            f"- wall time of the whole run (init of the SSD state included) {wall:.0f} s", "",
            "| step | loss | step time | compute | wait weights / optimizer | AdamW busy | SSD read | SSD write |",
            "|---|---|---|---|---|---|---|---|"]
    for s in steps:
        rows.append(f"| {s['step']} | {s['loss']:.3f} | {s['step_time_s']:.1f} s | {s['compute_s']:.1f} s | "
                    f"{s['wait_weights_s']:.1f} / {s['wait_optimizer_s']:.1f} s | {s['optimizer_busy_s']:.1f} s | "
                    f"{format_size(s['ssd_read_bytes'])} | {format_size(s['ssd_write_bytes'])} |")
    plan = res.stderr[res.stderr.find("CPU budget"):res.stderr.find("fixed overhead")]
    rows += ["", "Memory plan printed by the engine:", "```", plan.strip(), "```", ""]
    publish(rows, args.markdown)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
