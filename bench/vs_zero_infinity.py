"""fuyou against DeepSpeed ZeRO-Infinity, side by side (issue 8).

For one model preset, micro-batch, sequence length, SSD directory and CPU memory budget it trains
the same model (``StageModel``, same initial weights from ``init_params(seed)``, same batches, constant
learning rate, AdamW with the same hyper-parameters, the same ``--precision``, global-norm clipping at
``--clip`` on both sides or none) for a few steps with

1. **fuyou**: the three-tier engine, ``offload.mode=ssd``; fp32 master weights, Adam moments and
   activations the policy spills live in ``--ssd``; ``offload.cpu_mem`` = ``--cpu-mem``;
   activation policy ``--policy`` (a rule string, or ``auto``: the planner's choice, as ``fuyou train
   --plan auto``; the probe it runs is not timed);
2. **ZeRO-Infinity**: DeepSpeed ZeRO-3 with ``offload_param`` and ``offload_optimizer`` on NVMe in the
   same directory, run by ``bench/zero_infinity.py`` (its docstring documents the settings) under
   ``--ds-python``; ``--ds-arg`` passes its options through;
3. **in-memory** PyTorch (``ReferenceTrainer``), where the whole state fits, as the compute-bound
   reference (``--inmemory auto``: when 16 B/param + activations fit in half the available memory).

Runs alternate (fuyou, ZeRO-Infinity, in-memory, fuyou, ...), each in its own process, and each
leaves ``--warmup`` steps out of its timings. Per system it reports tokens/s and model TFLOPS (from the
median step; ``StageModel.flops_per_token``, recomputation not counted), the median step time and its
spread (min-max over all timed steps of all runs), peak resident CPU memory (VmHWM), peak GPU memory
(CUDA only), bytes written to the SSD per timed step (``/proc/self/io`` write_bytes for every system:
one method for all; the engine's own counter is shown beside it) and the final loss. The final losses
must agree within ``--loss-tol`` (relative; bf16 runs of the same model drift apart by rounding only),
and step 0's too; a mismatch is reported and makes the exit status 1.

    flock /tmp/fuyou-bench.lock python bench/vs_zero_infinity.py --model gpt3-350m --batch 4 --seq 512 \\
        --ssd /tmp/vs-zinf --cpu-mem 4GiB --steps 4 --warmup 1 --repeats 2 --markdown bench/RESULTS.md
    python bench/vs_zero_infinity.py --model gpt-tiny --batch 2 --seq 32 --steps 2 --warmup 1 --repeats 1   # smoke

fuyou runs under this interpreter; DeepSpeed under ``--ds-python`` (default: this one if it imports
deepspeed, else /tmp/dsvenv/bin/python, the venv of ``tools/setup_deepspeed_peer.sh``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fuyou.engine.malloc import resident_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DS_VENV, machine_header, publish, require_deepspeed, run_worker  # noqa: E402

HERE = Path(__file__).resolve().parent
ZINF = HERE / "zero_infinity.py"


# -- measurement helpers (the same for every system) ------------------------------------------------
def proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k.strip(): int(v) for k, v in (line.split(":") for line in f)}


def overrides_for(args, data: str, system: str, ssd: Path | None) -> list[str]:
    """fuyou config for one run: constant learning rate and the clipping of the DeepSpeed side."""
    o = [f"model.preset={args.model}", f"data.source={data}", f"data.seq_len={args.seq}",
         f"train.micro_batch_size={args.batch}", f"train.grad_accum={args.grad_accum}",
         f"train.grad_clip={args.clip}", f"train.precision={args.precision}",
         "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.eval_every=0", f"train.seed={args.seed}",
         f"train.steps={args.warmup + args.steps}", f"train.device={args.device}"]
    if args.lr is not None:
        o.append(f"optim.lr={args.lr}")
    if system.startswith("fuyou"):
        o += ["offload.mode=ssd", f"offload.ssd_dirs={json.dumps([str(ssd)])}", f"offload.cpu_mem={args.cpu_mem}"]
        if args.policy != "auto":
            o.append(f"offload.act_policy={args.policy}")
        o += args.fuyou_set
        o += variants(args).get(system, [])
    else:
        o.append("offload.mode=none")
    return o


# -- one run in this process (fuyou or in-memory) ---------------------------------------------------
def worker(args) -> None:
    from fuyou.config import load_config
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine
    from fuyou.train.reference import ReferenceTrainer

    cfg = load_config(overrides=json.loads(args.overrides))
    run_dir = Path(tempfile.mkdtemp(prefix="vs-zinf-plan-"))
    if cfg.offload.mode == "ssd" and args.policy == "auto":
        from fuyou.planner.auto import plan_config

        cfg = plan_config(cfg, run_dir, stream=sys.stderr)
    data = load_data(cfg.data)
    t_init = time.perf_counter()
    trainer = Engine(cfg, data, f"vs-{os.getpid()}") if cfg.offload.mode == "ssd" else ReferenceTrainer(cfg, data)
    t_init = time.perf_counter() - t_init
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    times, losses, counters, io0 = [], [], [], None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            io0 = proc_io()
        t0 = time.perf_counter()
        stats = trainer.train_step(step)
        if hasattr(trainer, "worker"):
            trainer.worker.wait_all()  # a step's time includes all of its optimizer work
        times.append(time.perf_counter() - t0)
        losses.append(stats.loss)
        if hasattr(trainer, "counters"):
            counters.append(trainer.counters.as_dict())
        print(f"step {step} loss {stats.loss:.4f} {times[-1]:.2f} s", file=sys.stderr, flush=True)
    io1 = proc_io()
    n = args.steps
    res = {"step_times_s": times, "losses": losses, "peak_rss_bytes": resident_bytes("VmHWM"), "init_s": t_init,
           "write_bytes_per_step": (io1["write_bytes"] - io0["write_bytes"]) / n,
           "read_bytes_per_step": (io1["read_bytes"] - io0["read_bytes"]) / n,
           "peak_gpu_bytes": torch.cuda.max_memory_allocated(trainer.device) if cuda else None,
           "device": str(trainer.device), "policy": cfg.offload.act_policy if cfg.offload.mode == "ssd" else None}
    if counters:
        timed = counters[args.warmup:]
        res["counters"] = {k: statistics.median(c[k] for c in timed) for k in timed[0]}
        res["fixed_overhead_bytes"] = trainer.fixed_overhead
        if str(cfg.offload.act_policy).endswith(".json"):
            res["policy"] = json.loads(Path(cfg.offload.act_policy).read_text())
    if hasattr(trainer, "close"):
        trainer.completed = True  # a benchmark run: delete its SSD state at close
        trainer.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps(res))


# -- the driver -------------------------------------------------------------------------------------
def variants(args) -> dict[str, list[str]]:
    """``--fuyou-variant 'NAME=KEY=VALUE,KEY=VALUE'``: more fuyou systems, named ``fuyou NAME``."""
    out = {}
    for v in args.fuyou_variant:
        name, _, sets = v.partition("=")
        out[f"fuyou {name.strip()}"] = [kv.strip() for kv in sets.split(",") if kv.strip()]
    return out


def run_fuyou(args, data: str, system: str, ssd: Path) -> dict:
    return run_worker(__file__, ["--overrides", json.dumps(overrides_for(args, data, system, ssd)),
                                 "--steps", str(args.steps), "--warmup", str(args.warmup), "--policy", args.policy],
                      args.timeout, f"{system} run")


def run_deepspeed(args, data: str, ssd: Path) -> dict:
    nvme = ssd / f"zinf-{os.getpid()}"
    shutil.rmtree(nvme, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "zinf.json"
        cmd = [args.ds_python, str(ZINF), "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
               "--grad-accum", str(args.grad_accum),
               "--steps", str(args.warmup + args.steps), "--warmup", str(args.warmup), "--data", data,
               "--seed", str(args.seed), "--nvme-dir", str(nvme), "--cpu-mem-note", args.cpu_mem,
               "--precision", args.precision, "--no-reference-loss", "--json", str(out_json)]
        if args.lr is not None:
            cmd += ["--lr", str(args.lr)]
        if args.clip != "none":
            cmd += ["--grad-clip", args.clip]
        cmd += [a for arg in args.ds_arg for a in shlex.split(arg)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        shutil.rmtree(nvme, ignore_errors=True)
        if out.returncode != 0:
            raise RuntimeError(f"ZeRO-Infinity run failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        return json.loads(out_json.read_text())


def _fuyou_commit(args) -> str:
    """fuyou's commit interval in this run (its default unless --fuyou-set gives one)."""
    from fuyou.engine.config import OffloadConfig

    given = [kv.split("=", 1)[1] for kv in args.fuyou_set if kv.startswith("offload.commit_every=")]
    return given[-1] if given else str(OffloadConfig().commit_every)


