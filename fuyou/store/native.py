"""The native I/O backend: the store's units run in C++ threads (``fuyou/kernels/storeio.cpp``).

Why (issue 3, measured)
-----------------------
With the Python-thread backend (``io.py``) every 1 MiB unit needs a Python thread scheduled and
the GIL three times (checksum, syscall, bookkeeping). Here a request is handed to C++ once (one
ctypes call, the GIL released), its units run in a pool of POSIX threads -- CRC-32 per checksum
block, ``pread``/``pwrite`` in syscalls of ``block_size``, bounce copies for unaligned memory and
padded tails -- and one Python thread (the *reaper*) learns of whole finished requests: Python
touches a request twice, whatever its size, and the I/O threads never wait for the GIL.

Measured on the development machine (2 vCPU, ext4 on virtio, 4 GiB per repetition, 1 MiB x 8,
CRC-32 on, huge-page pool buffers, median of 5, contenders rotated; ``bench/io_bench.py --size 4GiB
--reps 5 --engine native threads``, the flag now named ``--backend``, ``bench/RESULTS.md`` issue 3):

==========================  ===========  ==========  ==============  =============
contender (same run)        write GB/s   read GB/s   write CPU s/GB  read CPU s/GB
==========================  ===========  ==========  ==============  =============
native backend               7.33         3.51        0.056           0.047
Python-thread backend        6.47         3.63        0.056           0.059
DeepSpeed aio_handle        7.17         3.36        0.027           0.037
fio (libaio, depth 8)       5.09         1.64        0.081           0.074
==========================  ===========  ==========  ==============  =============

Most of what had separated the store from DeepSpeed (0.71 of its write speed) was not Python but the
buffers: O_DIRECT pins every page of the caller's memory, and huge pages
(:func:`fuyou.store.aligned.huge_empty`) halved the kernel's CPU per GB for both backends. The native
backend is the default (``backend="auto"``) for its lower CPU per GB and its faster writes; it is
what the engine's I/O threads compete with compute for on a machine with few cores.

Same semantics as the thread backend: a request is cut into the same units; the first failing unit's
error is the request's (typed, naming path, offset and tensor), its other units are skipped, and the
future always completes. The CRC is ISA-L's ``crc32_gzip_refl``, a C symbol exported by the ``isal``
package's extension (a core dependency), else zlib's ``crc32`` from ``libz.so.1``: both give
``zlib.crc32``'s value, so stores written by either backend verify with the other.

A failed write leaves the request's blocks with their previous checksums: blocks that were written
before the failure then fail verification when read (the data of a failed write is never trusted).
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Sequence

import numpy as np

from fuyou.kernels.build import load_storeio_lib
from fuyou.store.aligned import round_up
from fuyou.store.io import IOFuture, Unit
from fuyou.store.errors import StoreCorruptError, StoreIOError, io_error_from_oserror

__all__ = ["NativeBackend", "native_available", "crc_function"]

logger = logging.getLogger(__name__)


class _Unit(ctypes.Structure):  # mirrors struct fy_unit in storeio.cpp
    _fields_ = [("fd", ctypes.c_int32), ("write", ctypes.c_int32), ("direct", ctypes.c_int32),
                ("verify", ctypes.c_int32), ("file_offset", ctypes.c_int64), ("buf", ctypes.c_void_p),
                ("length", ctypes.c_int64), ("block_size", ctypes.c_int64), ("crc_block", ctypes.c_int64),
                ("crcs", ctypes.c_void_p), ("crc_known", ctypes.c_void_p), ("index", ctypes.c_int32),
                ("pad_", ctypes.c_int32)]


class _Done(ctypes.Structure):  # mirrors struct fy_done
    _fields_ = [("request", ctypes.c_int64), ("kind", ctypes.c_int32), ("err", ctypes.c_int32),
                ("offset", ctypes.c_int64), ("length", ctypes.c_int64), ("extra", ctypes.c_int64),
                ("unit", ctypes.c_int32), ("pad_", ctypes.c_int32)]


_CRC: list = []  # [(address, kind, name, keepalive)] once resolved


def crc_function() -> tuple[int, int, str] | None:
    """(address, signature kind, name) of the C CRC-32 the native backend calls, or ``None``.

    Kind 0: ISA-L's ``uint32_t crc32_gzip_refl(uint32_t, const uint8_t*, uint64_t)`` from the isal
    package's extension module; kind 1: zlib's ``crc32`` from ``libz.so.1``. ``FUYOU_STORE_CRC=zlib``
    forces zlib, as it does for :mod:`fuyou.store.checksum`.
    """
    if not _CRC:
        found = None
        if os.environ.get("FUYOU_STORE_CRC", "auto") != "zlib":
            try:
                import isal.isal_zlib as iz

                lib = ctypes.CDLL(iz.__file__)
                fn = lib.crc32_gzip_refl
                found = (ctypes.cast(fn, ctypes.c_void_p).value, 0, "isal", lib)
            except (ImportError, OSError, AttributeError):
                found = None
        if found is None:
            name = ctypes.util.find_library("z") or "libz.so.1"
            try:
                lib = ctypes.CDLL(name)
                found = (ctypes.cast(lib.crc32, ctypes.c_void_p).value, 1, "zlib", lib)
            except (OSError, AttributeError):
                found = None
        _CRC.append(found)
    got = _CRC[0]
    return None if got is None else got[:3]


def native_available() -> bool:
    """True when the native backend can run here (library built, a C CRC-32 found)."""
    return load_storeio_lib() is not None and crc_function() is not None


_LIVE: "weakref.WeakSet[NativeBackend]" = weakref.WeakSet()


class NativeBackend:
    """``threads`` C++ I/O threads; :meth:`submit_request` hands over a whole request's units.

    ``bounce_bytes`` is each thread's aligned bounce buffer (one unit), allocated by a thread the first
    time it needs one. Thread-safe. :meth:`close` finishes queued units, then stops the threads.
    """

    def __init__(self, threads: int, block_size: int, unit_bytes: int):
        lib = load_storeio_lib()
        crc = crc_function()
        if lib is None or crc is None:
            raise RuntimeError("the native I/O backend is not available here (see the log for why)")
        self.block_size, self.unit_bytes = block_size, unit_bytes
        self.crc_name = crc[2]
        self._lib = lib
        self._h = lib.fy_io_create(threads, unit_bytes, crc[0], crc[1])
        if not self._h:
            raise RuntimeError(f"fy_io_create({threads} threads, {unit_bytes} B bounce) failed")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, tuple] = {}
        self._closed = False
        self._reaper = threading.Thread(target=self._reap, name="fuyou-io-reaper", daemon=True)
        self._reaper.start()
        _LIVE.add(self)

    def submit_request(self, fut: IOFuture, units: Sequence[Unit]) -> None:
        """Queue one request (``fut`` was made for exactly one completion: ``units=1``)."""
        n = len(units)
        rec = units[0].record
        cb = rec.checksum_block
        first = units[0].crc_index
        nblocks = units[-1].crc_index - first + -(-units[-1].length // cb)
        crcs = np.zeros(nblocks, dtype=np.uint32)
        known = np.zeros(nblocks, dtype=np.uint8)
        write, verify = units[0].write, units[0].verify
        if verify and not write:
            want = rec.checksums[first:first + nblocks]
            for j, c in enumerate(want):
                if c is not None:
                    crcs[j], known[j] = c, 1
        arr = (_Unit * n)()
        cbase, kbase = crcs.ctypes.data, known.ctypes.data
        for i, u in enumerate(units):
            s = arr[i]
            s.fd, s.write, s.direct, s.verify = u.fd, int(write), int(u.direct), int(verify)
            s.file_offset, s.buf, s.length = u.file_offset, u.addr, u.length
            s.block_size, s.crc_block = self.block_size, cb
            s.crcs, s.crc_known, s.index = cbase + 4 * (u.crc_index - first), kbase + (u.crc_index - first), i
        rid = next(self._ids)
        with self._lock:
            if self._closed:
                raise RuntimeError("the store's I/O backend is closed")
            self._pending[rid] = (fut, units, crcs, known, arr)
        if self._lib.fy_io_submit(self._h, rid, arr, n) != 0:
            with self._lock:
                self._pending.pop(rid, None)
            raise RuntimeError("the store's I/O backend refused a request (closed)")

    def _reap(self) -> None:
        out = (_Done * 64)()
        while True:
            k = self._lib.fy_io_reap(self._h, out, 64, 200)
            if k < 0:
                return
            for i in range(k):
                d = out[i]
                with self._lock:
                    fut, units, crcs, known, _arr = self._pending.pop(d.request)
                try:
                    self._finish(fut, units, crcs, d)
                except BaseException as exc:  # noqa: BLE001 -- every error must reach the future
                    fut._fail(exc)
                finally:
                    for u in units:
                        u.mv = None  # type: ignore[assignment]
                    fut._unit_done()

    @staticmethod
    def _finish(fut: IOFuture, units: Sequence[Unit], crcs: np.ndarray, d: _Done) -> None:
        u0 = units[0]
        rec, first = u0.record, u0.crc_index
        if d.kind == 0:
            if u0.write:
                n = len(crcs)
                rec.checksums[first:first + n] = crcs.tolist() if u0.verify else [None] * n
            return
        u = units[d.unit]
        op = "write" if u.write else "read"
        if d.kind == 1:
            exc = OSError(d.err, os.strerror(d.err))
            fut._fail(io_error_from_oserror(exc, u.path, d.offset, d.length, op, rec.key))
        elif d.kind == 2:
            fut._fail(StoreIOError(u.path, d.offset, d.length, None, op, rec.key))
        elif d.kind == 3:
            end = u.file_offset + (round_up(u.length) if u.direct else u.length)
            fut._fail(StoreCorruptError(rec.key, u.path, (
                f"file truncated: it is {d.extra} bytes but the tensor's extent needs bytes up to {end}")))
        else:
            block = u.crc_index + d.extra
            start = block * rec.checksum_block
            fut._fail(StoreCorruptError(rec.key, u.path, (
                f"CRC32 mismatch in checksum block {block} (tensor bytes [{start}, {start + d.length}), "
                f"file offset {d.offset})")))

    def close(self) -> None:
        """Finish queued units, stop the threads and the reaper. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _LIVE.discard(self)
        self._lib.fy_io_stop(self._h)
        self._reaper.join()
        self._lib.fy_io_free(self._h)
        self._h = None


@atexit.register
def _stop_live() -> None:
    # See Note: [Stop I/O threads before interpreter shutdown] in io.py.
    for e in list(_LIVE):
        e.close()
