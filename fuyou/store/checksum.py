"""The store's block checksum: CRC-32 (zlib's polynomial, ISO-HDLC), by the fastest implementation here.

Every implementation below computes the same value as ``zlib.crc32``, so a store written with one is
verified by any other; the manifest records the algorithm (``ALGORITHM``) so that a future change of
*algorithm* (say CRC-32C) can never verify blocks with the wrong one. All of them release the GIL on
large buffers, so the store's I/O threads checksum in parallel.

Measured on the development machine (2 vCPU AVX-512, 1 MiB blocks, GB = 1e9 B, median of 5;
``bench/RESULTS.md``, issue 3): zlib.crc32 4.0 GB/s on one thread, 5.3 GB/s on two; isal 1.9.1
22 / 37 GB/s; zlib-ng 1.1.0 27 / 35 GB/s; crc32c 2.9 (CRC-32C, another algorithm) 13 / 22 GB/s;
google-crc32c 1.9 refuses a memoryview of writable memory (it would need a copy).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable

ALGORITHM = "crc32"
"""The checksum algorithm this code writes and verifies; recorded as ``checksum`` in the manifest."""


def _pick(prefer: str) -> tuple[Callable[..., int], str]:
    if prefer != "zlib":
        try:
            from isal.isal_zlib import crc32  # ISA-L: carry-less multiply (PCLMUL/VPCLMUL) kernels
            return crc32, "isal"
        except ImportError:
            pass
        try:
            from zlib_ng.zlib_ng import crc32
            return crc32, "zlib-ng"
        except ImportError:
            pass
    return zlib.crc32, "zlib"


# FUYOU_STORE_CRC=zlib forces the standard library's implementation (benchmarks of the fallback).
crc32, IMPLEMENTATION = _pick(os.environ.get("FUYOU_STORE_CRC", "auto"))
"""``crc32(buffer) -> int``: CRC-32 of a bytes-like object (memoryviews of pinned memory included)."""
