"""Aligned CPU memory and zero-copy byte views of tensors.

O_DIRECT needs the buffer address, the file offset and the transfer size to be multiples of the
logical block size; fuyou uses 4 KiB everywhere (``ALIGNMENT``), which satisfies 512-byte and 4 KiB
devices alike. A buffer that is not aligned still works with the store, through a bounce copy.
"""

from __future__ import annotations

import ctypes

import torch

from fuyou.store.config import ALIGNMENT

__all__ = ["aligned_empty", "is_aligned", "byte_view", "round_up"]


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
