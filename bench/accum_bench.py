"""Gradient accumulation on the layer-major schedule (issue 21): SSD bytes and tokens/s per step.

Three runs of one model, SSD-offloaded (optimizer state on the SSD, compute weights streamed from it):

* ``G x 1``: the global batch of ``G`` sequences in one micro-batch;
* ``G/8 x 8``: the same global batch in 8 micro-batches, layer-major (each stage runs all 8 before
  the next; its weights are read and its optimizer state read and written once per step);
* ``G/8 x 1``: one of those micro-batches per step, the step of a user who cannot fit more.

The engine counts the bytes (``StepCounters``): weights and optimizer state should be the same for
the first two and for the third, activations ``M`` times a micro-batch's. Tokens/s: the first two
should be close (same work, smaller matmuls), the third far lower on an SSD-bound machine (the same
state traffic for an eighth of the tokens). Runs are interleaved, each in a fresh process; medians.

    flock /tmp/fuyou-bench.lock python bench/accum_bench.py --markdown bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import machine_header, publish, run_worker, timed_engine_run  # bench/ is the script's directory

MODEL = ["model.n_layer=8", "model.d_model=768", "model.n_head=12", "model.vocab_size=320", "model.max_seq_len=256"]
COMMON = ["data.source=synthetic", "train.grad_clip=none", "train.precision=bf16", "train.eval_every=0",
          "offload.cpu_mem=2GiB", "offload.cache_weights=false", "offload.resident_mem=0",
          "offload.act_policy=recompute"]


def worker(args) -> None:
    step_s, counters = timed_engine_run(json.loads(args.overrides), args.steps, args.warmup, "accum-bench")
    total = {k: sum(c.as_dict()[k] for c in counters) / args.steps
             for k in counters[0].as_dict() if k.endswith("_bytes")}
    print(json.dumps({"step_s": step_s, "bytes": total}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ssd", default="/tmp/fuyou-accum-bench", help="SSD directory (made if missing)")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step of the first two runs")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--markdown")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.steps, args.repeats, args.global_batch, args.seq) < 1 or args.warmup < 0:
        p.error("--steps, --repeats, --global-batch and --seq must be at least 1, --warmup at least 0")
    if args.worker:
        worker(args)
        return 0
    g = args.global_batch
    if g % 8:
        p.error("--global-batch must be a multiple of 8")
    ssd = Path(args.ssd)
    ssd.mkdir(parents=True, exist_ok=True)
    runs = {f"{g} x 1": (g, 1), f"{g // 8} x 8": (g // 8, 8), f"{g // 8} x 1": (g // 8, 1)}
    res: dict[str, list[dict]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, (mb, accum) in runs.items():
            ov = MODEL + COMMON + [f"data.seq_len={args.seq}", f"train.micro_batch_size={mb}",
                                   f"train.grad_accum={accum}", "offload.mode=ssd",
                                   f"offload.ssd_dirs={json.dumps([str(ssd)])}"]
            res[name].append(run_worker(__file__, ["--overrides", json.dumps(ov), "--steps", str(args.steps),
                                                   "--warmup", str(args.warmup)], args.timeout, name))
            print(name, res[name][-1]["step_s"], flush=True)
    med = statistics.median
    cmd = f"python bench/accum_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    lines = [f"### gradient accumulation, layer-major ({time.strftime('%Y-%m-%d %H:%M')})", "", f"`{cmd}`", "",
             machine_header() + f". GPT 8 x 768 (57M parameters), sequence {args.seq}, bf16, SSD offload: "
             "optimizer state and compute weights on the SSD (cache off, nothing resident), recompute; "
             f"{args.steps} timed steps after {args.warmup}, median of {args.repeats} interleaved runs. Bytes "
             "per step from the engine's counters (weights + optimizer state = SSD bytes less activations).", "",
             "| micro-batch x micro-batches | tokens/step | step s (runs) | tokens/s | SSD read MB/step (state+weights, activations) | SSD write MB/step (state, activations) | H2D MB/step |",
             "|---|---|---|---|---|---|---|"]
    for name, (mb, accum) in runs.items():
        rs = res[name]
        step = med(r["step_s"] for r in rs)
        b = rs[len(rs) // 2]["bytes"]
        tokens = mb * accum * args.seq
        rd_a, wr_a = b.get("act_ssd_read_bytes", 0), b.get("act_ssd_write_bytes", 0)
        each = ", ".join(f"{r['step_s']:.2f}" for r in rs)
        lines.append(f"| {name} | {tokens} | {step:.3f} ({each}) | "
                     f"{tokens / step:.0f} | {(b['ssd_read_bytes'] - rd_a) / 1e6:.1f}, {rd_a / 1e6:.1f} | "
                     f"{(b['ssd_write_bytes'] - wr_a) / 1e6:.1f}, {wr_a / 1e6:.1f} | {b.get('h2d_bytes', 0) / 1e6:.1f} |")
    lines.append("")
    publish(lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
