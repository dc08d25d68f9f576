"""End-to-end benchmark of the three-tier engine against in-memory training (issue 5).

For each configuration it runs, alternating, each in its own process: the in-memory reference
trainer (``offload.mode=none``) and the engine with SSD offload on ``--ssd``; each run does
``--warmup`` untimed steps then ``--steps`` timed ones, and reports its median step time and the
engine's counters (compute, waits, optimizer busy and kernel time, SSD bytes). In the same
invocation it measures the store's read and write bandwidth on the same directory.

The overlap target: engine step <= 1.2 x max(in-memory step, SSD time, optimizer time), where SSD
time = bytes read / read bandwidth + bytes written / write bandwidth (one device shares both) and
optimizer time = the AdamW busy time. On a CPU-only machine compute and the AdamW kernel share the
same cores, so there the compute bound is in-memory step + AdamW kernel time, and that is the
figure used.

    python bench/engine_bench.py --ssd /tmp/fuyou-bench --repeats 3            # defaults below
    python bench/engine_bench.py --configs balanced --steps 2 --repeats 1      # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import machine_header, publish, run_worker  # bench/ is the script's directory

CONFIGS = {
    # compute and SSD time of the same order: weights cached in CPU memory, state on SSD
    "balanced": ["model.n_layer=8", "model.d_model=768", "model.n_head=12", "model.vocab_size=320",
                 "data.seq_len=256", "train.micro_batch_size=4", "offload.cpu_mem=1GiB"],
    # the same with every block's activations kept in memory: no recomputation (a CPU device's
    # "gpu" tier is its RAM)
    "balanced-keep": ["model.n_layer=8", "model.d_model=768", "model.n_head=12", "model.vocab_size=320",
                      "data.seq_len=256", "train.micro_batch_size=4", "offload.cpu_mem=2GiB",
                      "offload.act_policy=all=gpu"],
    # SSD-bound: little compute per step (one short sequence), weights streamed from the SSD too
    "ssd-bound": ["model.n_layer=8", "model.d_model=768", "model.n_head=12", "model.vocab_size=320",
                  "data.seq_len=64", "train.micro_batch_size=1", "offload.cpu_mem=1GiB",
                  "offload.cache_weights=false"],
}
# Activation policies on a model where recomputation is costly (long sequences: attention and the
# MLP dominate), same model and data each: the inputs the planner's cost model must predict.
_ACT = ["model.n_layer=6", "model.d_model=512", "model.n_head=8", "model.vocab_size=320", "model.max_seq_len=1024",
        "data.seq_len=1024", "train.micro_batch_size=2", "offload.cpu_mem=3GiB"]
CONFIGS.update({
    "act-recompute": _ACT + ["offload.act_policy=recompute"],
    "act-all-cpu": _ACT + ["offload.act_policy=all=cpu", "offload.act_cpu_mem=2GiB"],
    "act-ssd": _ACT + ["offload.act_policy=fc2,proj,qkv,fc1=ssd"],
    "act-mixed": _ACT + ["offload.act_policy=fc2,proj=cpu;0-2:qkv=ssd", "offload.act_cpu_mem=512MiB"],
})
# On a GPU (tools/gpu_check.sh): GPT-3 1.3B held to a 24 GiB device budget, the 4090-class card.
CONFIGS["gpu-1.3b"] = ["model.preset=gpt3-1.3b", "data.seq_len=1024", "train.micro_batch_size=8",
                       "offload.cpu_mem=32GiB", "offload.gpu_mem=24GiB", "train.device=cuda"]
COMMON = ["data.source=synthetic", "train.grad_clip=none", "train.precision=bf16", "train.eval_every=0"]


def worker(args) -> None:
    """One run in this process; prints a JSON line."""
    from fuyou.config import load_config
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine
    from fuyou.engine.malloc import resident_bytes
    from fuyou.train.reference import ReferenceTrainer

    overrides = json.loads(args.overrides)
    cfg = load_config(overrides=overrides)
    data = load_data(cfg.data)
    trainer = Engine(cfg, data, f"bench-{os.getpid()}") if cfg.offload.mode == "ssd" else ReferenceTrainer(cfg, data)
    times, counters = [], []
    for step in range(args.warmup + args.steps):
        if hasattr(trainer, "worker"):
            trainer.worker.wait_all()  # each timed step includes its own optimizer work, nothing earlier
        t0 = time.perf_counter()
        trainer.train_step(step)
        if hasattr(trainer, "worker"):
            trainer.worker.wait_all()
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
            if hasattr(trainer, "counters"):
                counters.append(trainer.counters.as_dict())
    if hasattr(trainer, "close"):
        trainer.completed = True  # a benchmark run: delete its SSD state at close
        trainer.close()
    from fuyou.planner.cost import Workload

    print(json.dumps({"times": times, "counters": counters, "peak_rss": resident_bytes("VmHWM"),
                      "model_flops": Workload.from_config(cfg).model_flops, "device": trainer.device.type}))


def run_one(overrides: list[str], args) -> dict:
    return run_worker(__file__, ["--overrides", json.dumps(overrides), "--steps", str(args.steps),
                                 "--warmup", str(args.warmup)], args.timeout, f"run {' '.join(overrides)}")


def store_bandwidth(d: Path, nbytes: int) -> tuple[float, float]:
    """Write and read bandwidth through the store on ``d``, in the optimizer's request pattern."""
    from fuyou.planner.probe import probe_store

    r = probe_store(d, nbytes, repeats=3)
    return r["write"], r["read"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ssd", default="/tmp/fuyou-engine-bench", help="SSD directory (made if missing)")
    p.add_argument("--configs", nargs="+", default=["balanced", "balanced-keep", "ssd-bound"], choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs of each system, alternating")
    p.add_argument("--io-bytes", default="512MiB", help="size of the store bandwidth measurement")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--markdown", help="append the report to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from fuyou.units import format_size, parse_size

    ssd = Path(args.ssd)
    ssd.mkdir(parents=True, exist_ok=True)
    wbw, rbw = store_bandwidth(ssd, parse_size(args.io_bytes))
    lines = [f"### engine vs in-memory ({time.strftime('%Y-%m-%d')})", "",
             f"`python bench/engine_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             machine_header(f"store on {ssd}: write {wbw / 1e9:.2f} GB/s, read {rbw / 1e9:.2f} GB/s (same run)"), "",
             "| config | in-memory step | engine step | compute (device events) | compute busy | model TFLOPS | AdamW busy / kernel | SSD read / write per step | SSD time | bound | engine / bound | peak RSS engine | activations kept: CPU / SSD out / SSD in, wait |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.configs:
        base = CONFIGS[name] + COMMON
        ref_t, eng_t, eng_c, rss = [], [], [], []
        for _ in range(args.repeats):
            ref_t += run_one(base + ["offload.mode=none"], args)["times"]
            r = run_one(base + ["offload.mode=ssd", f"offload.ssd_dirs={json.dumps([str(ssd)])}"], args)
            eng_t += r["times"]
            on_cpu = r["device"] == "cpu"
            flops = r["model_flops"]
            eng_c += r["counters"]
            rss.append(r["peak_rss"])
        med = statistics.median
        ref_s, eng_s = med(ref_t), med(eng_t)
        c = {k: med(x[k] for x in eng_c) for k in eng_c[0]}
        ssd_s = c["ssd_read_bytes"] / rbw + c["ssd_write_bytes"] / wbw
        # On a CPU, compute and AdamW share the cores; on a GPU the AdamW runs beside the compute.
        compute_bound = ref_s + (c["optimizer_kernel_s"] if on_cpu else 0.0)
        bound = max(compute_bound, ssd_s, c["optimizer_busy_s"])
        lines.append(
            f"| {name} | {ref_s:.2f} s | {eng_s:.2f} s (spread {min(eng_t):.2f}-{max(eng_t):.2f}) | {c['compute_s']:.2f} s | "
            f"{c['compute_s'] / eng_s:.0%} | {flops / eng_s / 1e12:.2f} | "
            f"{c['optimizer_busy_s']:.2f} / {c['optimizer_kernel_s']:.2f} s | "
            f"{format_size(c['ssd_read_bytes'])} / {format_size(c['ssd_write_bytes'])} | {ssd_s:.2f} s | {bound:.2f} s | "
            f"**{eng_s / bound:.2f}** | {format_size(max(rss))} | {format_size(c['act_cpu_bytes'])} / "
            f"{format_size(c['act_ssd_write_bytes'])} / {format_size(c['act_ssd_read_bytes'])}, {c['wait_activations_s']:.2f} s |")
        print(lines[-1], flush=True)
    lines += ["", "bound = max(in-memory step (+ AdamW kernel time when the compute is on the CPU: shared cores), SSD bytes / measured "
              "bandwidth, AdamW busy time); target engine / bound <= 1.2.", ""]
    publish(lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
