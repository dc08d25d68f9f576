"""A thread pool whose threads never keep the process alive.

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter exits. A loader thread
stuck in a driver call (a CUDA event that never completes, a read the kernel never returns) would then
hold a failed run's exit forever, after its error was printed, where the engine's deadlines
(``fuyou.watchdog``) had already turned the stall into a typed error. These threads are daemons: a run
that stops abandons them (the engine's ``close(wait=False)`` leaves their memory be), and the process
ends.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future


class DaemonExecutor:
    """``submit``/``shutdown`` as ``ThreadPoolExecutor`` has them, on daemon threads started up front."""

    def __init__(self, workers: int, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, workers))]
        self._closed = False
        self._lock = threading.Lock()
        self._running = 0
        for t in self._threads:
            t.start()

    def submit(self, fn, *args) -> Future:
        if self._closed:
            raise RuntimeError("submit after shutdown")
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args = job
            with self._lock:
                if not fut.set_running_or_notify_cancel():  # cancelled while queued
                    continue
                self._running += 1
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                fut.set_exception(e)
            finally:
                with self._lock:
                    self._running -= 1

    def idle(self) -> bool:
        """No job is running (a queued one may still be cancelled: ``shutdown(cancel_futures=True)``)."""
        with self._lock:
            return self._running == 0

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop the threads once the queued jobs are done; ``cancel_futures`` cancels those not started;
        ``wait`` joins the threads (without it a stuck one is left behind, a daemon)."""
        if self._closed:
            return
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for t in self._threads:
                t.join()
