"""I/O benchmark of the SSD tier against fio and DeepSpeed's aio_handle, same directory, same run.

Writes then reads N bytes through ``TensorStore`` (pinned/aligned pool buffer, O_DIRECT), through fio
(``--direct=1 --ioengine=libaio``, same block size, iodepth = the store's queue depth) and, when
importable, DeepSpeed's ``aio_handle`` (page-locked buffer). Repetitions are interleaved and their order
rotates (store, fio, deepspeed; fio, deepspeed, store; ...) so drift on a shared machine, and what the
previous contender left the disk doing, hit every contender alike; the median is reported, with every
repetition and the CPU seconds each contender spent per GB. GB/s are 1e9 bytes per second. Ratio =
store / best peer.

    python bench/io_bench.py                          # CI smoke: 64 MiB, 3 reps
    flock /tmp/fuyou-bench.lock python bench/io_bench.py --size 4GiB --reps 5 --markdown bench/RESULTS.md
    python bench/io_bench.py --size 1GiB --sweep      # the store over block sizes x queue depths
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fuyou.errors import FuyouError
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


class Store:
    """The store as a contender: one tensor of ``nbytes``, written from / read into pool buffers."""

    def __init__(self, d: Path, nbytes: int, cfg: StoreConfig, name: str = "store"):
        self.name = name
        shutil.rmtree(d / name, ignore_errors=True)
        self.d, self.pool = d, PinnedPool(2 * nbytes + (1 << 20))
        self.src, self.dst = self.pool.acquire(nbytes), self.pool.acquire(nbytes)
        tile = torch.randint(0, 256, (min(nbytes, 64 << 20),), dtype=torch.uint8)
        for o in range(0, nbytes, tile.numel()):  # random 64 MiB tile repeated: cheap to make at 4 GiB
            self.src.tensor[o:o + tile.numel()] = tile[:nbytes - o]
        try:  # (a full or read-only directory left a part-made store: a pass)
            self.store = TensorStore.create([d / name], cfg)
            self.backend = self.store.backend_name
            self.store.allocate("x", (nbytes,), torch.uint8)
        except BaseException:
            shutil.rmtree(d / name, ignore_errors=True)
            raise
        Store.write(self)  # untimed: converts the fallocated extent to written (the host copy: a subclass's
        # write may need what its own __init__ sets up after this; the bytes are the same)

    def write(self) -> None:
        self.store.write_from("x", self.src.tensor).result()

    def read(self) -> None:
        self.store.read_into("x", self.dst.tensor).result()

    def before_read(self) -> None:  # untimed: the read must really fill the buffer
        self.dst.tensor.zero_()

    def check(self) -> None:
        if not torch.equal(self.src.tensor, self.dst.tensor):
            raise RuntimeError("store benchmark read back different data")

    def close(self) -> None:
        self.store.close()
        self.src.release()
        self.dst.release()
        shutil.rmtree(self.d / self.name, ignore_errors=True)


class GpuStore(Store):
    """The store moving data straight between the SSD and GPU memory (kvikio; GPUDirect Storage where
    the file system allows, else kvikio's own bounce buffers): the activation and weight paths of a
    CUDA run that bypass the CPU."""

    def __init__(self, d: Path, nbytes: int, cfg: StoreConfig):
        super().__init__(d, nbytes, cfg, name="store-gpu")
        self.gsrc = self.src.tensor.to("cuda")
        self.gdst = torch.empty_like(self.gsrc)
        self.backend = "kvikio"

    def write(self) -> None:
        self.store.write_from("x", self.gsrc).result()

    def read(self) -> None:
        self.store.read_into("x", self.gdst).result()
        torch.cuda.synchronize()

    def before_read(self) -> None:
        self.gdst.zero_()
        torch.cuda.synchronize()

    def check(self) -> None:
        if not torch.equal(self.gsrc, self.gdst):
            raise RuntimeError("GPU store benchmark read back different data")


class Fio:
    """fio as a contender; its own bandwidth figure is used, not our wall clock around the process."""

    name = "fio"

    def __init__(self, d: Path, nbytes: int, bs: int, qd: int):
        self.d, self.nbytes, self.bs, self.qd = d, nbytes, bs, qd
        self.rate("write")  # untimed layout

    def rate(self, rw: str) -> float:
        out = subprocess.run(
            ["fio", "--name=io_bench", f"--filename={self.d / 'fio.dat'}", f"--size={self.nbytes}", f"--bs={self.bs}",
             f"--iodepth={self.qd}", f"--rw={rw}", "--direct=1", "--ioengine=libaio", "--numjobs=1",
             "--output-format=json"], capture_output=True, text=True, check=True).stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]
        return job["write" if rw == "write" else "read"]["bw_bytes"] / 1e9

    def before_read(self) -> None:
        pass

    def check(self) -> None:
        pass

    def close(self) -> None:
        (self.d / "fio.dat").unlink(missing_ok=True)


class DeepSpeed:
    """DeepSpeed's libaio ``aio_handle`` with a page-locked buffer, data checked after every read."""

    name = "ds"

    def __init__(self, handle, d: Path, nbytes: int):
        self.h, self.path, self.nbytes = handle, str(d / "ds.dat"), nbytes
        self.buf = handle.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
        self.ref = torch.randint(0, 256, (min(nbytes, 64 << 20),), dtype=torch.uint8)
        for o in range(0, nbytes, self.ref.numel()):
            self.buf[o:o + self.ref.numel()] = self.ref[:nbytes - o]
        self.write()  # untimed: allocates the file's extents

    def _io(self, fn) -> None:
        if fn(self.buf, self.path) != 1:  # it returns the number of completed ops
            raise RuntimeError(f"deepspeed aio_handle {fn.__name__} on {self.path} failed")

    def write(self) -> None:
        self._io(self.h.sync_pwrite)

    def read(self) -> None:
        self._io(self.h.sync_pread)

    def before_read(self) -> None:  # untimed: the read must really fill the buffer
        self.buf.zero_()

    def check(self) -> None:
        for o in range(0, self.nbytes, self.ref.numel()):
            if not torch.equal(self.buf[o:o + self.ref.numel()], self.ref[:self.nbytes - o]):
                raise RuntimeError("deepspeed aio_handle read back different data")

    def close(self) -> None:
        self.h.free_cpu_locked_tensor(self.buf)
        Path(self.path).unlink(missing_ok=True)


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


def _cpu_seconds() -> float:
    """User + system CPU of this process and its waited-for children (fio) so far."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def run(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Per-rep GB/s (``store_w`` ...) and CPU seconds per GB (``store_w_cpu`` ...) of every contender,
    and the I/O backend each store contender ran with.

    The order of the contenders rotates from one repetition to the next (store, fio, ds; fio, ds,
    store; ...), so none always follows the same neighbour: on this virtio disk a write right after
    another 4 GiB of writes or reads can be much slower, and a fixed order biased the ratio.
    """
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    nbytes, bs = parse_size(args.size), parse_size(args.block_size)
    cb = parse_size(args.checksum_block)
    contenders: list = []
    try:  # (a contender that failed to start left the others' files: a pass)
        return _run(args, d, nbytes, bs, cb, contenders)
    finally:
        for c in contenders:
            c.close()


def _run(args, d: Path, nbytes: int, bs: int, cb: int, contenders: list):
    for i, backend in enumerate(args.backend):
        cfg = StoreConfig(block_size=bs, queue_depth=args.queue_depth, verify_checksums=args.verify,
                          checksum_block=cb, stripe_unit=max(64 << 20, bs, cb), backend=backend)
        contenders.append(Store(d, nbytes, cfg, name="store" if i == 0 else f"store-{backend}"))
        print(f"{contenders[-1].name}: backend {contenders[-1].backend}")
    if args.gpu:
        from fuyou.store.kvikio_backend import kvikio_available

        if not kvikio_available():
            raise SystemExit("--gpu needs a CUDA GPU and kvikio")
        cfg = StoreConfig(block_size=bs, queue_depth=args.queue_depth, verify_checksums=args.verify,
                          checksum_block=cb, stripe_unit=max(64 << 20, bs, cb))
        contenders.append(GpuStore(d, nbytes, cfg))
    if shutil.which("fio") is not None and not args.no_fio:
        contenders.append(Fio(d, nbytes, bs, args.queue_depth))
    else:
        print("fio: skipped (not installed or --no-fio)")
    h = None if args.no_deepspeed else deepspeed_handle(bs, args.queue_depth)
    if h is not None:
        contenders.append(DeepSpeed(h, d, nbytes))
    res: dict[str, list[float]] = {}
    for rep in range(args.reps):
        k = rep % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            for op in ("w", "r"):
                if op == "r":
                    c.before_read()
                c0, t = _cpu_seconds(), time.perf_counter()
                if isinstance(c, Fio):
                    rate = c.rate("write" if op == "w" else "read")
                else:
                    c.write() if op == "w" else c.read()
                    rate = nbytes / (time.perf_counter() - t) / 1e9
                res.setdefault(f"{c.name}_{op}", []).append(rate)
                res.setdefault(f"{c.name}_{op}_cpu", []).append((_cpu_seconds() - c0) / (nbytes / 1e9))
            c.check()
    return res, {c.name: c.backend for c in contenders if isinstance(c, Store)}


def report(res: dict[str, list[float]], backends: dict[str, str] | None = None) -> str:
    """Markdown table of the medians, the store / best-peer ratios, and every repetition's GB/s."""
    backends = backends or {}
    med = {k: statistics.median(v) for k, v in res.items()}
    lines = ["| | write GB/s | read GB/s | write CPU s/GB | read CPU s/GB |", "|---|---|---|---|---|"]
    names = {k[:-2]: f"fuyou TensorStore ({backends.get(k[:-2], k[6:-2])} backend)"
             for k in res if k.startswith("store") and k.endswith("_w")}
    names.update({"fio": "fio libaio O_DIRECT", "ds": "DeepSpeed aio_handle"})
    for k, name in names.items():
        if f"{k}_w" in med:
            lines.append(f"| {name} | {med[k + '_w']:.2f} | {med[k + '_r']:.2f} | {med[k + '_w_cpu']:.3f} "
                         f"| {med[k + '_r_cpu']:.3f} |")
    for op, col in (("w", "write"), ("r", "read")):
        peers = [med[f"{p}_{op}"] for p in ("fio", "ds") if f"{p}_{op}" in med]
        if peers:
            r = f"{med['store_' + op] / max(peers):.2f}"
            lines.append(f"| **ratio store / best peer, {col}** | {r if op == 'w' else ''} | {r if op == 'r' else ''} | | |")
    lines.append("")
    lines.append("Every repetition (GB/s, in run order; CPU = user + system of the process, fio's own "
                 "start-up included):")
    lines += [f"- {k}: {', '.join(f'{x:.2f}' for x in v)}" for k, v in res.items() if not k.endswith("_cpu")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "fuyou-io-bench"),
                   help="directory on the disk to measure (default %(default)s)")
    p.add_argument("--size", default="64MiB", help="bytes to write and read per repetition (default %(default)s)")
    p.add_argument("--block-size", default=str(StoreConfig().block_size), help="I/O block size, also fio --bs")
    p.add_argument("--checksum-block", default=str(StoreConfig().checksum_block),
                   help="bytes per store CRC-32 (independent of --block-size)")
    p.add_argument("--backend", nargs="+", default=["auto"], choices=["auto", "native", "threads"],
                   help="store I/O backend(s); the first is 'store' in the ratios, the others are shown beside it")
    p.add_argument("--queue-depth", type=int, default=StoreConfig().queue_depth, help="store queue depth, fio --iodepth")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True, help="store CRC-32 checksums")
    p.add_argument("--no-fio", action="store_true")
    p.add_argument("--gpu", action="store_true", help="add the store reading into and writing from GPU memory (kvikio)")
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--sweep", action="store_true", help="store only, over block sizes x queue depths")
    p.add_argument("--markdown", help="append the result table (with command and machine) to this file")
    args = p.parse_args(argv)
    if args.reps < 1 or args.queue_depth < 1:
        p.error("--reps and --queue-depth must be at least 1")
    if Path(args.dir).exists() and not Path(args.dir).is_dir():
        p.error(f"--dir {args.dir} is a file; give a directory on the disk to measure")
    # SIGTERM (a timeout, a killed job) ends the run through its ``finally``: the store's file (--size, 4 GiB)
    # was left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _main(args)
    except FuyouError as e:  # (a read-only or full directory was a StorePermissionError traceback)
        print(f"io_bench: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    header = machine_header(Path(args.dir).parent if not Path(args.dir).exists() else Path(args.dir),
                            with_deepspeed=not (args.no_deepspeed or args.sweep))
    print(header)
    if args.sweep:
        for bs in ("256KiB", "1MiB", "4MiB"):
            for qd in (1, 2, 4, 8, 16):
                a = argparse.Namespace(**{**vars(args), "block_size": bs, "queue_depth": qd, "no_fio": True,
                                          "no_deepspeed": True})
                med = {k: statistics.median(v) for k, v in run(a)[0].items()}
                print(f"block {bs:>6} qd {qd:2d}: write {med['store_w']:.2f} GB/s  read {med['store_r']:.2f} GB/s",
                      flush=True)
        return 0
    table = report(*run(args))
    print(f"size {format_size(parse_size(args.size))}, block {args.block_size}, checksum block "
          f"{args.checksum_block}, queue depth {args.queue_depth}, "
          f"checksums {'on (CRC-32 by ' + CRC_IMPL + ')' if args.verify else 'off'}, median of {args.reps}")
    print(table)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(f"\n```\n{header}\n$ python {' '.join(sys.argv)}\n```\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
