"""Never wait forever: every blocking wait of the engine has a deadline.

The engine's threads wait on each other: the main thread for weight loads, pool buffers, the optimizer
worker's queue and its last job, SSD requests and activations fetched back; the loader threads for a
stage's update. A bug, a dead disk or a stuck driver would turn any of them into a silent hang (one
did: exact clipping once held a gradient buffer per stage until after backward, and every model of
more than four stages waited forever for a fifth). Each wait therefore goes through one of the
helpers below.

A wait fails with :class:`StallError`, naming what it waited for, when **nothing has made progress**
for ``offload.stall_timeout`` seconds (generous: minutes) and the wait has lasted at least that long,
or longer for a large transfer (``bytes / 20 MB/s``). Progress is a heartbeat (:func:`beat`) that the
waits themselves give when they end, and the optimizer gives after each chunk: so a slow disk, or a
wait queued behind a long commit that is moving, is never mistaken for a stuck one, while a thread
that is truly stuck stops every beat. The run then stops; the last commit on the SSD is intact
because nothing is committed after a failed step.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time

from fuyou.errors import FuyouError
from fuyou.distributed import resume_command

MIN_RATE = 20e6  # bytes per second below which a single transfer counts as stalled
POLL_S = 0.5     # how often a wait looks at the heartbeat
_timeout = 600.0
_last_beat = time.monotonic()


class StallError(FuyouError):
    """A wait of the engine passed its deadline with nothing making progress (module docstring)."""

    def __init__(self, what: str, seconds: float):
        super().__init__(
            f"the engine waited {seconds:.0f} s for {what}, with no progress anywhere, and stopped (nothing after "
            f"the last commit was committed; continue with `{resume_command()}`). If the disk or machine "
            f"is only slow, raise offload.stall_timeout; otherwise look at the disk (dmesg) and at other processes")
        self.what = what


def set_timeout(seconds: float) -> None:
    """The stall timeout of every wait from now on (the engine sets ``offload.stall_timeout``)."""
    global _timeout
    _timeout = float(seconds)


def beat() -> None:
    """Something made progress (a request, a chunk, a job finished)."""
    global _last_beat
    _last_beat = time.monotonic()


def limit(nbytes: int = 0) -> float:
    """The least time a wait for a transfer of ``nbytes`` may last before it can be a stall."""
    return max(_timeout, nbytes / MIN_RATE)


def _wait(poll, what: str, nbytes: int = 0):
    """Call ``poll(seconds)`` (returns ``(done, value)``) until done; StallError as the module says."""
    start = time.monotonic()
    floor = limit(nbytes)
    while True:
        done, value = poll(POLL_S)
        if done:
            beat()
            return value
        now = time.monotonic()
        if now - start >= floor and now - max(_last_beat, start) >= _timeout:
            raise StallError(what, now - start)


def result(fut, what: str, nbytes: int = 0):
    """``fut.result()`` with the deadline (a store ``IOFuture`` or a ``concurrent.futures.Future``)."""

    def poll(s):
        if not fut.done():
            try:
                return True, fut.result(s)
            except (TimeoutError, concurrent.futures.TimeoutError):  # one class since Python 3.11, two before
                if not fut.done():
                    return False, None
        return True, fut.result()

    return _wait(poll, what, nbytes or getattr(fut, "nbytes", 0))


def wait_done(fut, what: str, nbytes: int = 0) -> None:
    """Wait, with the deadline, until ``fut`` (a ``concurrent.futures.Future``) is done, whatever its outcome."""
    _wait(lambda s: (bool(concurrent.futures.wait([fut], timeout=s).done), None), what, nbytes)


def wait_event(event: threading.Event, what: str) -> None:
    _wait(lambda s: (event.wait(s), None), what)


def wait_for(cond: threading.Condition, predicate, what: str) -> None:
    """``cond.wait_for(predicate)`` with the deadline; call with ``cond`` held."""
    _wait(lambda s: (cond.wait_for(predicate, s), None), what)


def acquire(pool, nbytes: int, dtype, what: str, exact: bool = False):
    """A buffer from a ``PinnedPool`` with the deadline (``exact``: as ``PinnedPool.acquire``'s)."""

    def poll(s):
        try:
            return True, pool.acquire(nbytes, dtype, timeout=s, exact=exact)
        except TimeoutError:
            return False, None

    return _wait(poll, f"{what} ({pool.in_use} of {pool.capacity} pool bytes lent)", nbytes)


def put(q: queue.Queue, item, what: str) -> None:
    def poll(s):
        try:
            q.put(item, timeout=s)
            return True, None
        except queue.Full:
            return False, None

    _wait(poll, what)
