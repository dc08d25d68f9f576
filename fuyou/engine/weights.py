"""Streaming compute-precision weights to the compute device, ``depth`` stages ahead.

A load of stage ``i`` runs on a loader thread: wait until the stage's weights are *current*
(``StageState.updated``, see ``layout``), then take them from the CPU cache or read them from the
SSD into a pool buffer, then (CUDA) copy them to the GPU on the H2D stream and record an event. The
main thread's ``get`` waits for that load and makes the compute stream wait on the event.

Note: [Stream hand-offs]
    Weights: the device buffer is allocated inside the loader thread's H2D stream's context and the
    copy runs on that stream; ``get`` makes the compute stream wait on the copy's event and records the buffer's
    use by compute (``record_stream``), so compute never reads a half-copied tensor, the allocator
    never hands the buffer back to the H2D stream while compute may still read it, and the host never
    blocks on the GPU. The loader does not wait for its copy: the pool buffer the copy read from goes
    back to the pool from the device's landing thread once the event has completed
    (``Device.after``). The GPU may run behind the host: a load waits (in its loader thread) until
    compute has released the position ``prefetch_depth + 1`` back, so no more stages are on the device
    than the plan counts (the one computing and ``prefetch_depth`` ahead); ``release`` drops the
    position's tensor before it records that event, so nothing the loader threads hold keeps it alive.
    On a host device the loaded tensor is the cache entry or the pool buffer itself; no copy, no events. All of it goes through the device seam (``fuyou.engine.device``).
    A position ``plan`` names in ``keep`` (a streamed stage's backward, whose master is its weights) keeps its
    pool buffer past ``release(take=True)``, which hands it to the stage's update with the copy's event
    (engine.py, Note: [Master in memory]); the pool's capacity counts such buffers (``budget.handoff_slots``).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fuyou import watchdog
from fuyou.engine.layout import StageState, dtype_size
from fuyou.engine.threads import DaemonExecutor
from fuyou.engine.trace import StepCounters, Tracer
from fuyou.errors import FuyouError
from fuyou.faults import stall


@dataclass
class Loaded:
    """A stage's compute weights on the compute device, and what to give back when done with them."""

    flat: Tensor
    ready_at: float            # perf_counter when the stage became current (update finished)
    done_at: float             # perf_counter when the load finished
    buffer: object | None = None   # pool buffer to release (CPU device, weights read from SSD; or kept)
    event: object | None = None    # CUDA event recorded after the H2D copy
    key: str | None = None         # the store key read (None: the weight cache)
    kept: bool = False             # ``buffer`` is kept for the stage's update (``release(take=True)``)


@dataclass
class Handed:
    """A stage's weights as backward read them from the store, handed to its update: a master in the compute
    dtype is the compute weights (engine.py, Note: [Master in memory]). ``release`` frees the pool buffer
    once ``event`` (the copy to the GPU that read it; None on a host device) has completed."""

    tensor: Tensor
    key: str
    release: Callable[[], None]
    event: object | None = None

    def drop(self, dev) -> None:
        """Not used after all (a step that failed): back to the pool once the device is done with it."""
        if self.event is not None:
            dev.after(self.event, self.release)
        else:
            self.release()


