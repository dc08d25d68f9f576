"""Data parallelism on one machine: one process against N torchrun ranks on the same global batch.

    python bench/dp_bench.py --ssd /tmp/dpbench --ranks 2 --repeats 3 --markdown bench/RESULTS.md
    python bench/dp_bench.py --ssd /tmp/dpbench --ranks 2 --repeats 3 --precision bf16 --cache --peer

``--peer`` adds DeepSpeed ZeRO-Infinity (``bench/zero_infinity.py``: ZeRO-3 with parameters and optimizer
state on NVMe, under torchrun with 1 and N processes, ``--ds-python`` from tools/setup_deepspeed_peer.sh)
on the same model, batches, global batch and directory, alternating with fuyou's runs.

Each run is ``fuyou train`` from the command line (the ranks through ``python -m torch.distributed.run``)
on the same model, data, global batch and SSD directory, alternating one process and N ranks
``--repeats`` times. Reported per configuration (medians over the runs): tokens/s over the steps after
the first, the SSD bytes per step rank 0 reads and writes (its optimizer state and, with sharding, the
compute weights it receives), and the size of each rank's state on the SSD. The weights both end with
are compared (they are the same model: tests/distributed/test_data_parallel.py checks how exactly).

On a CPU-only machine the ranks share the cores (torchrun gives each one thread; the single process
gets ``--threads``), so tokens/s says little about GPUs; the per-rank SSD traffic (1/N of the
optimizer state) is the point here.

The planner's prediction of both steps (``fuyou plan --gpus N``'s model: ``fuyou.planner.simulate``
with ``Workload.ranks``) is set beside the measured ones, from a probe of this machine
(``fuyou.planner.probe``: compute, store, AdamW, gloo between two processes) made before the runs.
Exact clipping is predicted in the mode the runs were in: most steps clipped (the norm above
``train.grad_clip``: updates wait for the norm) or not (speculative updates).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import DS_VENV, machine_header, publish, repo_env, require_deepspeed  # noqa: E402


def overrides(args) -> list[str]:
    """The run's settings as ``fuyou train`` overrides (the SSD directory and budget are flags there)."""
    return [f"model.preset={args.model}", f"model.n_layer={args.layers}", f"model.d_model={args.width}",
            f"model.n_head={max(1, args.width // 64)}", f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}",
            f"train.micro_batch_size={args.batch}", f"train.grad_accum={args.accum}", f"train.steps={args.steps}",
            "train.eval_every=0", "train.log_every=1", f"train.precision={args.precision}", f"train.device={args.device}",
            f"train.grad_clip={args.grad_clip}", "offload.keep_state=true", "offload.resident_mem=0",
            f"offload.cache_weights={str(args.cache).lower()}"]


def predict(args, ranks: int, hw, clipped: bool) -> float:
    """The planner's steady-state step for this run on ``ranks`` ranks (each with its share of --cpu-mem)."""
    import dataclasses

    from fuyou.config import load_config
    from fuyou.planner.cost import Workload, stage_costs
    from fuyou.planner.search import memory_plan
    from fuyou.planner.simulate import simulate_plan
    from fuyou.policy import ActivationPolicy
    from fuyou.units import parse_size

    ssd = Path(args.ssd) / "state"
    cfg = load_config(overrides=overrides(args) + ["offload.mode=ssd", f"offload.ssd_dirs={json.dumps([str(ssd)])}",
                                                   f"offload.cpu_mem={parse_size(args.cpu_mem) // ranks}"])
    w = dataclasses.replace(Workload.from_config(cfg), ranks=ranks)
    costs = stage_costs(w)
    policy = ActivationPolicy.recompute_all(cfg.model.n_layer, "gpu", prefetch_depth=cfg.offload.prefetch_depth)
    plan, _ = memory_plan(w, hw, costs, policy, cfg.offload.cpu_mem)
    mode = "defer" if clipped and w.grad_clip is not None else "speculate"
    return simulate_plan(w, costs, hw, policy, plan, steps=4, clip_mode=mode).step_time


