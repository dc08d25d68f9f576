"""I/O benchmark of the SSD tier against fio and DeepSpeed's aio_handle, same directory, same run.

Writes then reads N bytes through ``TensorStore`` (pinned/aligned pool buffer, O_DIRECT), through fio
(``--direct=1 --ioengine=libaio``, same block size, iodepth = the store's queue depth) and, when
importable, DeepSpeed's ``aio_handle`` (page-locked buffer). Repetitions are interleaved (store, fio,
deepspeed, store, ...) so drift on a shared machine hits every contender alike; the median is reported.
GB/s are 1e9 bytes per second. Ratio = store / best peer.

    python bench/io_bench.py                          # CI smoke: 64 MiB, 3 reps
    flock /tmp/fuyou-bench.lock python bench/io_bench.py --size 4GiB --reps 5 --markdown bench/results_store.md
    python bench/io_bench.py --size 1GiB --sweep      # the store over block sizes x queue depths
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fuyou.store import PinnedPool, StoreConfig, TensorStore
from fuyou.store.checksum import IMPLEMENTATION as CRC_IMPL
from fuyou.units import format_size, parse_size


def machine_header(directory: Path, with_deepspeed: bool = True) -> str:
    fs = subprocess.run(["df", "-T", str(directory)], capture_output=True, text=True).stdout.splitlines()[-1:]
    fio = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip() if shutil.which("fio") else "absent"
    ds = ""
    if with_deepspeed:
        try:
            import deepspeed  # slow (seconds): only when the peer runs
            ds = f", deepspeed {deepspeed.__version__}"
        except Exception:  # noqa: BLE001 -- absent or broken: the peer is skipped and says why
            pass
    return (f"host {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, fio {fio}{ds}\n"
            f"store checksum: CRC-32 by {CRC_IMPL} (FUYOU_STORE_CRC=zlib forces zlib)\n"
            f"directory {directory}: {fs[0] if fs else '?'}")


def bench_store(d: Path, nbytes: int, cfg: StoreConfig, reps: int):
    """Yields (write_seconds, read_seconds) per rep; data verified after every read."""
    shutil.rmtree(d / "store", ignore_errors=True)
    pool = PinnedPool(2 * nbytes + (1 << 20))
    with TensorStore.create([d / "store"], cfg) as store, pool.acquire(nbytes) as src, pool.acquire(nbytes) as dst:
        store.allocate("x", (nbytes,), torch.uint8)
        tile = torch.randint(0, 256, (min(nbytes, 64 << 20),), dtype=torch.uint8)
        for o in range(0, nbytes, tile.numel()):  # random 64 MiB tile repeated: cheap to make at 4 GiB
            src.tensor[o:o + tile.numel()] = tile[:nbytes - o]
        store.write_from("x", src.tensor).result()  # untimed: converts the fallocated extent to written
        for _ in range(reps):
            t = time.perf_counter()
            store.write_from("x", src.tensor).result()
            tw = time.perf_counter() - t
            t = time.perf_counter()
            store.read_into("x", dst.tensor).result()
            tr = time.perf_counter() - t
            if not torch.equal(src.tensor, dst.tensor):
                raise RuntimeError("store benchmark read back different data")
            yield tw, tr
    shutil.rmtree(d / "store", ignore_errors=True)


def fio_rate(d: Path, nbytes: int, bs: int, qd: int, rw: str) -> float:
    out = subprocess.run(
        ["fio", "--name=io_bench", f"--filename={d / 'fio.dat'}", f"--size={nbytes}", f"--bs={bs}",
         f"--iodepth={qd}", f"--rw={rw}", "--direct=1", "--ioengine=libaio", "--numjobs=1",
         "--output-format=json"], capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["write" if rw == "write" else "read"]["bw_bytes"] / 1e9


def deepspeed_handle(bs: int, qd: int):
    """DeepSpeed's libaio handle with the settings its aio config would use here (O_DIRECT, overlapped
    submission, one I/O thread per core), or None when deepspeed or its async_io op is unavailable."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
        return AsyncIOBuilder().load(verbose=False).aio_handle(block_size=bs, queue_depth=qd, single_submit=False,
                                                              overlap_events=True,
                                                              intra_op_parallelism=min(os.cpu_count() or 1, 8))
    except Exception as exc:  # not installed, or its op cannot build here
        print(f"deepspeed aio_handle: skipped ({type(exc).__name__}: {str(exc)[:80]})")
        return None


def ds_io(fn, buf: torch.Tensor, path: str) -> float:
    """One timed synchronous aio_handle transfer; returns seconds. It returns 1 on success."""
    t = time.perf_counter()
    n = fn(buf, path)
    dt = time.perf_counter() - t
    if n != 1:
        raise RuntimeError(f"deepspeed aio_handle {fn.__name__} on {path} returned {n}, expected 1")
    return dt


