"""Never wait forever: every blocking wait of the engine has a deadline.

The engine's threads wait on each other: the main thread for weight loads, pool buffers, the optimizer
worker's queue and its last job, SSD requests and activations fetched back; the loader threads for a
stage's update. A bug, a dead disk or a stuck driver would turn any of them into a silent hang (one
did: exact clipping once held a gradient buffer per stage until after backward, and every model of
more than four stages waited forever for a fifth). Each wait therefore goes through one of the
helpers below, with a deadline of ``offload.stall_timeout`` seconds (generous: minutes), or more for
a large transfer (at least ``bytes / 20 MB/s``, so a slow disk is not mistaken for a stuck one). Past
it the waiting thread raises :class:`StallError`, which names what it waited for; the run stops, and
the last commit on the SSD is intact because nothing is committed after a failed step.
"""

from __future__ import annotations

import queue
import threading

from fuyou.errors import FuyouError

MIN_RATE = 20e6  # bytes per second below which a transfer counts as stalled
_timeout = 600.0


class StallError(FuyouError):
    """A wait of the engine passed its deadline (module docstring)."""

    def __init__(self, what: str, seconds: float):
        super().__init__(
            f"the engine waited {seconds:.0f} s for {what} and stopped (nothing after the last commit was "
            f"committed; continue with `fuyou train --resume RUN_DIR`). If the disk or machine is only slow, "
            f"raise offload.stall_timeout; otherwise look at the disk (dmesg) and at other processes using it")
        self.what = what


def set_timeout(seconds: float) -> None:
    """The deadline of every wait from now on (the engine sets ``offload.stall_timeout``)."""
    global _timeout
    _timeout = float(seconds)


def limit(nbytes: int = 0) -> float:
    """Seconds a wait may last: the stall timeout, or more for a transfer of ``nbytes``."""
    return max(_timeout, nbytes / MIN_RATE)


def result(fut, what: str, nbytes: int = 0):
    """``fut.result()`` with the deadline (a store ``IOFuture`` or a ``concurrent.futures.Future``)."""
    seconds = limit(nbytes or getattr(fut, "nbytes", 0))
    try:
        return fut.result(seconds)
    except TimeoutError:  # concurrent.futures.TimeoutError is the builtin since Python 3.11
        if _done(fut):
            raise  # the awaited work itself raised a timeout: not ours to rename
        raise StallError(what, seconds) from None


def _done(fut) -> bool:
    try:
        return bool(fut.done())
    except Exception:  # noqa: BLE001
        return False


def wait_event(event: threading.Event, what: str) -> None:
    if not event.wait(limit()):
        raise StallError(what, limit())


def acquire(pool, nbytes: int, dtype, what: str):
    """A buffer from a ``PinnedPool`` with the deadline."""
    seconds = limit(nbytes)
    try:
        return pool.acquire(nbytes, dtype, timeout=seconds)
    except TimeoutError:
        raise StallError(f"{what} ({pool.in_use} of {pool.capacity} pool bytes lent)", seconds) from None


def put(q: queue.Queue, item, what: str) -> None:
    try:
        q.put(item, timeout=limit())
    except queue.Full:
        raise StallError(what, limit()) from None