def default_ds_python() -> str | None:
    if importlib.util.find_spec("deepspeed") is not None:
        return sys.executable
    return DS_VENV if Path(DS_VENV).exists() else None


def inmemory_fits(args) -> bool:
    """16 B/param of state plus all activations (bf16, no recomputation) within half the available memory."""
    from fuyou.engine.budget import activation_bytes
    from fuyou.models import ModelConfig, StageModel, preset

    cfg = ModelConfig(**preset(args.model))
    need = 16 * StageModel(cfg).num_params + sum(activation_bytes(cfg, args.batch, args.seq).values())
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        return need < torch.cuda.mem_get_info()[0] * 0.8
    avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
    return need < avail / 2


def summarise(runs: list[dict], warmup: int, tokens: int, flops_per_token: float) -> dict:
    timed = [t for r in runs for t in r["step_times_s"][warmup:]]
    med = statistics.median(timed)
    gpu = [r.get("peak_gpu_bytes") for r in runs if r.get("peak_gpu_bytes")]
    return {"median_s": med, "min_s": min(timed), "max_s": max(timed), "n_steps": len(timed),
            "tokens_per_s": tokens / med, "tflops": flops_per_token * tokens / med / 1e12,
            "peak_rss": max(r["peak_rss_bytes"] for r in runs), "peak_gpu": max(gpu) if gpu else None,
            "write_per_step": statistics.median(r["write_bytes_per_step"] for r in runs),
            "read_per_step": statistics.median(r["read_bytes_per_step"] for r in runs),
            "loss0": statistics.median(r["losses"][0] for r in runs),
            "final_loss": statistics.median(r["losses"][-1] for r in runs),
            "final_losses": [r["losses"][-1] for r in runs]}


