"""Out-of-core AdamW throughput against its bound (issue 4).

Updates one stage of ``--params`` parameters whose fp32 master weights and Adam moments live in the
SSD store on ``--ssd`` (the engine's ``OutOfCoreAdamW``: chunked, read-ahead and write-behind through
a bounded pool), bf16 gradient in memory, bf16 weights written back to the store. In the same run it
measures the store's read and write bandwidth on the same directory and the in-memory kernel, and
reports parameters/s against the bound: the slower of the kernel and the SSD, where the SSD moves
12 bytes read and 14 bytes written per parameter through one device
(time/param = 12/read_bw + 14/write_bw).

    python bench/ooc_adam_bench.py --ssd /tmp/fuyou-ooc --params 2e8 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from fuyou.optim import adamw_backend, fused_adamw_
from fuyou.optim.config import AdamWConfig
from fuyou.optim.out_of_core import OutOfCoreAdamW, Segment, StateKeys
from fuyou.store import PinnedPool, TensorStore
from common import publish  # bench/ is the script's directory: the report tail all benchmarks share


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ssd", default="/tmp/fuyou-ooc-bench")
    p.add_argument("--params", type=float, default=2e7)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=1 << 20, help="optimizer chunk (elements)")
    p.add_argument("--markdown", help="append the report here")
    args = p.parse_args(argv)
    n = int(args.params)
    root = Path(args.ssd) / f"ooc-{os.getpid()}"
    cfg = AdamWConfig()
    pool = PinnedPool(512 << 20)
    ooc, ssd_w, ssd_r, kern = [], [], [], []
    with TensorStore.create([root]) as store:
        keys = StateKeys("s/master", "s/m", "s/v", "s/w")
        for k in ("s/master", "s/m", "s/v", "x/bw"):
            store.allocate(k, (n,), torch.float32)
        store.allocate("s/w", (n,), torch.bfloat16)
        src = torch.randn(n)
        for k in ("s/master", "s/m", "s/v", "x/bw"):
            store.write_from(k, src if k == "s/master" else torch.zeros(n)).result()
        g = torch.randn(n).to(torch.bfloat16)
        opt = OutOfCoreAdamW(store, pool, cfg, chunk_numel=args.chunk)
        seg = [Segment(0, n, 0.1)]
        bw_numel = min(n, 64 << 20)  # at most 256 MiB for the raw bandwidth measurement
        buf = pool.acquire(4 * bw_numel, torch.float32)
        for r in range(args.repeats + 1):
            t0 = time.perf_counter()
            opt.update(keys, g, numel=n, segments=seg, lr=1e-4, step=r + 1)
            if r:
                ooc.append(n / (time.perf_counter() - t0))
            # raw store bandwidth, same directory, same run
            t0 = time.perf_counter()
            store.write_from("x/bw", buf.tensor).result()
            ssd_w.append(4 * bw_numel / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            store.read_into("x/bw", buf.tensor).result()
            ssd_r.append(4 * bw_numel / (time.perf_counter() - t0))
        p_, m, v = torch.randn(n), torch.zeros(n), torch.zeros(n)
        lo = torch.empty(n, dtype=torch.bfloat16)
        for r in range(args.repeats):
            t0 = time.perf_counter()
            fused_adamw_(p_, g, m, v, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=r + 1, out_lowp=lo)
            kern.append(n / (time.perf_counter() - t0))
        buf.release()
    shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    wbw, rbw = med(ssd_w), med(ssd_r)
    ssd_bound = 1 / (12 / rbw + 14 / wbw)
    bound = min(med(kern), ssd_bound)
    lines = [f"### out-of-core AdamW ({time.strftime('%Y-%m-%d')})", "",
             f"`python bench/ooc_adam_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"host {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, kernel {adamw_backend()}; "
             f"{n / 1e6:.0f}M parameters, chunk {args.chunk} elements, median of {args.repeats}", "",
             "| what | figure |", "|---|---|",
             f"| store write / read (same run, same directory) | {wbw / 1e9:.2f} / {rbw / 1e9:.2f} GB/s |",
             f"| in-memory kernel (bf16 grad, bf16 copy) | {med(kern) / 1e9:.2f} G params/s |",
             f"| SSD bound (12 B read + 14 B written per parameter) | {ssd_bound / 1e9:.3f} G params/s |",
             f"| **out-of-core AdamW** | **{med(ooc) / 1e9:.3f} G params/s = {med(ooc) / bound:.2f} of the bound** |", ""]
    publish(lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