def run(args: argparse.Namespace) -> dict:
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    nbytes, bs = parse_size(args.size), parse_size(args.block_size)
    cfg = StoreConfig(block_size=bs, queue_depth=args.queue_depth, verify_checksums=args.verify,
                      checksum_block=max(bs, 1 << 20) if bs >= (1 << 20) else bs, stripe_unit=max(64 << 20, bs))
    res: dict[str, list[float]] = {k: [] for k in ("store_w", "store_r", "fio_w", "fio_r", "ds_w", "ds_r")}
    use_fio = shutil.which("fio") is not None and not args.no_fio
    if not use_fio:
        print("fio: skipped (not installed or --no-fio)")
    ds = None if args.no_deepspeed else deepspeed_handle(bs, args.queue_depth)
    if use_fio:
        fio_rate(d, nbytes, bs, args.queue_depth, "write")  # untimed layout
    if ds is not None:  # page-locked buffer, filled with random bytes, checked after every read
        ds_buf = ds.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
        ds_ref = torch.randint(0, 256, (min(nbytes, 64 << 20),), dtype=torch.uint8)
        for o in range(0, nbytes, ds_ref.numel()):
            ds_buf[o:o + ds_ref.numel()] = ds_ref[:nbytes - o]
        ds_io(ds.sync_pwrite, ds_buf, str(d / "ds.dat"))  # untimed: allocates the file's extents
    store_runs = bench_store(d, nbytes, cfg, args.reps)
    for _ in range(args.reps):
        tw, tr = next(store_runs)
        res["store_w"].append(nbytes / tw / 1e9)
        res["store_r"].append(nbytes / tr / 1e9)
        if use_fio:
            res["fio_w"].append(fio_rate(d, nbytes, bs, args.queue_depth, "write"))
            res["fio_r"].append(fio_rate(d, nbytes, bs, args.queue_depth, "read"))
        if ds is not None:
            res["ds_w"].append(nbytes / ds_io(ds.sync_pwrite, ds_buf, str(d / "ds.dat")) / 1e9)
            ds_buf.zero_()
            res["ds_r"].append(nbytes / ds_io(ds.sync_pread, ds_buf, str(d / "ds.dat")) / 1e9)
            for o in range(0, nbytes, ds_ref.numel()):
                if not torch.equal(ds_buf[o:o + ds_ref.numel()], ds_ref[:nbytes - o]):
                    raise RuntimeError("deepspeed aio_handle read back different data")
    for _ in store_runs:  # let the generator clean up
        pass
    if ds is not None:
        ds.free_cpu_locked_tensor(ds_buf)
    for f in ("fio.dat", "ds.dat"):
        (d / f).unlink(missing_ok=True)
    return {k: statistics.median(v) for k, v in res.items() if v}


def report(med: dict, args: argparse.Namespace) -> str:
    lines = ["| | write GB/s | read GB/s |", "|---|---|---|"]
    names = {"store": "fuyou TensorStore (threads, pinned)", "fio": "fio libaio O_DIRECT", "ds": "DeepSpeed aio_handle"}
    for k, name in names.items():
        if f"{k}_w" in med:
            lines.append(f"| {name} | {med[k + '_w']:.2f} | {med[k + '_r']:.2f} |")
    for op, col in (("w", "write"), ("r", "read")):
        peers = [med[f"{p}_{op}"] for p in ("fio", "ds") if f"{p}_{op}" in med]
        if peers:
            lines.append(f"| **ratio store / best peer, {col}** | {med['store_' + op] / max(peers):.2f} | |"
                         if op == "w" else f"| **ratio store / best peer, read** | | {med['store_r'] / max(peers):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "fuyou-io-bench"),
                   help="directory on the disk to measure (default %(default)s)")
    p.add_argument("--size", default="64MiB", help="bytes to write and read per repetition (default %(default)s)")
    p.add_argument("--block-size", default=str(StoreConfig().block_size), help="I/O block size, also fio --bs")
    p.add_argument("--queue-depth", type=int, default=StoreConfig().queue_depth, help="store queue depth, fio --iodepth")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True, help="store CRC-32 checksums")
    p.add_argument("--no-fio", action="store_true")
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--sweep", action="store_true", help="store only, over block sizes x queue depths")
    p.add_argument("--markdown", help="append the result table (with command and machine) to this file")
    args = p.parse_args(argv)
    header = machine_header(Path(args.dir).parent if not Path(args.dir).exists() else Path(args.dir),
                            with_deepspeed=not (args.no_deepspeed or args.sweep))
    print(header)
    if args.sweep:
        for bs in ("256KiB", "1MiB", "4MiB"):
            for qd in (1, 2, 4, 8, 16):
                a = argparse.Namespace(**{**vars(args), "block_size": bs, "queue_depth": qd, "no_fio": True,
                                          "no_deepspeed": True})
                med = run(a)
                print(f"block {bs:>6} qd {qd:2d}: write {med['store_w']:.2f} GB/s  read {med['store_r']:.2f} GB/s",
                      flush=True)
        return 0
    med = run(args)
    table = report(med, args)
    print(f"size {format_size(parse_size(args.size))}, block {args.block_size}, queue depth {args.queue_depth}, "
          f"checksums {'on (CRC-32 by ' + CRC_IMPL + ')' if args.verify else 'off'}, median of {args.reps}")
    print(table)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(f"\n```\n{header}\n$ python {' '.join(sys.argv)}\n```\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
