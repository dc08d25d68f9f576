"""Aligned CPU memory and zero-copy byte views of tensors.

O_DIRECT needs the buffer address, the file offset and the transfer size to be multiples of the
logical block size; fuyou uses 4 KiB everywhere (``ALIGNMENT``), which satisfies 512-byte and 4 KiB
devices alike. A buffer that is not aligned still works with the store, through a bounce copy.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

from fuyou.store.config import ALIGNMENT

__all__ = ["aligned_empty", "huge_empty", "is_aligned", "byte_view", "round_up", "HUGE_PAGE"]

HUGE_PAGE = 2 * 1024 * 1024
"""Size of an x86-64 / arm64 transparent huge page; I/O buffers of at least this size are backed by them."""


def round_up(n: int, multiple: int = ALIGNMENT) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def is_aligned(t: torch.Tensor, alignment: int = ALIGNMENT) -> bool:
    """True when ``t``'s first byte sits at a multiple of ``alignment``."""
    return t.data_ptr() % alignment == 0


def aligned_empty(numel: int, dtype: torch.dtype = torch.uint8, alignment: int = ALIGNMENT) -> torch.Tensor:
    """Uninitialised 1-D CPU tensor of ``numel`` elements whose data starts at a multiple of ``alignment``.

    Cost: one allocation of ``round_up(numel * itemsize, alignment) + alignment`` bytes (the extra is
    slack for the alignment; the byte size is rounded up to ``alignment`` so the tail can be written
    with O_DIRECT without a bounce). The returned tensor is a view that keeps the allocation alive.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, got {alignment}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = round_up(max(numel * itemsize, 1), alignment)
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % alignment
    return raw[skip:skip + nbytes].view(dtype)[:numel]


def byte_view(t: torch.Tensor, byte_offset: int = 0, nbytes: int | None = None) -> memoryview:
    """Writable zero-copy ``memoryview`` (format 'B') of bytes of a contiguous CPU tensor.

    Works for every dtype (bf16 and float8 included, which numpy cannot view). The view does not keep
    ``t`` alive: the caller must (the store's futures hold a reference to the tensor until done).
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    total = t.numel() * t.element_size()
    n = total - byte_offset if nbytes is None else nbytes
    if byte_offset < 0 or n < 0 or byte_offset + n > total:
        raise ValueError(f"bytes [{byte_offset}, {byte_offset + n}) outside a tensor of {total} bytes")
    if n == 0:
        return memoryview(bytearray(0))
    arr = (ctypes.c_ubyte * n).from_address(t.data_ptr() + byte_offset)
    return memoryview(arr).cast("B")


def huge_empty(nbytes: int) -> torch.Tensor:
    """Uninitialised (zero-filled) 1-D uint8 CPU tensor of ``round_up(nbytes, 4 KiB)`` bytes, 2 MiB aligned and
    advised for transparent huge pages (``MADV_HUGEPAGE``): the store's I/O buffers.

    Why: an O_DIRECT transfer pins every page of the caller's buffer in the kernel for its duration.
    With 4 KiB pages that is 256 pages per MiB; with 2 MiB pages, half of one. Measured on the
    development machine (native backend, 256 MiB, 8 threads, CRC on, ``bench/RESULTS.md`` issue 3):
    write 5.2-5.6 -> 7.1-7.3 GB/s, read 2.1-2.6 -> 3.6-3.9 GB/s, CPU 0.08 -> 0.047 s per GB, against the
    same buffer from ``aligned_empty``. Costs: 2 MiB of address space (not memory) for the alignment;
    the tail that does not fill a whole huge page stays on 4 KiB pages, so resident memory is never
    more than the rounded size. Where THP is off (``/sys/kernel/mm/transparent_hugepage/enabled`` =
    never) or madvise is missing, the buffer works the same on 4 KiB pages.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    size = round_up(max(nbytes, 1))
    m = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
    whole = torch.frombuffer(m, dtype=torch.uint8)
    skip = (-whole.data_ptr()) % HUGE_PAGE
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_HUGEPAGE") and size >= HUGE_PAGE:
        try:
            m.madvise(mmap.MADV_HUGEPAGE, skip, size // HUGE_PAGE * HUGE_PAGE)
        except OSError:
            pass  # THP unsupported here: 4 KiB pages
    # torch.frombuffer keeps the mmap object alive for as long as any view of it lives.
    return whole[skip:skip + size]