def _policy_text(policy, model: str) -> str:
    """The planner's policy (its JSON dict) in the rule form, with its prefetch depth."""
    if not isinstance(policy, dict):
        return str(policy)
    from fuyou.models import ModelConfig, preset
    from fuyou.policy import ActivationPolicy

    pol = ActivationPolicy.from_json(policy)
    return f"{pol.describe(ModelConfig(**preset(model)).n_layer)}, prefetch depth {pol.prefetch_depth}"


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-tiny", help="fuyou model preset (default %(default)s)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step, on both sides")
    p.add_argument("--ssd", type=Path, default=Path("/tmp/fuyou-vs-zinf"), help="SSD directory, shared by both systems")
    p.add_argument("--cpu-mem", default="4GiB", help="fuyou's CPU budget (offload.cpu_mem); recorded for DeepSpeed")
    p.add_argument("--data", nargs="+", choices=("synthetic", "builtin"), default=["synthetic"],
                   help="synthetic tokens and/or the builtin English corpus (real data); one row each")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    p.add_argument("--repeats", type=int, default=2, help="runs of each system, alternating")
    p.add_argument("--policy", default="recompute", help="fuyou's offload.act_policy, or 'auto' (the planner)")
    p.add_argument("--fuyou-set", action="append", default=[], metavar="KEY=VALUE", help="extra fuyou overrides")
    p.add_argument("--fuyou-variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="another fuyou system run alongside, e.g. 'bf16/int8=optim.master=bf16,optim.moments=int8' "
                   "(issue 19: compressed optimizer state)")
    p.add_argument("--ds-python", default=default_ds_python(), help="interpreter with deepspeed (default %(default)s)")
    p.add_argument("--ds-arg", action="append", default=[], help="options for bench/zero_infinity.py, e.g. '--checkpoint none'")
    p.add_argument("--no-deepspeed", action="store_true", help="skip the ZeRO-Infinity runs")
    p.add_argument("--inmemory", choices=("auto", "yes", "no"), default="auto")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute precision of every system: bf16 mixed precision, fp32, or auto (default): bf16 where "
                        "the device multiplies bf16 at full speed (a GPU from Ampere on, an AVX-512 or AMX CPU), else "
                        "fp32 (on an AVX2 CPU bf16 runs a scalar path, about 130x slower, and every system crawls)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: AdamWConfig's)")
    p.add_argument("--clip", default="none",
                   help="global-norm clipping threshold on both sides (fuyou: exact, speculative; ZeRO-Infinity: "
                   "gradient_clipping), or none (default)")
    p.add_argument("--loss-tol", type=float, default=0.02, help="relative tolerance of the final-loss check")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--json", type=Path, help="write all runs and summaries here")
    p.add_argument("--markdown", type=Path, help="append the report to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not 0 <= args.warmup and args.steps >= 1:
        p.error("need --steps >= 1 and --warmup >= 0")
    use_ds = not args.no_deepspeed
    if args.precision == "auto":
        from fuyou.models.precision import bf16_native, compute_device_type

        args.precision = "bf16" if bf16_native(compute_device_type(args.device)) else "fp32"
    if use_ds and not args.ds_python:
        p.error("no interpreter with deepspeed found: pass --ds-python or --no-deepspeed")
    if use_ds:  # (an interpreter without it ran every fuyou side, then reported "loss check: FAILED": a pass)
        require_deepspeed("the peer (ZeRO-Infinity, bench/zero_infinity.py)", args.ds_python, "--no-deepspeed")
    from fuyou.models import ModelConfig, StageModel, preset
    from fuyou.units import parse_size

    parse_size(args.cpu_mem)
    args.ssd.mkdir(parents=True, exist_ok=True)
    model = StageModel(ModelConfig(**preset(args.model)))
    tokens, fpt = args.batch * args.seq * args.grad_accum, model.flops_per_token(args.seq)
    inmem = args.inmemory == "yes" or (args.inmemory == "auto" and inmemory_fits(args))
    systems = ["fuyou", *variants(args)] + (["zero-infinity"] if use_ds else []) + (["in-memory"] if inmem else [])
    command = "python bench/vs_zero_infinity.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results: dict = {"command": command, "model": args.model, "num_params": model.num_params, "batch": args.batch,
                     "grad_accum": args.grad_accum, "precision": args.precision,
                     "seq": args.seq, "cpu_mem": args.cpu_mem, "policy": args.policy, "rows": {}}
    ok = True
    for data in args.data:
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        failures: dict[str, list[str]] = {s: [] for s in systems}
        for rep in range(args.repeats):
            for s in systems:
                t0 = time.perf_counter()
                try:
                    r = run_deepspeed(args, data, args.ssd) if s == "zero-infinity" else run_fuyou(args, data, s, args.ssd)
                except (RuntimeError, subprocess.TimeoutExpired) as e:  # recorded, and the others go on
                    failures[s].append(str(e)[-1500:])
                    print(f"[{data} run {rep + 1}/{args.repeats}] {s} FAILED:\n{str(e)[-1500:]}", flush=True)
                    continue
                runs[s].append(r)
                print(f"[{data} run {rep + 1}/{args.repeats}] {s}: steps "
                      f"{' '.join(f'{t:.2f}' for t in r['step_times_s'])} s, losses "
                      f"{' '.join(f'{v:.4f}' for v in r['losses'])} ({time.perf_counter() - t0:.0f} s wall)", flush=True)
        ok &= not any(failures.values())
        if not runs["fuyou"]:
            raise SystemExit(f"every fuyou run failed on {data}:\n{failures['fuyou'][-1]}")
        done = [s for s in systems if runs[s]]
        summ = {s: summarise(runs[s], args.warmup, tokens, fpt) for s in done}
        ref = summ["fuyou"]
        checks = {}
        for s in done[1:]:
            d_final = abs(summ[s]["final_loss"] - ref["final_loss"]) / abs(ref["final_loss"])
            d0 = abs(summ[s]["loss0"] - ref["loss0"]) / abs(ref["loss0"])
            checks[s] = {"final_rel_diff": d_final, "step0_rel_diff": d0,
                         "ok": d_final <= args.loss_tol and d0 <= args.loss_tol}
            ok &= checks[s]["ok"]
        ratio = ref["tokens_per_s"] / summ["zero-infinity"]["tokens_per_s"] if "zero-infinity" in summ else None
        vratios = {s: {"vs_fuyou": summ[s]["tokens_per_s"] / ref["tokens_per_s"],
                       "vs_zinf": (summ[s]["tokens_per_s"] / summ["zero-infinity"]["tokens_per_s"]
                                   if "zero-infinity" in summ else None)} for s in done if s.startswith("fuyou ")}
        results["rows"][data] = {"runs": runs, "summary": summ, "loss_checks": checks, "ratio_fuyou_vs_zinf": ratio,
                                 "variant_ratios": vratios, "failures": failures}

    # -- report ---------------------------------------------------------------------------------------
    import fuyou

    ds_ver = "-"
    any_ds = next((r for row in results["rows"].values() for r in row["runs"].get("zero-infinity", [])), None)
    if any_ds:
        ds_ver = any_ds["versions"]["deepspeed"]
        results["deepspeed_settings"] = any_ds["settings"]
    fuyou_run = next(iter(results["rows"].values()))["runs"]["fuyou"][0]
    lines = [f"### {args.model} ({model.num_params / 1e6:.1f}M params), batch {args.batch}"
             + (f" x {args.grad_accum} micro-batches" if args.grad_accum > 1 else "") + f", seq {args.seq}, "
             f"fuyou cpu_mem {args.cpu_mem} ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"`{command}`", "",
             machine_header(f"device {fuyou_run['device']}", f"deepspeed {ds_ver}",
                            f"fuyou {getattr(fuyou, '__version__', '?')}") + f"; SSD directory {args.ssd}. "
             f"{args.repeats} runs per system alternating, {args.warmup} warm-up + {args.steps} timed steps each. "
             f"precision: {args.precision}; clipping: {args.clip}; fuyou commits: every "
             f"{_fuyou_commit(args)}; fuyou policy: {args.policy}" + (f" ({_policy_text(fuyou_run['policy'], args.model)})"
                                               if args.policy == "auto" else "") +
             (f"; ZeRO-Infinity options: {' '.join(args.ds_arg)}" if args.ds_arg else ""), "",
             "| data | system | tokens/s | model TFLOPS | step median (min-max) | peak RSS | peak GPU | "
             "SSD write / read per step | loss step 0 → final | vs fuyou final loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for data, row in results["rows"].items():
        for s in row["summary"]:
            m = row["summary"][s]
            extra = ""
            if s.startswith("fuyou") and "counters" in row["runs"][s][0]:
                c = row["runs"][s][0]["counters"]
                extra = f" (engine: {gb(c['ssd_write_bytes'])} / {gb(c['ssd_read_bytes'])})"
            chk = row["loss_checks"].get(s)
            lines.append(
                f"| {data} | {s} | {m['tokens_per_s']:.1f} | {m['tflops']:.4f} | {m['median_s']:.2f} s "
                f"({m['min_s']:.2f}-{m['max_s']:.2f}, n={m['n_steps']}) | {gib(m['peak_rss'])} | {gib(m['peak_gpu'])} | "
                f"{gb(m['write_per_step'])} / {gb(m['read_per_step'])}{extra} | {m['loss0']:.4f} → {m['final_loss']:.4f} | "
                + ("-" if chk is None else f"{chk['final_rel_diff'] * 100:.2f} % {'ok' if chk['ok'] else '**MISMATCH**'}")
                + " |")
    lines.append("")
    for data, row in results["rows"].items():
        if row["ratio_fuyou_vs_zinf"] is not None:
            lines.append(f"- {data}: fuyou / ZeRO-Infinity tokens/s = **{row['ratio_fuyou_vs_zinf']:.2f}x**")
        for s, r in row.get("variant_ratios", {}).items():
            lines.append(f"- {data}: {s} ({', '.join(variants(args)[s])}): tokens/s **{r['vs_fuyou']:.2f}x** fuyou's"
                         + (f", **{r['vs_zinf']:.2f}x** ZeRO-Infinity's" if r["vs_zinf"] is not None else ""))
        for s, errs in row["failures"].items():
            for e in errs:
                last = [x for x in e.strip().splitlines() if x.strip()][-1]
                lines.append(f"  - **{s} run failed** ({len(row['runs'][s])} of {args.repeats} succeeded): `{last[:300]}`")
        c = row["runs"]["fuyou"][0].get("counters")
        if c:
            lines.append(f"  - fuyou counters (median timed step, run 1): compute {c['compute_s']:.2f} s, wait weights "
                         f"{c['wait_weights_s']:.2f} s, wait optimizer {c['wait_optimizer_s']:.2f} s, optimizer busy / "
                         f"kernel {c['optimizer_busy_s']:.2f} / {c['optimizer_kernel_s']:.2f} s, wait activations "
                         f"{c['wait_activations_s']:.2f} s; fixed overhead "
                         f"{gib(row['runs']['fuyou'][0]['fixed_overhead_bytes'])}")
    lines.append(f"- loss check: relative difference of the final (and step-0) loss to fuyou's <= {args.loss_tol:.0%}: "
                 + ("passed" if ok else "**FAILED**"))
    publish("\n".join(lines) + "\n", args.markdown)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
