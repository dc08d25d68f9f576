"""The engine's deadlines (fuyou.watchdog): a wait fails only when nothing makes progress."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import pytest

from fuyou import watchdog
from fuyou.store import PinnedPool


@pytest.fixture(autouse=True)
def short_timeout():
    watchdog.set_timeout(0.4)
    yield
    watchdog.set_timeout(600.0)


def _later(seconds, fn):
    t = threading.Timer(seconds, fn)
    t.start()
    return t


def test_a_stuck_wait_is_a_stall_error_naming_what_it_waited_for():
    fut = Future()
    t0 = time.monotonic()
    with pytest.raises(watchdog.StallError, match="the weights of block.3"):
        watchdog.result(fut, "the weights of block.3")
    assert 0.4 <= time.monotonic() - t0 < 5


def test_progress_elsewhere_keeps_a_long_wait_alive():
    fut = Future()
    stop = threading.Event()

    def beating():
        while not stop.is_set():
            watchdog.beat()
            time.sleep(0.05)

    threading.Thread(target=beating, daemon=True).start()
    _later(1.5, lambda: fut.set_result(7))
    try:
        assert watchdog.result(fut, "a slow but moving transfer") == 7
    finally:
        stop.set()


def test_a_large_transfer_gets_time_by_its_size():
    fut = Future()
    _later(1.0, lambda: fut.set_result(1))
    assert watchdog.result(fut, "a big read", nbytes=int(2 * watchdog.MIN_RATE)) == 1  # floor 2 s > 1 s


def test_event_pool_queue_and_condition_waits():
    ev = threading.Event()
    with pytest.raises(watchdog.StallError):
        watchdog.wait_event(ev, "an update")
    _later(0.1, ev.set)
    watchdog.wait_event(ev, "an update")
    pool = PinnedPool(8192)
    held = pool.acquire(8192)
    with pytest.raises(watchdog.StallError, match="8192 of 8192 pool bytes lent"):
        watchdog.acquire(pool, 4096, None or __import__("torch").uint8, "a gradient buffer")
    _later(0.1, held.release)
    watchdog.acquire(pool, 4096, __import__("torch").uint8, "a gradient buffer").release()
    q = queue.Queue(maxsize=1)
    q.put(1)
    with pytest.raises(watchdog.StallError, match="room in the queue"):
        watchdog.put(q, 2, "room in the queue")
    cond, flag = threading.Condition(), []
    with cond:
        with pytest.raises(watchdog.StallError):
            watchdog.wait_for(cond, lambda: flag, "the worker")


def test_an_error_of_the_awaited_work_is_not_renamed():
    fut = Future()
    fut.set_exception(TimeoutError("the disk's own timeout"))
    with pytest.raises(TimeoutError, match="the disk's own"):
        watchdog.result(fut, "x")
