"""The pinned pool's budget: waits when temporarily full, fails when a request can never fit."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fuyou.errors import BudgetError
from fuyou.store import PinnedPool, PoolBudgetError, aligned_empty, is_aligned


def test_aligned_empty():
    for n, dt in [(0, torch.float32), (1, torch.bfloat16), (12345, torch.int64)]:
        t = aligned_empty(n, dt)
        assert t.numel() == n and t.dtype == dt and is_aligned(t)


def test_acquire_views_and_accounting():
    with PinnedPool(1 << 20) as pool:
        with pool.acquire(1000 * 4, dtype=torch.float32) as buf:
            assert buf.tensor.shape == (1000,) and buf.tensor.dtype == torch.float32 and is_aligned(buf.tensor)
            assert pool.in_use == 4096        # rounded up to 4 KiB
        assert pool.in_use == 0 and pool.peak == 4096 and pool.held <= pool.capacity


def test_request_beyond_capacity_fails_with_sizes():
    pool = PinnedPool(1 << 20)
    with pytest.raises(PoolBudgetError, match=r"2\.00 MiB.*capacity is 1\.00 MiB") as info:
        pool.acquire(2 << 20)
    assert isinstance(info.value, BudgetError)
    assert (info.value.requested, info.value.capacity) == (2 << 20, 1 << 20)


def test_full_pool_waits_for_release_and_times_out():
    pool = PinnedPool(1 << 20)
    a = pool.acquire(512 << 10)
    b = pool.acquire(512 << 10)
    with pytest.raises(TimeoutError, match="release buffers"):
        pool.acquire(4096, timeout=0.05)
    threading.Timer(0.2, a.release).start()
    t0 = time.monotonic()
    with pool.acquire(256 << 10, timeout=10) as c:   # served once `a` is released, by a's cached block
        assert time.monotonic() - t0 >= 0.15
        assert pool.in_use == (512 + 512) << 10  # a cached block up to twice the size counts at its own size
        assert c.tensor.numel() == 256 << 10
    b.release()
    b.release()  # idempotent
    assert pool.in_use == 0 and pool.held <= pool.capacity and pool.peak == 1 << 20


def test_cached_buffers_are_evicted_to_stay_in_budget():
    pool = PinnedPool(1 << 20)
    for size in (256 << 10, 512 << 10, 1 << 20, 768 << 10):
        with pool.acquire(size):
            assert pool.held <= pool.capacity
    assert pool.held <= pool.capacity


def test_many_threads_never_exceed_capacity():
    pool = PinnedPool(1 << 20)
    seen: list[int] = []

    def worker(i: int) -> None:
        for _ in range(20):
            with pool.acquire((64 << 10) * (1 + i % 4)):
                seen.append(pool.held)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(seen) <= pool.capacity and pool.in_use == 0


def test_large_buffers_are_huge_page_aligned_and_sized_as_asked():
    from fuyou.store.aligned import HUGE_PAGE, huge_empty
    t = huge_empty(5 * HUGE_PAGE // 2 + 123)
    assert t.data_ptr() % HUGE_PAGE == 0 and t.numel() == round_up_4k(5 * HUGE_PAGE // 2 + 123)
    t.fill_(7)
    assert int(t.sum()) == 7 * t.numel()
    with PinnedPool(16 << 20) as pool:
        with pool.acquire(4 << 20, dtype=torch.float32) as big, pool.acquire(8192) as small:
            assert big.tensor.data_ptr() % HUGE_PAGE == 0 and big.tensor.numel() == 1 << 20
            assert small.tensor.data_ptr() % 4096 == 0
            assert pool.held == (4 << 20) + 8192  # what counts against the budget is the rounded size


def round_up_4k(n: int) -> int:
    return -(-n // 4096) * 4096


def test_a_cached_block_up_to_twice_the_size_is_reused_not_reallocated():
    """Stages of different sizes share a pinned pool: reusing a cached block avoids an unregister and
    a register per size change (the registration churn of the GPU audit)."""
    pool = PinnedPool(4 << 20)
    with pool.acquire(1 << 20) as big:
        ptr = big.tensor.data_ptr()
    with pool.acquire(600 << 10) as small:        # within 2x: the same block
        assert small.tensor.data_ptr() == ptr and small.tensor.numel() == 600 << 10
    with pool.acquire(256 << 10) as tiny:         # beyond 2x: a block of its own
        assert tiny.tensor.data_ptr() != ptr
