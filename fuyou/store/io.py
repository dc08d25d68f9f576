"""The Python-thread I/O backend (worker threads issuing ``os.preadv`` / ``os.pwritev``), and the store's futures.

Since issue 3's follow-up the default is the native backend (``native.py``: the same units run in C++
threads); this one is its fallback where the C++ library cannot be built, and the reference the
native one is tested against. The measurements below chose threads over libaio bindings.

Why threads (measured, not assumed)
-----------------------------------
Measured on the development machine (2 vCPU, ext4 on a virtio disk, Linux 6.18, 1 GiB transfers
from a 4 KiB-aligned buffer, O_DIRECT, median of 3, 1 GB = 1e9 B; shared machine, so compare only
figures from the same run):

==============================================  ===========  ==========
backend (same file, same run)                   write GB/s   read GB/s
==============================================  ===========  ==========
threads + os.pwritev/preadv, 1 MiB, 8 threads   5.78         2.65
python-libaio 0.9.5 (io_submit ring), depth 8   4.52         2.34
python-libaio 0.9.5, depth 16                   4.38         2.38
==============================================  ===========  ==========

Thread sweep (another, busier run): 1 MiB blocks gave write 1.2 / 2.1 / 3.1 / 3.3 / 2.8 GB/s and
read 0.9 / 1.3 / 1.3 / 1.5 / 1.7 GB/s at 1 / 2 / 4 / 8 / 16 threads; 256 KiB blocks were slower
(write <= 2.0, read <= 1.4) and 4 MiB no better (write 2.6, read 1.5 at 8) -- hence the defaults
``block_size=1 MiB``, ``queue_depth=8``. fio (libaio, O_DIRECT) in that run: write 2.3-3.6, read
1.0-1.3 GB/s. The libaio binding loses because completions are reaped by one Python thread holding
the GIL, while each preadv/pwritev thread releases the GIL for the whole syscall; with 2 cores the
kernel, not Python, is the limit. An io_uring binding would reap the same way and was not kept
without a measured win; ``aiofiles`` runs the same blocking calls in a thread pool behind asyncio
(one more hop per request) and cannot read into a caller's buffer at an offset, so it was not a
candidate for the fast path. The benchmark against fio is ``bench/io_bench.py``
(``bench/RESULTS.md`` (issue 3)).

Against DeepSpeed's aio_handle (issue 3)
----------------------------------------
DeepSpeed's ``aio_handle`` (libaio, ``intra_op_parallelism`` 2, queue depth 8, 1 MiB) splits a
transfer into two contiguous halves, one C++ thread each with 8 ``io_submit`` requests in flight (16
in all). Store / DeepSpeed at 4 GiB swings between runs of the same code on this shared machine
(load average about 5 from other sessions): write 0.79-1.15, read 0.73-1.18 (``bench/io_bench.py``
runs in ``bench/RESULTS.md``, issue 3). One such run, order shuffled per repetition, 7 reps; ratio =
median of the per-repetition ratio to DeepSpeed 1 MiB, same run:

====================================  =====  ====  ==========  ==========
store setting (checksum block 1 MiB)  write  read  CPU s/GB w  CPU s/GB r
====================================  =====  ====  ==========  ==========
1 MiB, 8 threads (default)            1.15   1.18  0.101       0.102
same, checksums off                   1.13   1.24  0.041       0.055
2 MiB, 4 threads                      0.98   1.15  0.087       0.093
4 MiB, 4 threads                      1.16   1.21  0.080       0.083
4 MiB, 2 threads                      1.03   1.15  0.084       0.090
DeepSpeed 1 MiB, depth 8 (ref.)       1.00   1.00  0.036       0.045
DeepSpeed 4 MiB, depth 4              1.05   1.02  0.033       0.041
====================================  =====  ====  ==========  ==========

Larger syscalls save CPU (fewer units, syscalls and Python steps) but not time, so the default stays
1 MiB x 8. 16 threads wrote at 0.74 of 8 in another run (reads equal): more threads only contend for
the GIL and the two cores. Reading into or writing from DeepSpeed's mlock-ed buffer instead of the
pool's did not help (4.58 vs 5.28 GB/s write, same run). The store spends about 3x DeepSpeed's CPU
per GB in every run: the CRC-32 (0.05 s/GB, ISA-L) and about 0.01 s/GB of Python per 1 MiB unit.
At 5 GB/s that is half a core, and every unit needs a Python thread scheduled and the GIL; on a
machine whose two cores are shared with other work this is the likeliest bound (not proven: no run
on an idle machine was possible). Closing it would take the per-unit loop out of Python.
(Follow-up: ``native.py`` took it out of Python, and huge-page buffers halved the kernel's share;
together they brought the store to 1.02 / 1.05 of DeepSpeed's write / read speed.)

How a request runs
------------------
A ``read_into`` / ``write_from`` request is cut into **units**: at most ``max(block_size,
checksum_block)`` bytes, starting on a checksum-block boundary, never crossing a stripe piece (so one
unit is one contiguous range of one file). Units go on one queue shared by ``queue_depth`` worker
threads; each thread issues blocking syscalls of at most ``block_size`` bytes, so ``queue_depth``
requests are in flight at the device. The GIL is released inside ``preadv``/``pwritev`` and inside
the CRC-32 (``fuyou.store.checksum``: ISA-L or zlib-ng when installed, else ``zlib.crc32``), so the
threads really overlap on two cores.

Fast path: the caller's bytes for a unit start at a 4 KiB-aligned address and are a multiple of 4 KiB
long -- the syscall goes straight from/to the caller's memory. Otherwise (unaligned buffer, or the
tensor's last partial 4 KiB) the unit goes through the worker's aligned bounce buffer: one extra
memcpy of the unit, the tail padded with zeros on write. With buffered I/O (no O_DIRECT) no bounce is
needed.

A failing unit records the first error on its future and still counts as finished, so **no future
hangs**: ``result()`` raises the typed error once every unit of the request has been retired.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fuyou.store.aligned import aligned_empty, byte_view, round_up
from fuyou.store.checksum import crc32
from fuyou.store.config import ALIGNMENT
from fuyou.store.errors import StoreCorruptError, StoreIOError, io_error_from_oserror

if TYPE_CHECKING:
    from fuyou.store.layout import TensorRecord

__all__ = ["IOFuture", "Unit", "ThreadBackend"]


class IOFuture:
    """Completion handle of one read/write request (many may be in flight).

    ``done()`` never blocks; ``result(timeout)`` blocks until every unit has finished, then returns the
    number of bytes moved or raises the first error (a :class:`StoreError` subclass). ``get`` is an
    alias of ``result`` (kvikio's spelling). Holds a reference to the caller's tensor until done.
    """

    __slots__ = ("nbytes", "_remaining", "_exc", "_lock", "_event", "_keepalive", "_callbacks")

    def __init__(self, nbytes: int, units: int, keepalive: Any = None):
        self.nbytes = nbytes
        self._remaining = units
        self._exc: BaseException | None = None
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._keepalive = keepalive
        self._callbacks: list[Callable[[IOFuture], None]] = []
        if units == 0:
            self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> int:
        if not self._event.wait(timeout):
            raise TimeoutError(f"I/O of {self.nbytes} bytes not finished within {timeout} s")
        if self._exc is not None:
            raise self._exc
        return self.nbytes

    get = result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._event.wait(timeout):
            raise TimeoutError(f"I/O of {self.nbytes} bytes not finished within {timeout} s")
        return self._exc

    def add_done_callback(self, fn: Callable[["IOFuture"], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._exc is None:
                self._exc = exc

    def _unit_done(self) -> None:
        with self._lock:
            self._remaining -= 1
            finished = self._remaining == 0
            if finished:
                self._event.set()
                self._keepalive = None
                callbacks, self._callbacks = self._callbacks, []
        if finished:
            for fn in callbacks:
                fn(self)


class Unit:
    """One contiguous transfer between caller memory and one file range (see module docstring)."""

    __slots__ = ("fut", "write", "fd", "path", "direct", "file_offset", "mv", "addr", "length",
                 "record", "crc_index", "verify")

    def __init__(self, fut: IOFuture, write: bool, fd: int, path: str, direct: bool, file_offset: int,
                 mv: memoryview, addr: int, length: int, record: "TensorRecord", crc_index: int, verify: bool):
        self.fut, self.write, self.fd, self.path, self.direct = fut, write, fd, path, direct
        self.file_offset, self.mv, self.addr, self.length = file_offset, mv, addr, length
        self.record, self.crc_index, self.verify = record, crc_index, verify


_LIVE_BACKENDS: "weakref.WeakSet[ThreadBackend]" = weakref.WeakSet()


@atexit.register
def _stop_live_backends() -> None:
    # Note: [Stop I/O threads before interpreter shutdown] Daemon threads still alive when the
    # interpreter finalizes are torn down mid-call; inside torch's C++ frames that aborts the process
    # ("terminate called without an active exception"). A store the user forgot to close is therefore
    # drained and stopped here, before finalization starts.
    for backend in list(_LIVE_BACKENDS):
        backend.close()


class ThreadBackend:
    """``queue_depth`` daemon threads executing :class:`Unit` s from one queue."""

    def __init__(self, queue_depth: int, block_size: int, unit_bytes: int):
        self.block_size = block_size
        self.unit_bytes = unit_bytes
        self._q: queue.SimpleQueue[Unit | None] = queue.SimpleQueue()
        self._local = threading.local()
        self._threads = [threading.Thread(target=self._worker, name=f"fuyou-io-{i}", daemon=True)
                         for i in range(queue_depth)]
        for t in self._threads:
            t.start()
        _LIVE_BACKENDS.add(self)

    def submit_request(self, fut: IOFuture, units: Sequence[Unit]) -> None:
        """Queue one request's units (``fut`` counts ``len(units)`` completions)."""
        for u in units:
            u.fut = fut
            self._q.put(u)

    def close(self) -> None:
        """Finish queued units, then stop the threads. Idempotent."""
        _LIVE_BACKENDS.discard(self)
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    # -- worker side -----------------------------------------------------------------------------
    def _bounce(self) -> tuple[memoryview, int]:
        b = getattr(self._local, "bounce", None)
        if b is None:
            t = aligned_empty(self.unit_bytes)
            b = self._local.bounce = (t, byte_view(t), t.data_ptr())
        return b[1], b[2]

    def _worker(self) -> None:
        while True:
            u = self._q.get()
            if u is None:
                return
            try:
                if u.fut._exc is None:  # a request that already failed skips its remaining units
                    self._run(u)
            except BaseException as exc:  # noqa: BLE001 -- every error must reach the future
                u.fut._fail(exc)
            finally:
                u.fut._unit_done()
                u.mv = None  # type: ignore[assignment]  # drop the view of caller memory promptly

    def _run(self, u: Unit) -> None:
        rec, cb = u.record, u.record.checksum_block
        padded = round_up(u.length) if u.direct else u.length
        bounced = u.direct and (u.addr % ALIGNMENT or padded != u.length)
        if u.write:
            crcs = [crc32(u.mv[i:i + cb]) for i in range(0, u.length, cb)] if u.verify else None
            if bounced:
                bmv, _ = self._bounce()
                bmv[:u.length] = u.mv
                bmv[u.length:padded] = bytes(padded - u.length)
                self._transfer(u, bmv[:padded], padded)
            else:
                self._transfer(u, u.mv, padded)
            for j in range(-(-u.length // cb)):
                rec.checksums[u.crc_index + j] = None if crcs is None else crcs[j]
            return
        if bounced:
            bmv, _ = self._bounce()
            self._transfer(u, bmv[:padded], padded)
            u.mv[:] = bmv[:u.length]
        else:
            self._transfer(u, u.mv, padded)
        if u.verify:
            for j, i in enumerate(range(0, u.length, cb)):
                want = rec.checksums[u.crc_index + j]
                if want is not None and crc32(u.mv[i:i + cb]) != want:
                    start = (u.crc_index + j) * cb
                    raise StoreCorruptError(rec.key, u.path, (
                        f"CRC32 mismatch in checksum block {u.crc_index + j} (tensor bytes "
                        f"[{start}, {start + min(cb, u.length - i)}), file offset {u.file_offset + i})"))

    def _transfer(self, u: Unit, buf: memoryview, n: int) -> None:
        """Move ``n`` bytes between ``buf`` and the file in syscalls of at most ``block_size``."""
        bs, pos, off = self.block_size, 0, u.file_offset
        op = os.pwritev if u.write else os.preadv
        while pos < n:
            want = min(bs, n - pos)
            try:
                got = op(u.fd, [buf[pos:pos + want]], off + pos)
            except OSError as exc:
                raise io_error_from_oserror(exc, u.path, off + pos, want, "write" if u.write else "read",
                                            u.record.key) from exc
            if got < want:
                size = os.fstat(u.fd).st_size
                if not u.write and size < off + pos + want:
                    raise StoreCorruptError(u.record.key, u.path, (
                        f"file truncated: it is {size} bytes but the tensor's extent needs bytes up to "
                        f"{off + n}"))
                if got == 0:
                    raise StoreIOError(u.path, off + pos, want, None, "write" if u.write else "read",
                                       u.record.key)
            pos += got
