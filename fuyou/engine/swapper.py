"""The activation swapper: moves kept activations between the compute device, CPU memory and the SSD
(DESIGN.md idea 2). What is kept, and how backward uses it, is ``recompute.py``'s business.

Tiers: ``gpu`` (stays on the compute device), ``cpu`` (page-locked pool memory, up to ``cpu_bytes``
of the budget, then overflow to SSD), ``ssd`` (through the store).

The SSD path is a bounded pipeline: a tensor leaves the device chunk by chunk into a fixed set of
staging buffers (``staging``, page-locked on CUDA) and each chunk goes on to the store as an
asynchronous write; a chunk buffer returns to the pool when its write completes. So CPU memory never
holds more than the staging buffers, however large the activations. In backward, ``prefetch``
starts bringing a block's tensors back (in reverse block order, ``prefetch_blocks`` ahead) on a
reader thread, chunk by chunk through the same staging pool. Every chunk read from SSD is checked
against its CRC32 (the store's checksums): a corrupt or truncated activation raises
``StoreCorruptError`` naming the key and file and is never trained on.

Note: [Activation stream hand-off] On an asynchronous device (``fuyou.engine.device``) a tensor
leaving the device is copied on ``d2h`` after that stream has waited for compute, with
``record_stream(t, d2h)`` so the allocator keeps its memory until the copy has run; the main thread
does not wait for the copy: the store write of a staging chunk starts from the device's landing
thread once the copy's event has completed (``Device.after``). So the main thread blocks only when
every staging buffer is in use (the pipeline's back-pressure). Coming back, the device buffer is
allocated inside ``h2d``'s context, filled there, and ``get`` makes compute wait on the copy's event
and records compute's use. The reader thread waits for each chunk's copy before it reuses the
staging buffer (a sync point of the reader thread only). The ``cpu`` tier works the same way with a
pinned pool buffer per activation instead of the SSD.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fuyou import watchdog
from fuyou.engine.trace import Tracer
from fuyou.engine.budget import LEAVING
from fuyou.engine.device import InFlight
from fuyou.engine.threads import DaemonExecutor
from fuyou.store.errors import PoolBudgetError


@dataclass
class Slot:
    """One kept activation: where it went and how to get it back."""

    key: str
    tier: str                       # tier actually used (cpu may have overflowed to ssd)
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensor: Tensor | None = None    # gpu tier: the device tensor; cpu tier on a host device: the tensor
    buffer: object | None = None    # cpu tier on an asynchronous device: the pinned pool buffer
    writes: list = field(default_factory=list)   # ssd: futures of the chunk writes
    fetch: Future | None = None     # a started read-back (ssd) or (tensor, event) of an H2D copy (cpu)
    nbytes: int = 0
    perm: tuple[int, ...] | None = None  # copied in this dimension order (``_dense``); ``shape`` is that order's


class ActivationSwapper:
    """Puts activations into tiers and brings them back (module docstring)."""

    def __init__(self, store, dev, cpu_pool, staging_pool, chunk_bytes: int, tracer: Tracer, counters_ref):
        self.store, self.dev, self.cpu_pool, self.pool = store, dev, cpu_pool, staging_pool
        self.cpu_bytes = cpu_pool.capacity if cpu_pool is not None else 0
        align = store.checksum_block
        self.chunk_bytes = -(-chunk_bytes // align) * align  # whole checksum blocks, as the budget counts them
        self.tracer, self._counters = tracer, counters_ref
        self.cpu_used = 0
        self._lock = threading.Lock()
        self._reader = DaemonExecutor(1, "fuyou-act-read")  # (threads.py: never holds a failed run's exit)
        self._leaving = InFlight()
        self._cpu_releasing = 0  # cpu-tier buffers waiting for their last copy before going back to the pool
        self.d2h = dev.new_stream("act-d2h")  # a host device's streams are its one synchronous stream
        self.h2d = dev.new_stream("act-h2d")

    # -- out -------------------------------------------------------------------------------------
    def put(self, key: str, t: Tensor, tier: str) -> Slot:
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        # The size is part of the store key: a run resumed with another batch or sequence length finds
        # the earlier run's activation tensors of other sizes in the store and must not reuse them.
        key = f"{key}/{str(t.dtype).removeprefix('torch.')}x{t.numel()}"
        slot = Slot(key, tier, tuple(t.shape), t.dtype, nbytes=nbytes)
        c = self._counters()
        if tier == "gpu":
            slot.tensor = self.dev.track(t, "checkpoints" if key.split("/")[2] == "checkpoint"
                                         else "kept activations (policy, gpu tier)")
            c.add(act_gpu_bytes=nbytes)
            return slot
        dense, slot.perm = _dense(t)  # a copy keeps the tensor's layout (autograd's kernels depend on it)
        slot.shape = tuple(dense.shape)
        if tier == "cpu" and self._put_cpu(slot, t, dense):
            c.add(act_cpu_bytes=nbytes)
            return slot
        if tier == "cpu":  # (the plan labelled it cpu and train said nothing: a pass)
            c.add(act_overflow_bytes=slot.nbytes)
        slot.tier = "ssd"
        self._write_ssd(slot, dense)
        return slot

    def _put_cpu(self, slot: Slot, t: Tensor, dense: Tensor) -> bool:
        """Keep ``t`` in the CPU tier if its share has room (else the caller overflows it to SSD)."""
        if self.dev.is_host:
            with self._lock:
                if self.cpu_used + slot.nbytes > self.cpu_bytes:
                    return False
                self.cpu_used += slot.nbytes
            slot.tensor = t
            return True
        if self.cpu_pool is None:  # no CPU tier (offload.act_cpu_mem=0): everything overflows (it was a traceback)
            return False
        try:
            try:
                buf = self.cpu_pool.acquire(slot.nbytes, t.dtype, timeout=0)
            except TimeoutError:
                if not self._cpu_releasing:
                    raise
                # Buffers of the last backward are on their way back (the landing thread releases them
                # once their copies have run): wait for them briefly rather than spill to SSD.
                buf = self.cpu_pool.acquire(slot.nbytes, t.dtype, timeout=0.2)
        except (TimeoutError, PoolBudgetError):  # the share is full, or smaller than this tensor: overflow
            return False
        flat = dense.contiguous().view(-1)
        self.d2h.wait_stream(self.dev.compute)
        self.dev.record_stream(flat, self.d2h)
        self.dev.to_host(buf.tensor, flat, self.d2h)
        slot.buffer = buf
        slot.fetch = None
        ev = self.dev.event().record(self.d2h)
        slot.writes = [ev]  # the copy's event: read back only after it
        self._leave(ev, flat)
        return True

    def _leave(self, ev, t: Tensor) -> None:
        """Bound the device memory that outgoing copies keep alive after compute is done with it: at
        most ``LEAVING`` tensors with copies not known to have run (the plan's item "activations
        leaving the device"); beyond that the main thread waits for the oldest (a bounded sync point)."""
        self._leaving.add(ev, t)
        self._leaving.bound(LEAVING)

    def _write_ssd(self, slot: Slot, t: Tensor) -> None:
        flat = t.contiguous().view(-1)
        if slot.key not in self.store:
            self.store.allocate(slot.key, (flat.numel(),), flat.dtype)
        per = self.chunk_bytes // flat.element_size()
        t0 = time.perf_counter()
        if not self.dev.is_host:
            self.d2h.wait_stream(self.dev.compute)
            self.dev.record_stream(flat, self.d2h)
            timed = self.tracer.enabled  # timing events only for a traced step
            start = self.dev.event(timing=True).record(self.d2h) if timed else None
        for a in range(0, flat.numel(), per):
            n = min(per, flat.numel() - a)
            buf = watchdog.acquire(self.pool, n * flat.element_size(), flat.dtype,
                                   f"a staging buffer for activation {slot.key}")  # waits: bounded staging
            if self.dev.is_host:
                buf.tensor.copy_(flat[a:a + n])
                fut = self.store.write_from(slot.key, buf.tensor, start=a)
                fut.add_done_callback(lambda _f, b=buf: b.release())
            else:
                self.dev.to_host(buf.tensor, flat[a:a + n], self.d2h)
                fut = Future()
                self.dev.after(self.dev.event().record(self.d2h), _writer(self.store, slot.key, buf, a, fut))
            slot.writes.append(fut)
        c = self._counters()
        c.add(act_ssd_write_bytes=slot.nbytes, ssd_write_bytes=slot.nbytes)
        if self.dev.is_host:
            self.tracer.add(f"swap out {slot.key}", "d2h", t0, time.perf_counter(), bytes=slot.nbytes)
        else:
            end = self.dev.event(timing=timed).record(self.d2h)
            self._leave(end, flat)
            if timed:  # the copies' own time on the device, not the time to launch them
                self.tracer.add_gpu(f"swap out {slot.key}", "d2h", start, end, bytes=slot.nbytes)

    # -- back ------------------------------------------------------------------------------------
    def prefetch(self, slot: Slot) -> None:
        """Start bringing a slot back to the device (no-op for the gpu tier or when started)."""
        if slot.fetch is not None:
            return
        if slot.tier == "ssd":
            slot.fetch = self._reader.submit(self._read_ssd, slot)
        elif slot.tier == "cpu" and slot.buffer is not None:
            self.h2d.wait_event(slot.writes[0])  # the D2H copy into the buffer has landed first
            with self.dev.on(self.h2d):
                out = self.dev.empty(slot.nbytes // slot.buffer.tensor.element_size(), slot.dtype,
                                     "activations fetched ahead")
                self.dev.to_device(out, slot.buffer.tensor, self.h2d)
                ev = self.dev.event().record(self.h2d)
            slot.fetch = _done((out.view(slot.shape), ev))

    def get(self, slot: Slot) -> Tensor:
        """The kept tensor on the compute device; waits for its read-back if it was on SSD."""
        if slot.tier == "gpu" or (slot.tier == "cpu" and slot.buffer is None):
            return slot.tensor
        self.prefetch(slot)
        t0 = time.perf_counter()
        out, ev = watchdog.result(slot.fetch, f"the activation {slot.key} read back", slot.nbytes)
        waited = time.perf_counter() - t0
        self._counters().add(wait_activations_s=waited)
        if waited > 1e-4:
            self.tracer.add(f"wait activation {slot.key}", "wait", t0, t0 + waited)
        if ev is not None:
            self.dev.compute.wait_event(ev)
            self.dev.record_stream(out, self.dev.compute)
        return out if slot.perm is None else out.permute(_inverse(slot.perm))

    def _read_ssd(self, slot: Slot):
        for f in slot.writes:  # a read must not overtake its own writes
            watchdog.result(f, f"the write of activation {slot.key}")
        numel = slot.nbytes // torch.empty((), dtype=slot.dtype).element_size()
        # Allocated inside the H2D stream's context: memory the allocator hands out on the compute
        # stream may still be read by compute kernels that have not run yet (Note: [Activation stream
        # hand-off]; the fake device's rule 2).
        with self.dev.on(self.h2d):
            out = self.dev.empty(numel, slot.dtype, "activations fetched ahead")
        per = self.chunk_bytes // out.element_size()
        t0 = time.perf_counter()
        ev = None
        for a in range(0, numel, per):
            n = min(per, numel - a)
            with watchdog.acquire(self.pool, n * out.element_size(), slot.dtype, f"a buffer to read {slot.key}") as buf:
                watchdog.result(self.store.read_into(slot.key, buf.tensor, start=a),  # CRC32 checked here
                                f"the read of activation {slot.key}")
                if self.dev.is_host:
                    out[a:a + n].copy_(buf.tensor)
                else:
                    self.dev.to_device(out[a:a + n], buf.tensor, self.h2d)
                    ev = self.dev.event().record(self.h2d)
                    ev.synchronize()  # the staging buffer is reused after this (reader thread only)
        c = self._counters()
        c.add(act_ssd_read_bytes=slot.nbytes, ssd_read_bytes=slot.nbytes)
        self.tracer.add(f"swap in {slot.key}", "ssd-read", t0, time.perf_counter(), bytes=slot.nbytes)
        return out.view(slot.shape), ev

    def free(self, slot: Slot) -> None:
        """The activation is no longer needed (its block's backward is done)."""
        if slot.tier == "cpu":
            if slot.buffer is not None:
                buf, slot.buffer = slot.buffer, None
                ev = slot.writes[0] if slot.fetch is None else slot.fetch.result()[1]
                with self._lock:
                    self._cpu_releasing += 1

                def release(buf=buf):
                    buf.release()
                    with self._lock:
                        self._cpu_releasing -= 1

                self.dev.after(ev, release)  # the last copy from the buffer must have run
            else:
                with self._lock:
                    self.cpu_used -= slot.nbytes
        slot.tensor = None
        slot.fetch = None
        slot.writes = []

    def close(self, wait: bool = True) -> None:
        """Stop the reader; ``wait=False`` (a failed step) cancels queued reads and leaves a stuck one behind
        (``idle`` says when none runs: its buffers may be freed then)."""
        self._reader.shutdown(wait=wait, cancel_futures=not wait)
        self._leaving.clear()

    def idle(self) -> bool:
        return self._reader.idle()


def _writer(store, key: str, buf, start: int, fut: Future):
    """What runs once a staging chunk's D2H copy has landed: its store write, then the buffer's release."""

    def landed():
        try:
            w = store.write_from(key, buf.tensor, start=start)
        except BaseException as e:  # noqa: BLE001 - handed to the reader via the future
            buf.release()
            fut.set_exception(e)
            return

        def done(f):
            buf.release()
            exc = f.exception()
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(None)

        w.add_done_callback(done)

    return landed


def _done(value) -> Future:
    f = Future()
    f.set_result(value)
    return f


def _dense(t: Tensor) -> tuple[Tensor, tuple[int, ...] | None]:
    """``t`` as a contiguous tensor to copy, and the dimension order it was permuted into (None: as it
    is). A tensor that is dense but not contiguous (a transpose autograd saved) is copied in its memory
    order and permuted back when it returns, so it comes back with its strides: the backward's matmuls
    then run the same kernels on the same layouts as without the copy (a contiguous copy changes them,
    and with them the rounding: found on LoRA's kept blocks, 1e-8 off the reference). Other layouts
    come back contiguous."""
    if t.is_contiguous() or t.dim() < 2:
        return t, None
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d])))
    p = t.permute(order)
    return (p, order) if p.is_contiguous() else (t, None)


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(order)
    for i, d in enumerate(order):
        inv[d] = i
    return tuple(inv)
