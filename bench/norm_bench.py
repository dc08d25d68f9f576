"""The gradient norm of a bf16 gradient on a CPU device: fuyou's kernel (one read; adamw.cpp, Note:
[Gradient norm on the CPU]) against torch's norm of its fp32 copy, the engine's path before, in one
invocation on the same tensor: median time of 7 alternating runs and error against the fp64 norm.

    python bench/norm_bench.py [--numel 50000000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fuyou.optim.adamw import grad_norm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=50_000_000)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0)).bfloat16()
    fns = {"fuyou grad_norm (one read)": lambda: grad_norm(x),
           "torch _foreach_norm of x.float()": lambda: torch._foreach_norm([x.float().contiguous()], 2)[0]}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(args.repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    exact = float(torch.linalg.vector_norm(x.double()))
    print(f"| method ({args.numel:,} bf16, {torch.get_num_threads()} threads) | median | relative error |")
    print("|---|---|---|")
    for k, f in fns.items():
        print(f"| {k} | {statistics.median(times[k]) * 1e3:.1f} ms | {abs(float(f()) - exact) / exact:.1e} |")


if __name__ == "__main__":
    main()