def torchrun(python: str, ranks: int) -> list[str]:
    """torchrun under ``python`` with ``ranks`` processes on this machine, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [python, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
            f"--master_port={port}"]


def run_peer(args, ranks: int, name: str) -> dict:
    """DeepSpeed ZeRO-Infinity (``bench/zero_infinity.py``: ZeRO-3, parameters and optimizer state on NVMe)
    on the same model, batches, global batch and directory, under torchrun with ``ranks`` processes."""
    nvme = Path(args.ssd) / "zinf" / name
    out = Path(args.ssd) / f"{name}.json"
    clip = "0" if args.grad_clip == "none" else args.grad_clip
    cmd = [*torchrun(args.ds_python, ranks), str(Path(__file__).parent / "zero_infinity.py"), "--model", args.model,
           "--model-set", f"n_layer={args.layers}", "--model-set", f"d_model={args.width}",
           "--model-set", f"n_head={max(1, args.width // 64)}", "--model-set", f"max_seq_len={args.seq}",
           "--batch", str(args.batch), "--seq", str(args.seq), "--grad-accum", str(args.accum),
           "--steps", str(args.steps), "--warmup", "1", "--grad-clip", clip, "--nvme-dir", str(nvme),
           "--no-reference-loss", "--json", str(out)]
    env = repo_env()  # the carried packages' PYTHONPATH kept
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    res = json.loads(out.read_text())
    out.unlink()
    shutil.rmtree(nvme, ignore_errors=True)
    return {"tps": res["tokens_per_s"], "read": res["read_bytes_per_step"], "written": res["write_bytes_per_step"],
            "rss": res["peak_rss_bytes"]}


def run(args, ranks: int, name: str) -> dict:
    out = Path(args.ssd) / "runs"
    ssd = Path(args.ssd) / "state"
    ssd.mkdir(parents=True, exist_ok=True)
    cli = ["train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", args.cpu_mem, *overrides(args),
           f"run.out_dir={out}", f"run.name={name}"]
    env = {**os.environ}
    if ranks == 1:
        cmd = [sys.executable, "-m", "fuyou.cli", *cli, f"train.threads={args.threads}"]
    else:
        cmd = [*torchrun(sys.executable, ranks), "-m", "fuyou.cli", *cli]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x and x["step"] > 1]
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in ssd.iterdir()
             if p.name.startswith(f"{name}.fuyou-state")}
    from safetensors.torch import load_file

    clip = float(args.grad_clip) if args.grad_clip != "none" else None
    result = {"tps": statistics.median(x["tokens_per_s"] for x in steps),
              "clipped": clip is not None and sum(x["grad_norm"] > clip for x in steps) > len(steps) / 2,
              "read": statistics.median(x["ssd_read_bytes"] for x in steps),
              "written": statistics.median(x["ssd_write_bytes"] for x in steps),
              "sizes": [sizes[k] for k in sorted(sizes)], "weights": load_file(out / name / "model.safetensors")}
    shutil.rmtree(out / name)
    for k in sizes:
        shutil.rmtree(ssd / k)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ssd", required=True, help="a directory on the SSD (runs and states are made under it)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--model", default="gpt-test")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--cpu-mem", default="2GiB")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="train.device: cpu (gloo), or cuda (NCCL, one GPU per rank)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--cache", action="store_true", help="cache the compute weights in CPU memory (the ranks of the "
                   "machine share one cache; default: streamed from the SSD, to measure the SSD traffic)")
    p.add_argument("--grad-clip", default="1.0", help="train.grad_clip (default 1.0, exact clipping; or none)")
    p.add_argument("--peer", action="store_true", help="also DeepSpeed ZeRO-Infinity on 1 and N ranks (bench/"
                   "zero_infinity.py under --ds-python; bf16, as it runs)")
    p.add_argument("--ds-python", default=DS_VENV,
                   help="interpreter with deepspeed (tools/setup_deepspeed_peer.sh)")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    if args.peer and args.precision != "bf16":
        raise SystemExit("--peer compares with ZeRO-Infinity in bf16: give --precision bf16")
    if args.peer:
        require_deepspeed("--peer (DeepSpeed ZeRO-Infinity, bench/zero_infinity.py)", args.ds_python)
    if args.accum % args.ranks:
        raise SystemExit(f"--accum {args.accum} must be a multiple of --ranks {args.ranks}")
    from fuyou.planner.probe import probe

    probe_dir = Path(args.ssd) / "probe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    from fuyou.config import load_config

    model = load_config(overrides=overrides(args)).model  # its block is what the probe times
    hw, _ = probe(probe_dir, model=model, batch=args.batch, seq=args.seq, io_bytes=128 * 2**20, device=args.device,
                  precision=args.precision)
    shutil.rmtree(probe_dir)
    results: dict[int, list[dict]] = {1: [], args.ranks: []}
    peer: dict[int, list[dict]] = {1: [], args.ranks: []}
    for i in range(args.repeats):
        for n in (1, args.ranks):
            results[n].append(run(args, n, f"dp{n}-{i}"))
        for n in (1, args.ranks) if args.peer else ():
            peer[n].append(run_peer(args, n, f"zinf{n}-{i}"))
    one, many = results[1], results[args.ranks]
    worst = max(float((a["weights"][k] - b["weights"][k]).abs().max()) for a, b in zip(one, many) for k in a["weights"])
    med = lambda rs, key: statistics.median(r[key] for r in rs)  # noqa: E731
    gib = 2**30
    cmd = "python bench/dp_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    params = sum(t.numel() for t in one[0]["weights"].values())
    lines = [
        f"### Data parallel: 1 process vs {args.ranks} ranks (torchrun, gloo), {args.model} {args.layers}x{args.width} "
        f"({params / 1e6:.1f}M parameters), global batch {args.accum}x{args.batch}x{args.seq}, {args.precision} on "
        f"{args.device}, state on the SSD, " + ("weights cached in CPU memory (one cache the ranks share)" if args.cache
                                                else "weights streamed from the SSD"),
        "", f"Machine: {machine_header()}.", f"Command: `{cmd}`", "",
        "| | tokens/s | step measured | step predicted (planner) | predicted / measured | rank 0 SSD read per step "
        "| rank 0 SSD written per step | state on the SSD per rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    tokens = args.accum * args.batch * args.seq
    for n, rs in ((1, one), (args.ranks, many)):
        sizes = ", ".join(f"{s / gib:.3f}" for s in rs[0]["sizes"])
        measured = tokens / med(rs, "tps")
        predicted = predict(args, n, hw, sum(r["clipped"] for r in rs) > len(rs) / 2)
        lines.append(f"| {n} {'process' if n == 1 else 'ranks'} | {med(rs, 'tps'):.0f} | {measured:.3f} s | "
                     f"{predicted:.3f} s | **{predicted / measured:.2f}** | {med(rs, 'read') / gib:.3f} GiB "
                     f"| {med(rs, 'written') / gib:.3f} GiB | {sizes} GiB |")
    for n, rs in ((1, peer[1]), (args.ranks, peer[args.ranks])) if args.peer else ():
        lines.append(f"| ZeRO-Infinity, {n} {'process' if n == 1 else 'ranks'} | {med(rs, 'tps'):.0f} | "
                     f"{tokens / med(rs, 'tps'):.3f} s | - | - | {med(rs, 'read') / gib:.3f} GiB | "
                     f"{med(rs, 'written') / gib:.3f} GiB | - |")
    if args.peer:
        lines += ["", f"fuyou against ZeRO-Infinity at the same world size: **{med(one, 'tps') / med(peer[1], 'tps'):.2f}x** "
                      f"tokens/s with 1 process, **{med(many, 'tps') / med(peer[args.ranks], 'tps'):.2f}x** with "
                      f"{args.ranks} ranks. ZeRO-Infinity's bytes are /proc/self/io of its rank 0 (every thread's "
                      f"O_DIRECT and libaio I/O); fuyou's are the engine's counters of rank 0."]
    lines += ["", f"Rank 0's SSD traffic per step is {med(many, 'read') / med(one, 'read'):.2f}x (read) and "
                  f"{med(many, 'written') / med(one, 'written'):.2f}x (written) the single process's; tokens/s "
                  f"{med(many, 'tps') / med(one, 'tps'):.2f}x. Largest weight difference between the two after "
                  f"{args.steps} steps: {worst:.3g} (summation order of the micro-batches' gradients). Medians of "
                  f"{args.repeats} alternating runs. The predictions use a probe of this machine made before the runs "
                  f"(gloo between two processes: broadcast {hw.gloo_broadcast / 1e9:.2f} GB/s, reduce "
                  f"{hw.gloo_reduce / 1e9:.2f} GB/s).", ""]
    publish(lines, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
