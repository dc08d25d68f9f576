"""CPU AdamW benchmark: fuyou's fused kernel against torch's fused AdamW plus a bf16 cast.

Each method updates the same parameters (same initial values, same gradients) and ends with a bf16
copy of the new weights, which the next forward needs:

- ``fuyou``        :func:`fuyou.optim.fused_adamw_` with ``out_lowp`` (the copy is written in the
                   same pass), fp32 gradients: the same data as the peers.
- ``fuyou-bf16g``  the same with bf16 gradients (what the engine hands over), for information.
- ``out of place`` the same, reading one copy of the state and writing a second (the two swap each
                   step): a resident stage with a spare copy under exact clipping (engine.py, Note:
                   [Spare copies]); its target is the in-place kernel's rate.
- ``torch``        ``torch.optim.AdamW(fused=True)`` then ``lowp.copy_(param)`` into a preallocated
                   bf16 buffer (cheaper than ``.to(torch.bfloat16)``, which allocates each step).
- ``deepspeed``    ``DeepSpeedCPUAdam(adamw_mode=True)`` then the same copy, when importable.

Two workloads: one flat buffer of ``--params`` elements, and the tensors of ``--blocks`` GPT blocks
of width ``--d-model`` (GPT-3 1.3B: d=2048, 12 d^2 + 13 d = 50.4M parameters per block). Methods
run round-robin within each repeat so that drift on a shared machine hits them alike; the figure is
the median over ``--repeats`` steps after ``--warmup`` steps.

    python bench/adam_bench.py                                   # smoke size, seconds
    flock /tmp/fuyou-bench.lock python bench/adam_bench.py --params 1e8 --blocks 2 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from fuyou.optim import adamw_backend, fused_adamw_

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpt_block_shapes(d: int, blocks: int) -> list[tuple[int, ...]]:
    one = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,),
           (d, 4 * d), (d,)]
    return one * blocks


class Workload:
    """Initial state shared by all methods: parameters, fp32 and bf16 gradients."""

    def __init__(self, shapes: list[tuple[int, ...]], seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.params = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
        self.grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
        self.grads_bf16 = [g.to(torch.bfloat16) for g in self.grads]
        self.numel = sum(p.numel() for p in self.params)


class Fuyou:
    def __init__(self, w: Workload, threads: int, bf16_grads: bool = False):
        self.p = [x.clone() for x in w.params]
        self.g = w.grads_bf16 if bf16_grads else w.grads
        self.m = [torch.zeros_like(x) for x in self.p]
        self.v = [torch.zeros_like(x) for x in self.p]
        self.lowp = [torch.empty_like(x, dtype=torch.bfloat16) for x in self.p]
        self.threads, self.t = threads, 0

    def step(self) -> None:
        self.t += 1
        for p, g, m, v, lo in zip(self.p, self.g, self.m, self.v, self.lowp):
            fused_adamw_(p, g, m, v, step=self.t, out_lowp=lo, num_threads=self.threads, **HYPER)


class FuyouOutOfPlace(Fuyou):
    """``Fuyou`` with a second copy of the state: each step reads one and writes the other."""

    def __init__(self, w: Workload, threads: int, bf16_grads: bool = False):
        super().__init__(w, threads, bf16_grads)
        self.other = [tuple(torch.empty_like(x) for _ in range(3)) for x in self.p]

    def step(self) -> None:
        self.t += 1
        for i, (g, lo) in enumerate(zip(self.g, self.lowp)):
            src, (p, m, v) = (self.p[i], self.m[i], self.v[i]), self.other[i]
            fused_adamw_(p, g, m, v, step=self.t, out_lowp=lo, num_threads=self.threads, src=src, **HYPER)
            self.other[i], (self.p[i], self.m[i], self.v[i]) = src, (p, m, v)


class FuyouCompressed:
    """fuyou's kernel on a compressed state (``optim.master``/``optim.moments``, fuyou/optim/compressed.py),
    bf16 gradients, the bf16 compute weights written in the same pass (the master itself when bf16)."""

    def __init__(self, w: Workload, threads: int, master: str, moments: str):
        from fuyou.optim.compressed import StateFormat, new_state

        self.fmt = StateFormat(master, moments)
        self.state = [new_state(self.fmt, x.reshape(-1)) for x in w.params]
        self.g = [g.reshape(-1) for g in w.grads_bf16]
        self.lowp = [None if master == "bf16" else torch.empty(x.numel(), dtype=torch.bfloat16) for x in w.params]
        self.threads, self.t = threads, 0

    def step(self) -> None:
        from fuyou.optim.compressed import fused_adamw_q_, sr_key

        self.t += 1
        h = {k: v for k, v in HYPER.items() if k != "weight_decay"}
        for i, (st, g, lo) in enumerate(zip(self.state, self.g, self.lowp)):
            fused_adamw_q_(self.fmt, st, g, segments=[(0, g.numel(), HYPER["weight_decay"])], step=self.t,
                           key=sr_key(0, self.t, i), out_lowp=lo, num_threads=self.threads, **h)


class TorchLike:
    """A torch.optim-style optimizer's step, then the bf16 copy in a separate pass."""

    def __init__(self, w: Workload, make_opt):
        self.p = [torch.nn.Parameter(x.clone()) for x in w.params]
        for p, g in zip(self.p, w.grads):
            p.grad = g.clone()
        self.lowp = [torch.empty_like(x, dtype=torch.bfloat16) for x in self.p]
        self.opt = make_opt(self.p)

    def step(self) -> None:
        self.opt.step()
        with torch.no_grad():
            for p, lo in zip(self.p, self.lowp):
                lo.copy_(p)


