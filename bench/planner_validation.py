"""Validation of the planner's cost model: predicted step time against the engine's, same machine.

1. Probe this machine (``fuyou.planner.probe``): SSD write/read/mixed bandwidth through the store on
   ``--ssd``, the fused AdamW's throughput, and, for each configuration, one block of its model at its
   batch and sequence on the compute device. The model's figures come from the probe only; nothing
   is fitted to the engine's measurements.
2. For each configuration (bounded by different resources), predict the time of ``--steps`` steps run
   back to back from an idle engine (``simulate``: makespan / steps, optimizer work included), then
   run the real engine (``fuyou.engine.engine.Engine``) in a subprocess: ``--warmup`` steps, wait for
   the optimizer, then ``--steps`` timed steps and a final wait for the optimizer; the median over
   ``--repeats`` runs.
3. Report predicted / measured; the target is within 15%.

    flock /tmp/fuyou-bench.lock python bench/planner_validation.py --markdown bench/RESULTS.md
    python bench/planner_validation.py --configs ssd-bound --steps 1 --repeats 1   # smoke
    python bench/planner_validation.py --device cuda --markdown bench/RESULTS.md   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import machine_header, publish, run_worker, timed_engine_run  # bench/ is the script's directory

MODEL = ["model.n_layer=8", "model.d_model=768", "model.n_head=12", "model.vocab_size=320", "model.max_seq_len=256"]
CONFIGS = {
    # compute-bound: 1024 tokens a step, weights cached in CPU memory, optimizer state resident in
    # CPU memory as far as the budget allows (the default), the rest on SSD
    "compute-bound": MODEL + ["data.seq_len=256", "train.micro_batch_size=4", "offload.cpu_mem=1GiB"],
    # SSD-bound: 64 tokens a step, compute weights streamed from SSD at every use (cache off), the
    # optimizer state on SSD
    "ssd-bound": MODEL + ["data.seq_len=64", "train.micro_batch_size=1", "offload.cpu_mem=1GiB",
                          "offload.cache_weights=false", "offload.resident_mem=0"],
    # optimizer-bound: 64 tokens, weights cached, state on SSD: the step is the chain of per-stage
    # AdamW jobs (state read, kernel, write back), which backward and the next forward wait for
    "optimizer-bound": MODEL + ["data.seq_len=64", "train.micro_batch_size=1", "offload.cpu_mem=1GiB",
                                "offload.resident_mem=0"],
    # accumulated: the SSD-bound configuration with 4 micro-batches a step, layer-major (issue 21): each
    # stage computes 4 micro-batches per weight read and optimizer update
    "accumulated": MODEL + ["data.seq_len=64", "train.micro_batch_size=1", "train.grad_accum=4",
                            "offload.cpu_mem=1GiB", "offload.cache_weights=false", "offload.resident_mem=0"],
}
# compressed optimizer state (issue 19): the SSD- and optimizer-bound configurations with a bf16 master and
# int8 moments (4.03 B/param of state instead of 12; the kernel at its measured relative speed)
COMPRESSED = ["optim.master=bf16", "optim.moments=int8"]
CONFIGS["ssd-bound-compressed"] = CONFIGS["ssd-bound"] + COMPRESSED
CONFIGS["optimizer-bound-compressed"] = CONFIGS["optimizer-bound"] + COMPRESSED
#: On a GPU the CPU configurations' compute is negligible beside the SSD: a compute-bound step needs
#: ~30k tokens against the CPU AdamW of resident state (57M params at ~3 Gparam/s: ~20 ms). Not yet
#: run (no GPU was lent to the session that wrote it).
CUDA_CONFIGS = {
    "compute-bound": [o for o in MODEL if "max_seq_len" not in o] + [
        "model.max_seq_len=1024", "data.seq_len=1024", "train.micro_batch_size=32", "offload.cpu_mem=8GiB"],
}
COMMON = ["data.source=synthetic", "train.grad_clip=none", "train.precision=bf16", "train.eval_every=0"]


def worker(args) -> None:
    """One engine run in this process; prints a JSON line with the timed steps' wall time."""
    step_s, counters = timed_engine_run(json.loads(args.overrides), args.steps, args.warmup, "planner-val")
    print(json.dumps({"step_s": step_s, "counters": [c.as_dict() for c in counters]}))