class WeightStreamer:
    """Loads stages' weights in a given order with a prefetch window (see the module docstring)."""

    def __init__(self, states: list[StageState], store, pool, dev, dtype: torch.dtype,
                 depth: int, tracer: Tracer, counters_ref):
        self.states, self.store, self.pool, self.dev, self.dtype = states, store, pool, dev, dtype
        self.depth, self.tracer = depth, tracer
        self._counters = counters_ref  # callable returning the current StepCounters
        self._exec = DaemonExecutor(depth, "fuyou-load")  # a load stuck in a driver call never holds the exit
        self._order: list[int] = []
        self._keep: frozenset[int] = frozenset()  # positions whose buffer goes to the stage's update
        self._futures: dict[int, Future] = {}
        self._abandoned: list[Future] = []       # loads a failed step's drain left running (``drain``)
        self._next = 0
        self._step: int | None = None
        self._lock = threading.Lock()
        self._released: dict[int, object] = {}   # compute events recorded as positions were released
        self._local = threading.local()           # each loader thread's own H2D stream
        self._streams: list = []

    # -- the window ------------------------------------------------------------------------------
    def plan(self, order: list[int], step: int | None = None, keep=frozenset()) -> None:
        """The stage indices this step will request, in order (repeats allowed); starts prefetching.
        ``step``: the training step they are for (None: an evaluation), for ``faults.stall``. ``keep``: the
        positions whose weights, when read from the store, ``release(pos, take=True)`` hands over instead
        of freeing (engine.py, Note: [Master in memory])."""
        assert not self._futures, "plan() while loads from the previous plan are outstanding"
        self._order, self._next, self._step, self._keep = order, 0, step, frozenset(keep)
        self._released.clear()
        self._fill(0)

    def get(self, pos: int) -> Loaded:
        """The weights for ``order[pos]``; blocks until loaded. Counts the wait as the optimizer's while
        the stage was still updating, as the loads' otherwise."""
        self._fill(pos)
        fut = self._futures[pos]
        t0 = time.perf_counter()
        name = self.states[self._order[pos]].stage.name
        loaded = watchdog.result(fut, f"the weights of {name}", self.states[self._order[pos]].wnumel * dtype_size(self.dtype))
        t1 = time.perf_counter()
        c: StepCounters = self._counters()
        waited_opt = max(0.0, min(t1, loaded.ready_at) - t0)
        c.add(wait_optimizer_s=waited_opt, wait_weights_s=(t1 - t0) - waited_opt)
        if t1 - t0 > 1e-4:
            self.tracer.add(f"wait weights {self.states[self._order[pos]].stage.name}", "wait", t0, t1)
        if loaded.event is not None:
            compute = self.dev.compute
            compute.wait_event(loaded.event)  # see Note: [Stream hand-offs]
            # allocated on the H2D stream, read on the compute stream: keep the allocator from
            # handing its memory to the H2D stream again before compute is done with it
            self.dev.record_stream(loaded.flat, compute)
        return loaded

    def release(self, pos: int, take: bool = False) -> Handed | None:
        """Done computing with ``order[pos]``: free its buffer and let the window move on. ``take``: a buffer
        kept for the stage's update (``plan``'s ``keep``) is returned instead, for the caller to free."""
        loaded = self._futures.pop(pos).result()
        handed = None
        if loaded.kept:
            handed = Handed(loaded.buffer.tensor, loaded.key, loaded.buffer.release, loaded.event)
            if not take:
                handed.drop(self.dev)
                handed = None
        elif loaded.buffer is not None and loaded.event is None:
            loaded.buffer.release()
        # The future (and the executor's work item, for a moment after the load) still refers to this
        # object: the device memory is let go here, before the gate below lets the next load allocate.
        loaded.flat = loaded.buffer = None
        if not self.dev.is_host:  # where compute is when it is done with this position (the loads' gate)
            self._released[pos] = self.dev.event().record(self.dev.compute)
        self._fill(pos + 1)
        return handed

    def _fill(self, pos: int) -> None:
        with self._lock:
            while self._next < len(self._order) and self._next < pos + self.depth + 1:
                i = self._order[self._next]
                gate = self._released.pop(self._next - self.depth - 1, None)
                self._futures[self._next] = self._exec.submit(self._load, i, gate, self._step, self._next in self._keep)
                self._next += 1

    # -- one load (loader thread) ----------------------------------------------------------------
    def _h2d(self):
        """This loader thread's H2D stream: copies of different stages are not queued out of order on
        one shared stream (compute would wait for a later stage's copy, traces would mix them)."""
        s = getattr(self._local, "stream", None)
        if s is None:
            with self._lock:
                s = self._local.stream = self.dev.new_stream(f"weights-h2d-{len(self._streams)}")
                self._streams.append(s)
        return s

    def _load(self, i: int, gate=None, step: int | None = None, keep: bool = False) -> Loaded:
        st = self.states[i]
        stall("load", step)  # (the step was never given: stall:load@N did not fire)
        watchdog.wait_event(st.updated, f"the optimizer update of {st.stage.name} (its weights are loaded next)")
        ready = time.perf_counter()
        if st.error is not None:
            raise FuyouError(f"the optimizer update of {st.stage.name} failed, its weights are not usable: {st.error}")
        c: StepCounters = self._counters()
        buf = key = None
        if st.cache is not None:
            host = st.cache
            c.add(cache_hits=1)
        else:
            # (kept for the update: a buffer of its own size, as the plan counts those, not a larger one reused)
            buf = watchdog.acquire(self.pool, st.wnumel * dtype_size(self.dtype), self.dtype,
                                   f"a buffer to load {st.stage.name}'s weights", exact=keep)
            t0, key = time.perf_counter(), st.keys.weights
            try:
                watchdog.result(self.store.read_into(key, buf.tensor), f"the read of {st.stage.name}'s weights")
            except BaseException:
                buf.release()
                raise
            host = buf.tensor
            nbytes = st.wnumel * dtype_size(self.dtype)
            c.add(ssd_read_bytes=nbytes)
            self.tracer.add(f"read weights {st.stage.name}", "ssd-read", t0, time.perf_counter(), bytes=nbytes)
        keep = keep and buf is not None
        if self.dev.is_host:
            return Loaded(host, ready, time.perf_counter(), buffer=buf, key=key, kept=keep)
        if gate is not None:
            # The GPU runs behind the host: wait until compute is done with the position depth + 1 back,
            # so the device never holds more stages than the plan counts (prefetch_depth + 1).
            gate.synchronize()
        h2d, timed = self._h2d(), self.tracer.enabled
        with self.dev.on(h2d):  # allocated on the stream that fills it (Note: [Stream hand-offs])
            flat = self.dev.empty(st.wnumel, self.dtype, "stage weights in window")
            start = self.dev.event(timing=True).record(h2d) if timed else None
            self.dev.to_device(flat, host, h2d)
            ev = self.dev.event(timing=timed).record(h2d)
        nbytes = st.wnumel * dtype_size(self.dtype)
        c.add(h2d_bytes=nbytes)
        if buf is not None and not keep:
            self.dev.after(ev, buf.release)  # the host buffer is reused only once the copy has landed
        if timed:
            self.tracer.add_gpu(f"h2d weights {st.stage.name}", "h2d", start, ev, bytes=nbytes)
        return Loaded(flat, ready, time.perf_counter(), event=ev, buffer=buf if keep else None, key=key, kept=keep)

    def idle(self) -> bool:
        """No load is running (after ``close(wait=False)``, before its memory may be freed)."""
        return all(f.done() for f in (*self._futures.values(), *self._abandoned))

    def drain(self, patient: bool = True) -> None:
        """Release every outstanding load (after an error, or at the end), starting no other. Each wait has the
        deadline: a load stuck in a driver call is abandoned (``idle`` stays false: ``close(wait=False)``
        leaves its memory be), where the drain after a failed step waited for it forever (a stall injected in
        a load hung the run after its error). ``patient=False`` (the step failed on a deadline already) waits
        for no load still running."""
        self._next = len(self._order)  # (a release fills the window: nothing more is loaded)
        for pos in sorted(self._futures):
            fut = self._futures[pos]
            if fut.cancel():  # queued, never started
                del self._futures[pos]
                continue
            if not fut.done():
                if not patient:
                    continue
                try:  # (only this wait's own deadline ends the patience, not a load that failed on its own)
                    watchdog.wait_done(fut, f"the weights of {self.states[self._order[pos]].stage.name} (a load "
                                            f"outstanding when the step stopped)")
                except watchdog.StallError:
                    patient = False
                    continue
            try:
                self.release(pos)
            except BaseException:  # noqa: BLE001 - draining after a failure; the first error is already raised
                pass
        self._abandoned += [f for f in self._futures.values() if not f.done()]
        self._futures.clear()
        self._order, self._next = [], 0

    def close(self, wait: bool = True) -> None:
        """Stop the loader threads; ``wait=False`` (after a failure) abandons outstanding loads."""
        if wait:
            self.drain()
        self._exec.shutdown(wait=wait, cancel_futures=not wait)
