"""LoRA on a model larger than the CPU budget (issue 16), side by side: fuyou's LoRA over a streamed,
frozen base; fuyou's full fine-tuning of the same model under the same budget; and the peer users
reach for, DeepSpeed ZeRO-3 with the parameters offloaded to NVMe plus PEFT LoRA
(``bench/zero3_peft.py``, under ``--ds-python``).

    python bench/lora_bench.py --layers 16 --width 1536 --ff 4096 --heads 12 --kv-heads 4 --vocab 32000 \\
        --batch 2 --seq 512 --cpu-mem 768MiB --ssd /tmp/lora-bench --steps 3 --warmup 1 --repeats 2 \\
        --markdown bench/RESULTS.md

The model is a random Llama-shaped Hugging Face checkpoint written to ``--ssd`` first (both systems load
it: fuyou with ``--init-from``, the peer with ``from_pretrained`` under ``HfDeepSpeedConfig``); the
batches are fuyou's synthetic ones (the same tokens on every side); bf16; adapters of rank ``--rank`` on
``--targets``; clipping at 1; constant learning rate; fuyou without crash-safe commits
(``offload.commit=none``), as the peer runs. Runs alternate (fuyou LoRA, fuyou full, peer, ...),
each in a fresh process, and leave ``--warmup`` steps out. Reported per system: the median step and its
spread, tokens/s, peak resident memory (VmHWM), and /proc/self/io bytes written and read per step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DS_VENV, machine_header, publish, repo_env, require_deepspeed, run_worker  # noqa: E402

HERE = Path(__file__).resolve().parent


def proc_io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


def worker(args) -> None:
    """One fuyou run in this process (``--worker``): the engine on ``--overrides``, timed per step."""
    from fuyou.config import load_config
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine
    from fuyou.engine.malloc import resident_bytes
    from fuyou.hf import open_checkpoint

    cfg = load_config(overrides=json.loads(args.overrides))
    t0 = time.perf_counter()
    eng = Engine(cfg, load_data(cfg.data), f"lora-bench-{os.getpid()}",
                 init_values=open_checkpoint(cfg.model.init_from).init_values)
    init_s = time.perf_counter() - t0
    times, losses, io0 = [], [], None
    try:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                io0 = proc_io()
            t0 = time.perf_counter()
            stats = eng.train_step(step)
            eng.worker.wait_all()  # a step's time includes all of its optimizer work
            times.append(time.perf_counter() - t0)
            losses.append(stats.loss)
            print(f"step {step} loss {stats.loss:.4f} {times[-1]:.2f} s", file=sys.stderr, flush=True)
        io1 = proc_io()
    finally:
        eng.completed = True  # a benchmark run: delete its SSD state at close
        eng.close()
    n = args.steps
    print(json.dumps({"step_times_s": times, "losses": losses, "peak_rss_bytes": resident_bytes("VmHWM"),
                      "init_s": init_s, "write_bytes_per_step": (io1["write_bytes"] - io0["write_bytes"]) / n,
                      "read_bytes_per_step": (io1["read_bytes"] - io0["read_bytes"]) / n,
                      "fixed_overhead_bytes": eng.fixed_overhead}))


def make_checkpoint(args, out: Path) -> int:
    """A random Llama-shaped checkpoint (bf16 safetensors); returns its parameter count."""
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.ff,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq),
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)  # bf16 on disk, as released checkpoints
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def fuyou_overrides(args, model_dir: Path, ssd: Path, lora: bool, policy: str | None = None,
                    base: str = "compute") -> list[str]:
    mem = args.cpu_mem if lora else (args.full_cpu_mem or args.cpu_mem)
    out = [f"model.init_from={model_dir}", "data.source=synthetic", f"data.seq_len={args.seq}",
           f"train.micro_batch_size={args.batch}", "train.precision=bf16", "train.lr_schedule=constant",
           "train.warmup_steps=0", "train.grad_clip=1.0", f"offload.cpu_mem={mem}", "offload.mode=ssd",
           f"offload.ssd_dirs=['{ssd}']", "optim.lr=1e-4", f"train.seed={args.seed}",
           "offload.commit=none"]  # like the peer, no crash-safe commits (one copy of the state on the SSD)
    if lora:
        out += [f"lora.rank={args.rank}", f"lora.alpha={args.alpha}", f"lora.targets={args.targets}", f"lora.base={base}"]
    if policy:
        out.append(f"offload.act_policy={policy}")
    return out


def run_peer(args, model_dir: Path, ssd: Path, checkpointing: bool = True) -> dict:
    nvme = ssd / f"z3p-{os.getpid()}"
    shutil.rmtree(nvme, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / "out.json"
        cmd = [args.ds_python, str(HERE / "zero3_peft.py"), "--model-dir", str(model_dir), "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.warmup + args.steps), "--warmup", str(args.warmup),
               "--rank", str(args.rank), "--alpha", str(args.alpha), "--targets", args.targets, "--seed",
               str(args.seed), "--nvme-dir", str(nvme), "--json", str(js)] + ([] if checkpointing else ["--no-checkpointing"])
        env = repo_env()  # the carried packages' PYTHONPATH kept
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        shutil.rmtree(nvme, ignore_errors=True)
        if out.returncode != 0:
            raise RuntimeError(f"the ZeRO-3 + PEFT run failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        return json.loads(js.read_text())


def summarise(runs: list[dict], warmup: int, tokens: int) -> dict:
    timed = [t for r in runs for t in r["step_times_s"][warmup:]]
    med = statistics.median(timed)
    return {"median_s": med, "min_s": min(timed), "max_s": max(timed), "tokens_per_s": tokens / med,
            "peak_rss": max(r["peak_rss_bytes"] for r in runs),
            "write": statistics.median(r["write_bytes_per_step"] for r in runs),
            "read": statistics.median(r["read_bytes_per_step"] for r in runs),
            "loss0": statistics.median(r["losses"][0] for r in runs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--width", type=int, default=1536)
    p.add_argument("--ff", type=int, default=4096)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--cpu-mem", default="768MiB", help="fuyou LoRA's CPU budget")
    p.add_argument("--full-cpu-mem", help="fuyou full fine-tuning's CPU budget (default --cpu-mem; full "
                   "fine-tuning needs more: its stages' gradients and optimizer buffers)")
    p.add_argument("--ssd", type=Path, default=Path("/tmp/lora-bench"))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ds-python", default=DS_VENV)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--kept-policy", help="also fuyou LoRA with this offload.act_policy (e.g. 'all=gpu': every "
                   "block's matmul outputs kept, no recomputation of them), and the peer without activation "
                   "checkpointing (its equivalent)")
    p.add_argument("--no-full", action="store_true", help="skip fuyou's full fine-tuning")
    p.add_argument("--int8-base", action="store_true", help="also fuyou LoRA with lora.base=int8 (the base's block "
                   "matmuls streamed as int8: fuyou/models/quant.py)")
    p.add_argument("--nf4-base", action="store_true", help="also fuyou LoRA with lora.base=nf4 (QLoRA's NF4)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    if not args.no_peer:
        require_deepspeed("the peer (ZeRO-3 NVMe + PEFT LoRA, bench/zero3_peft.py)", args.ds_python, "--no-peer")
    args.ssd.mkdir(parents=True, exist_ok=True)
    model_dir = args.ssd / f"model-{os.getpid()}"
    header = machine_header()
    try:
        n = make_checkpoint(args, model_dir)
        systems = {"fuyou LoRA": None}
        if not args.no_full:
            systems["fuyou full fine-tuning"] = None
        if args.kept_policy:
            systems[f"fuyou LoRA, act_policy {args.kept_policy}"] = None
        if args.int8_base:
            systems["fuyou LoRA, int8 base"] = None
        if args.nf4_base:
            systems["fuyou LoRA, nf4 base"] = None
        if not args.no_peer:
            systems["ZeRO-3 NVMe + PEFT LoRA"] = None
            if args.kept_policy:
                systems["ZeRO-3 NVMe + PEFT LoRA, no checkpointing"] = None
        runs: dict[str, list[dict]] = {k: [] for k in systems}
        failed: dict[str, str] = {}
        for _ in range(args.repeats):
            for name in systems:
                print(f"-- {name}", file=sys.stderr, flush=True)
                if name.startswith("fuyou"):
                    ov = fuyou_overrides(args, model_dir, args.ssd, lora=name.startswith("fuyou LoRA"),
                                         policy=args.kept_policy if "act_policy" in name else None,
                                         base=name.split(", ")[-1].removesuffix(" base") if name.endswith(" base")
                                         else "compute")
                    runs[name].append(run_worker(__file__, ["--overrides", json.dumps(ov), "--steps", str(args.steps),
                                                            "--warmup", str(args.warmup)], args.timeout, name))
                else:
                    try:
                        runs[name].append(run_peer(args, model_dir, args.ssd, checkpointing="no checkpointing" not in name))
                    except RuntimeError as e:  # reported in the table, not lost with the others' figures
                        failed[name] = str(e).strip().splitlines()[-1][:200]
                        print(e, file=sys.stderr)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    tokens = args.batch * args.seq
    s = {k: summarise(v, args.warmup, tokens) for k, v in runs.items() if v}
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines = [f"\n### LoRA vs full fine-tuning vs ZeRO-3 NVMe + PEFT: Llama-shaped {n / 1e6:.0f}M parameters "
             f"({args.layers} x {args.width}, ff {args.ff}, vocab {args.vocab}), bf16 weights {gib(2 * n)}, "
             f"batch {args.batch} x {args.seq}, rank {args.rank} on {args.targets} ({time.strftime('%Y-%m-%d')})",
             "", f"Machine: {header}.", "",
             f"Command: `python bench/lora_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"fuyou LoRA's CPU budget {args.cpu_mem} (the base's bf16 weights are {2 * n / _parse(args.cpu_mem):.1f}x "
             f"it)" + (f", full fine-tuning's {args.full_cpu_mem} (its minimum for this shape)" if args.full_cpu_mem
                       else "") + f"; medians of {args.repeats} runs x {args.steps} timed steps.", "",
             "| system | step (median, min-max) | tokens/s | peak RSS | SSD written / read per step | step-0 loss |",
             "|---|---|---|---|---|---|"]
    for k, r in s.items():
        lines.append(f"| {k} | {r['median_s']:.2f} s ({r['min_s']:.2f}-{r['max_s']:.2f}) | {r['tokens_per_s']:.0f} | "
                     f"{gib(r['peak_rss'])} | {gib(r['write'])} / {gib(r['read'])} | {r['loss0']:.4f} |")
    for k, why in failed.items():
        lines.append(f"| {k} | failed: {why} | - | - | - | - |")
    for mine in [k for k in s if k.startswith("fuyou LoRA")]:
        ratios = [f"{s[mine]['tokens_per_s'] / r['tokens_per_s']:.2f}x {k}" for k, r in s.items() if k != mine]
        if ratios:
            lines += ["", f"{mine} tokens/s: " + ", ".join(ratios) + "."]
    publish(lines, args.markdown)
    return 0


def _parse(size: str) -> int:
    from fuyou.units import parse_size

    return parse_size(size)


if __name__ == "__main__":
    sys.exit(main())