def run_engine(overrides: list[str], args) -> dict:
    return run_worker(__file__, ["--overrides", json.dumps(overrides), "--steps", str(args.steps),
                                 "--warmup", str(args.warmup)], args.timeout, f"engine run {' '.join(overrides)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ssd", default="/tmp/fuyou-planner-val", help="SSD directory (made if missing)")
    p.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if "compressed" not in c], choices=list(CONFIGS),
                   help="configurations (the compressed-state ones on request: ssd-bound-compressed, "
                   "optimizer-bound-compressed)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (back to back)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="engine runs per configuration")
    p.add_argument("--io-bytes", default="512MiB", help="size of the probe's SSD measurement")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="compute device of the probe and the engine (cuda: the compute-bound config is larger)")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--markdown", help="append the report to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device on this machine")
    from fuyou.config import load_config
    from fuyou.planner.cost import Workload
    from fuyou.policy import ActivationPolicy
    from fuyou.planner.probe import probe
    from fuyou.planner.search import memory_plan
    from fuyou.planner.cost import stage_costs
    from fuyou.planner.simulate import simulate_plan
    from fuyou.units import parse_size

    ssd = Path(args.ssd)
    ssd.mkdir(parents=True, exist_ok=True)
    cmd = f"python bench/planner_validation.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    lines = [f"### planner validation ({time.strftime('%Y-%m-%d %H:%M')})", "", f"`{cmd}`", "",
             machine_header(f"device {args.device}") + ". Each repeat probes "
             "(store, AdamW, the config's block) right before its engine run, so both see the same machine; "
             "figures are medians over repeats.", "",
             "| config | probe: store write / read GB/s, AdamW Gparam/s, block fwd / bwd ms, AdamW job efficiency | predicted step | "
             "measured step (runs) | predicted / measured (median of per-run ratios) | predicted bottleneck (busy per step) |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    ratios = []
    med = statistics.median
    configs = {**CONFIGS, **(CUDA_CONFIGS if args.device == "cuda" else {})}
    for name in args.configs:
        overrides = configs[name] + COMMON + [f"train.device={args.device}", "offload.mode=ssd",
                                              f"offload.ssd_dirs={json.dumps([str(ssd)])}"]
        cfg = load_config(overrides=overrides)
        w = Workload.from_config(cfg)
        costs = stage_costs(w)
        policy = ActivationPolicy.recompute_all(cfg.model.n_layer, "gpu", prefetch_depth=cfg.offload.prefetch_depth)
        preds, runs, probes, sims, profs = [], [], [], [], []
        for _ in range(args.repeats):
            hw, meas = probe(ssd, model=cfg.model, batch=w.batch, seq=w.seq, io_bytes=parse_size(args.io_bytes),
                             device=args.device, store_cfg=w.store, optimizer_chunk=cfg.offload.optimizer_chunk,
                             optimizer_depth=cfg.offload.optimizer_depth, precision=cfg.train.precision)
            plan, _ = memory_plan(w, hw, costs, policy, cfg.offload.cpu_mem)
            sim = simulate_plan(w, costs, hw, policy, plan, steps=args.steps)
            preds.append(sim.makespan / args.steps)
            sims.append(sim)
            probes.append(meas)
            profs.append(hw)
            runs.append(run_engine(overrides, args)["step_s"])
        rs = [p_ / m_ for p_, m_ in zip(preds, runs)]
        ratios.append(med(rs))
        sim = sims[len(sims) // 2]
        qb = {k: v for k, v in sorted(sim.queue_busy.items(), key=lambda kv: -kv[1]) if k != "marker"}
        pr = (f"{med(m['store']['write'] for m in probes) / 1e9:.2f} / {med(m['store']['read'] for m in probes) / 1e9:.2f}, "
              f"{med(m['adam_params_per_s'] for m in probes) / 1e9:.2f}, "
              f"{med(m['compute']['fwd_s'] for m in probes) * 1e3:.0f} / {med(m['compute']['bwd_s'] for m in probes) * 1e3:.0f}, "
              f"{med(h.adam_io_efficiency for h in profs):.2f}")
        lines.append(f"| {name} | {pr} | {med(preds):.3f} s ({', '.join(f'{x:.2f}' for x in preds)}) | "
                     f"{med(runs):.3f} s ({', '.join(f'{r:.2f}' for r in runs)}) | **{med(rs):.2f}** "
                     f"({', '.join(f'{r:.2f}' for r in rs)}) | "
                     f"{sim.bottleneck} ({', '.join(f'{k} {v:.2f} s' for k, v in qb.items())}) |")
        print(lines[-1], flush=True)
    lines += ["", f"Within 15%: {sum(abs(r - 1) <= 0.15 for r in ratios)} of {len(ratios)} configurations.", ""]
    publish(lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
