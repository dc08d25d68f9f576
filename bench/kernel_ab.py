"""Two builds of fuyou's AdamW library side by side in one process: the compressed-state kernel of each,
alternated call by call (the order swapped every repeat) on the same state, with fuyou's fp32 kernel timed
in the same loop as the common reference. For a kernel change, where a figure from another invocation on
this shared machine moves more than the change does.

    python bench/kernel_ab.py OLD.so NEW.so --formats fp32/int8,bf16/int8 --repeats 15

A build is ``~/.cache/torch_extensions/*/fuyou_adamw_<machine>_<hash>/*.so``; the current source's name is
``python -c "from fuyou.kernels.build import ext_name; print(ext_name('adamw'))"`` (build it by importing
``fuyou.optim.adamw`` and running any update; check out the old source and do the same for the other).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

import fuyou.kernels.build as kb
from fuyou.optim.adamw import fused_adamw_
from fuyou.optim.compressed import StateFormat, fused_adamw_q_, new_state

HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--formats", default="fp32/int8,bf16/int8", help="master/moments, comma-separated")
    ap.add_argument("--params", type=float, default=3e7)
    ap.add_argument("--repeats", type=int, default=15, help="timed calls of each (the first is dropped)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.params < 1 or args.repeats < 2:
        ap.error("--params must be at least 1 and --repeats at least 2 (the first is dropped)")
    libs = {}
    for tag, path in (("old", args.old), ("new", args.new)):
        try:
            libs[tag] = ctypes.CDLL(path)
        except OSError as e:
            raise SystemExit(f"{tag} kernel library {path}: {e}; give the paths of two builds of the AdamW kernel "
                             f"(.so)") from None
        kb._declare(libs[tag])
    n = int(args.params)
    g = (torch.randn(n) * 1e-3).to(torch.bfloat16)
    lo = torch.empty(n, dtype=torch.bfloat16)
    p, m, v = torch.randn(n) * 0.02, torch.zeros(n), torch.zeros(n)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    states = {f: new_state(StateFormat(*f.split("/")), torch.randn(n) * 0.02) for f in formats}
    times: dict[str, list[float]] = {"fp32 kernel": []}
    original = kb.load_adamw_lib
    try:
        for r in range(args.repeats + 1):
            t0 = time.perf_counter()
            fused_adamw_(p, g, m, v, step=r + 1, out_lowp=lo, weight_decay=0.1, num_threads=args.threads, **HYPER)
            times["fp32 kernel"].append(time.perf_counter() - t0)
            for f, st in states.items():
                fmt = StateFormat(*f.split("/"))
                for tag in (("old", "new") if r % 2 else ("new", "old")):
                    kb.load_adamw_lib = lambda tag=tag: libs[tag]
                    t0 = time.perf_counter()
                    fused_adamw_q_(fmt, st, g, segments=[(0, n, 0.1)], step=r + 1, key=7, num_threads=args.threads,
                                   out_lowp=lo if fmt.master == "fp32" else None, **HYPER)
                    times.setdefault(f"{f} {tag}", []).append(time.perf_counter() - t0)
    finally:
        kb.load_adamw_lib = original
    ref = statistics.median(times["fp32 kernel"][1:])
    print(f"{n:,} elements, bf16 gradients, median of {args.repeats} calls after one\n")
    print("| kernel | ms (median) | ms (min) | vs fuyou's fp32 kernel |\n|---|---:|---:|---:|")
    for k, ts in times.items():
        ts = ts[1:]
        print(f"| {k} | {1e3 * statistics.median(ts):.1f} | {1e3 * min(ts):.1f} | {ref / statistics.median(ts):.2f}x |")
    for f in formats:
        old, new = statistics.median(times[f"{f} old"][1:]), statistics.median(times[f"{f} new"][1:])
        print(f"\n{f}: new / old time {new / old:.3f} ({(old / new - 1) * 100:+.1f} % parameters/s)", end="")
    print()


if __name__ == "__main__":
    main()
