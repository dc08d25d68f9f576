"""Helpers of the store tests (a uniquely named module: tests/ has no packages)."""

from __future__ import annotations

import torch


SMALL = dict(block_size="16KiB", checksum_block="16KiB", stripe_unit="64KiB", queue_depth=4)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (bool gets 0/1); compare with :func:`same_bytes`."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    isz = torch.empty((), dtype=dtype).element_size()
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (n * isz,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included), for any dtype."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
