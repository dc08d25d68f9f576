"""A pool of page-locked (pinned) CPU buffers bounded by its share of the CPU memory budget.

Pinned memory is a limited resource: it cannot be swapped out, pinning is slow (a ``cudaHostRegister``
of 1 GiB costs tens of milliseconds), and too much of it starves the rest of the system. So the pool
keeps *everything it has allocated* -- buffers handed out plus freed buffers cached for reuse -- at or
under ``capacity`` bytes. A request that does not fit now evicts cached buffers, then waits for a
release; a request larger than the whole capacity raises :class:`PoolBudgetError` at once.

Buffers are 4 KiB aligned (O_DIRECT's rule) and their byte size is rounded up to 4 KiB; that rounded
size is what counts against the capacity. Buffers of 2 MiB or more are 2 MiB aligned and backed by
transparent huge pages (:func:`fuyou.store.aligned.huge_empty`, which says what that saves). The
buffers are page-locked only when the pool is given a ``device`` (``fuyou.engine.device``): the pools
whose buffers a GPU copies from or to; the optimizer's never reaches the GPU and stays pageable. A
pinned pool's buffers are unregistered when freed (``trim``, ``close``).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import torch

from fuyou.store.aligned import HUGE_PAGE, aligned_empty, huge_empty, round_up
from fuyou.store.errors import PoolBudgetError

__all__ = ["PinnedPool", "PinnedBuffer"]


class _Block:
    """One allocation: aligned bytes, registered with CUDA when available."""

    __slots__ = ("raw", "nbytes", "registered")

    def __init__(self, nbytes: int, alignment: int, device):
        # Buffers of a huge page or more get huge pages (aligned.huge_empty: half the kernel's CPU per
        # O_DIRECT GB, measured); smaller ones come from the allocator.
        big = nbytes >= HUGE_PAGE and HUGE_PAGE % alignment == 0
        self.raw = huge_empty(nbytes) if big else aligned_empty(nbytes, torch.uint8, alignment)
        self.nbytes = nbytes
        self.registered = None
        if device is not None:
            # Page-locked in place at its exact size, through the device seam, which raises when the
            # system refuses (a pageable buffer would fail later, at an unrelated copy).
            device.register_host(self.raw)
            self.registered = device

    def free(self) -> None:
        if self.registered is not None:
            self.registered.unregister_host(self.raw)
            self.registered = None
        self.raw = None  # type: ignore[assignment]


class PinnedBuffer:
    """A buffer on loan from a :class:`PinnedPool`. Use as a context manager, or call :meth:`release`.

    ``tensor`` is a 4 KiB-aligned 1-D CPU tensor of the requested dtype and element count. Using it
    after release is a bug (the memory goes back to the pool and may be handed to someone else).
    """

    __slots__ = ("tensor", "nbytes", "_block", "_pool")

    def __init__(self, pool: "PinnedPool", block: _Block, tensor: torch.Tensor):
        self._pool, self._block, self.tensor, self.nbytes = pool, block, tensor, block.nbytes

    @property
    def pinned(self) -> bool:
        return bool(self._block is not None and self._block.registered is not None)

    def release(self) -> None:
        """Return the memory to the pool (idempotent)."""
        if self._block is not None:
            block, self._block, self.tensor = self._block, None, None  # type: ignore[assignment]
            if self._pool._device is not None:
                self._pool._device.poison_released(block.raw)  # the fake device: a late reader sees poison
            self._pool._release(block)

    def __enter__(self) -> "PinnedBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class PinnedPool:
    """Bounded pool of aligned, page-locked CPU buffers.

    ``capacity_bytes`` is the pool's share of the user's CPU memory budget: the total of all memory the
    pool holds (lent and cached) never exceeds it. :meth:`acquire` waits when the pool is temporarily
    full and raises :class:`PoolBudgetError` when the request could never fit. Thread-safe.
    """

    def __init__(self, capacity_bytes: int, alignment: int = 4096, device=None):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity = int(capacity_bytes)
        self.alignment = alignment
        self._device = device  # the device seam that page-locks the buffers; None: pageable
        self._cv = threading.Condition()
        self._free: dict[int, list[_Block]] = defaultdict(list)  # cached blocks by byte size
        self._held = 0      # bytes allocated (lent + cached)
        self.in_use = 0     # bytes lent out
        self.peak = 0       # highest in_use seen
        self._closed = False

    def acquire(self, nbytes: int, dtype: torch.dtype = torch.uint8, timeout: float | None = None,
                exact: bool = False) -> PinnedBuffer:
        """Lend a buffer holding at least ``nbytes`` bytes, viewed as ``nbytes // itemsize`` elements of ``dtype``.

        Waits up to ``timeout`` seconds (forever when None) for other buffers to be released; raises
        ``TimeoutError`` when it runs out, :class:`PoolBudgetError` when ``nbytes`` exceeds the capacity.
        ``exact``: a block of the rounded size itself, never a larger cached one (which counts at its own size:
        a caller whose buffers the budget counts at their sizes, ``fuyou.engine.budget.weight_buffer_need``).
        """
        itemsize = torch.empty((), dtype=dtype).element_size()
        if nbytes < 0 or nbytes % itemsize:
            raise ValueError(f"nbytes={nbytes} is not a non-negative multiple of {dtype}'s size {itemsize}")
        size = round_up(max(nbytes, 1), self.alignment)
        if size > self.capacity:
            raise PoolBudgetError(size, self.capacity)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                if self._closed:
                    raise RuntimeError("the pinned pool is closed")
                block = self._take(size, exact)
                if block is not None:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(
                        f"no {size} bytes free in the pinned pool within {timeout} s "
                        f"({self.in_use} of {self.capacity} bytes lent); release buffers or raise the budget")
                self._cv.wait(left)
            self.in_use += block.nbytes
            self.peak = max(self.peak, self.in_use)
        return PinnedBuffer(self, block, block.raw[:nbytes].view(dtype))

    def _take(self, size: int, exact: bool = False) -> _Block | None:
        """Reuse a cached block of this size, or allocate one after evicting cache; None if it can't fit now."""
        cached = self._free.get(size)
        if cached:
            return cached.pop()
        # A cached block up to twice the size serves too: no unregister/register churn when sizes vary
        # (stages of different sizes share the weight pool). It counts at its own size.
        bigger = [] if exact else [sz for sz, blocks in self._free.items() if blocks and size < sz <= 2 * size]
        if bigger:
            return self._free[min(bigger)].pop()
        if self._held + size > self.capacity:
            for sz in list(self._free):
                while self._free[sz] and self._held + size > self.capacity:
                    self._free[sz].pop().free()
                    self._held -= sz
            if self._held + size > self.capacity:
                return None
        self._held += size  # allocated under the lock: simple, and pools are filled once and reused
        try:
            return _Block(size, self.alignment, self._device)
        except BaseException:
            self._held -= size
            raise

    def _release(self, block: _Block) -> None:
        with self._cv:
            self.in_use -= block.nbytes
            if self._closed:
                block.free()
                self._held -= block.nbytes
            else:
                self._free[block.nbytes].append(block)
            self._cv.notify_all()

    @property
    def held(self) -> int:
        """Bytes allocated by the pool (lent plus cached for reuse); never above ``capacity``."""
        return self._held

    def trim(self) -> None:
        """Free every cached (not lent) buffer."""
        with self._cv:
            for sz, blocks in self._free.items():
                for b in blocks:
                    b.free()
                    self._held -= sz
            self._free.clear()
            self._cv.notify_all()

    def close(self) -> None:
        """Free cached buffers; buffers still lent are freed when released."""
        self.trim()
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __enter__(self) -> "PinnedPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