def torch_fused(params):
    h = HYPER
    return torch.optim.AdamW(params, lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                             weight_decay=h["weight_decay"], fused=True)


def deepspeed_adam():
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as exc:  # noqa: BLE001 -- any import problem means "peer not available"
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    h = HYPER

    def make(params):
        return DeepSpeedCPUAdam(params, lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                                weight_decay=h["weight_decay"], adamw_mode=True)
    return make, ""


def run(w: Workload, methods: dict, repeats: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in methods}
    for i in range(warmup + repeats):
        for name, m in methods.items():
            t0 = time.perf_counter()
            m.step()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def stream_bandwidth(n: int) -> float:
    """GB/s of ``dst.copy_(src)`` on fp32 buffers, counting bytes read plus bytes written."""
    src, dst = torch.ones(n), torch.zeros(n)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(3))
    return 8 * n / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=1e6, help="flat buffer size (default 1e6)")
    ap.add_argument("--d-model", type=int, default=256, help="GPT block width (1.3B: 2048)")
    ap.add_argument("--blocks", type=int, default=1, help="GPT blocks in the shape list")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps; the median is reported")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="threads for every method (torch.set_num_threads and num_threads)")
    ap.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeedCPUAdam")
    ap.add_argument("--formats", default="fp32/int8,bf16/fp32,bf16/bf16,bf16/int8",
                    help="compressed state formats master/moments to measure too (issue 19; '' for none)")
    ap.add_argument("--md", default=None, help="also write the markdown fragment to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    make_ds, ds_why = (None, "disabled by --no-deepspeed") if args.no_deepspeed else deepspeed_adam()
    workloads = {
        f"flat {int(args.params):,}": [(int(args.params),)],
        f"GPT blocks d={args.d_model} x{args.blocks}": gpt_block_shapes(args.d_model, args.blocks),
    }
    lines = [
        "## CPU AdamW step (fp32 master weights and moments, bf16 copy of the new weights)",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} "
        f"{platform.release()}; threads used: {args.threads}",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"fuyou backend: {adamw_backend()}",
        f"- deepspeed: {'DeepSpeedCPUAdam' if make_ds else 'not measured (' + ds_why + ')'}",
        f"- command: `python {' '.join(sys.argv) if argv is None else 'bench/adam_bench.py ' + ' '.join(argv)}`",
        f"- median of {args.repeats} steps after {args.warmup} warm-up; stream copy bandwidth "
        f"(fp32 copy_, read+write): {stream_bandwidth(int(min(args.params, 5e7))):.1f} GB/s",
        "",
        "| workload | method | ms/step | G params/s | speed-up vs torch fused + cast |",
        "|---|---|---:|---:|---:|",
    ]
    for label, shapes in workloads.items():
        w = Workload(shapes)
        methods = {
            "fuyou (fp32 grad, bf16 copy fused)": Fuyou(w, args.threads),
            "fuyou (bf16 grad, bf16 copy fused)": Fuyou(w, args.threads, bf16_grads=True),
            "fuyou out of place (bf16 grad, bf16 copy fused)": FuyouOutOfPlace(w, args.threads, bf16_grads=True),
            "torch AdamW(fused=True) + bf16 copy": TorchLike(w, torch_fused),
        }
        for fmt in filter(None, args.formats.split(",")):
            master, moments = fmt.split("/")
            methods[f"fuyou compressed {fmt} (bf16 grad)"] = FuyouCompressed(w, args.threads, master, moments)
        if make_ds is not None:
            methods["DeepSpeedCPUAdam + bf16 copy"] = TorchLike(w, make_ds)
        med = run(w, methods, args.repeats, args.warmup)
        base = med["torch AdamW(fused=True) + bf16 copy"]
        for name, t in med.items():
            lines.append(f"| {label} ({w.numel / 1e6:.1f}M) | {name} | {t * 1e3:.1f} | "
                         f"{w.numel / t / 1e9:.3f} | {base / t:.2f}x |")
        del methods, w
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
