"""The device seam: every CUDA call the engine makes, behind one small interface.

The engine never calls ``torch.cuda`` itself. It asks a ``Device`` for streams, events, device
memory (charged to an item of the memory plan), asynchronous copies between pinned host memory and
the device, ``record_stream``, host-memory registration, memory queries and GPU timing. Three
implementations (``make_device``, from ``train.device``):

* ``HostDevice`` (``cpu``): compute runs on the CPU in host memory. ``is_host`` tells the engine to
  hand host tensors to compute without copying; events read the host clock.
* ``CudaDevice`` (``cuda``): real streams; events are created blocking-sync, so a host thread that
  waits on one sleeps instead of spinning on the cores the CPU Adam needs; host registration is
  ``cudaHostRegister(..., Portable)`` and a failure raises; the plan's device budget is enforced
  with ``torch.cuda.set_per_process_memory_fraction``.
* ``FakeDevice`` (``fake``): compute on the CPU in "device" tensors that are CPU memory, with CUDA's
  asynchrony modelled and its rules checked, so the CPU suite exercises the engine's CUDA paths.

Note: [Fake device rules] ``FakeDevice`` raises ``DeviceHazard`` (at the call, or at the next seam
call for a hazard found when memory is freed) where CUDA would silently corrupt or stall:

1. *Copies land late.* A copy on a side stream is queued and its destination reads as poison (NaN,
   or 0x5A bytes for integers) until it lands: when an event recorded after it is waited on by the
   host or by another stream, when its stream or the device is synchronised, or when it has been
   queued for ``LAND_AFTER_S`` (the GPU finishes eventually). Work on the compute stream runs at
   once, as the CPU computes eagerly. A host pool buffer released early is poisoned too
   (``poison_released``), so a copy that reads it after release reads poison.
2. *Allocation belongs to a stream.* Device memory comes from ``empty`` on the calling thread's
   current stream. A copy on stream X that touches memory allocated on another stream S needs X to
   have waited for S since the allocation: the caching allocator may hand out memory whose previous
   user's kernels on S have not run yet (the bug of an activation read back outside its stream).
3. *Cross-stream use is recorded.* A side-stream copy that reads or writes memory allocated on
   another stream needs ``record_stream(t, X)`` first; memory allocated on a side stream and read by
   compute (compute waited for a copy into it) needs ``record_stream(t, compute)`` before it is freed.
4. *Pageable copies are synchronous.* A copy to or from host memory that is not registered stalls
   the host on CUDA: the fake lands it at once and counts it in ``sync_copies``.
5. *The ledger.* Device memory allocated by ``empty`` or claimed by ``track`` is charged to a named
   item of the memory plan while it lives; an item missing from the plan, or live bytes above its
   planned bytes, raise ``DeviceBudgetError`` at that allocation.
6. *Events time simulated work.* A side-stream copy takes ``bytes / FAKE_COPY_BW`` on its stream's
   clock; compute-stream events read the host clock.

What the fake does not model: kernels on the compute stream running behind the host (so a compute
kernel reading memory freed on the host is not caught), and ``record_stream`` on memory that a
queued copy still holds (the fake holds its operands until they land).
"""

from __future__ import annotations

import math
import queue
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from fuyou.errors import BudgetError, ConfigError, FuyouError
from fuyou.units import format_size


def _within(ranges: dict[int, int], t: Tensor) -> bool:
    """Whether all of ``t``'s bytes lie in one registered host range (start -> end). Not
    ``Tensor.is_pinned()``: that looks at the start of the tensor's *storage*, which for the pools'
    aligned views lies before the registered range, so it would call every such copy pageable."""
    a = t.data_ptr()
    n = t.numel() * t.element_size()
    return any(start <= a and a + n <= end for start, end in ranges.items())


class DeviceHazard(FuyouError):
    """The fake device found a use of streams or memory that would be a race or stall on CUDA."""


class DeviceBudgetError(BudgetError):
    """Device memory beyond what the memory plan allows for one of its items."""


class HostRegisterError(FuyouError):
    """``cudaHostRegister`` refused a buffer (too much locked memory, or a bad address)."""


LAND_AFTER_S = 0.5
FAKE_COPY_BW = 20e9


# ------------------------------------------------------------------------------------------------
# The interface, implemented for the host (nothing is asynchronous)
# ------------------------------------------------------------------------------------------------
class HostStream:
    name = "compute"

    def wait_event(self, ev) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass


class HostEvent:
    """An event on a synchronous device: its time is the host clock when recorded."""

    def __init__(self):
        self.t = None

    def record(self, stream=None) -> "HostEvent":
        self.t = time.perf_counter()
        return self

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_s(self, end: "HostEvent") -> float:
        return end.t - self.t


class HostDevice:
    """Compute on the CPU in host memory: copies are never needed (``is_host``)."""

    kind = "cpu"
    is_host = True

    def __init__(self):
        self.torch = torch.device("cpu")
        self.compute = HostStream()
        self.sync_copies = 0

    def new_stream(self, name: str):
        return self.compute

    @contextmanager
    def on(self, stream):
        yield

    def event(self, timing: bool = False):
        return HostEvent()

    def empty(self, numel: int, dtype: torch.dtype, item: str) -> Tensor:
        return torch.empty(numel, dtype=dtype)

    def track(self, t: Tensor, item: str) -> Tensor:
        return t

    def to_device(self, dst: Tensor, src: Tensor, stream=None) -> None:
        dst.copy_(src)

    def to_host(self, dst: Tensor, src: Tensor, stream=None) -> None:
        dst.copy_(src)

    def record_stream(self, t: Tensor, stream) -> None:
        pass

    def after(self, ev, fn) -> None:
        fn()

    def register_host(self, t: Tensor) -> bool:
        return False

    def unregister_host(self, t: Tensor) -> None:
        pass

    def poison_released(self, t: Tensor) -> None:
        pass

    def set_plan(self, items: dict[str, int] | None, budget: int | None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def check(self) -> None:
        pass

    def memory(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------
class CudaStream:
    def __init__(self, raw, name: str):
        self.raw, self.name = raw, name

    def wait_event(self, ev) -> None:
        self.raw.wait_event(ev.raw)

    def wait_stream(self, other) -> None:
        self.raw.wait_stream(other.raw)

    def synchronize(self) -> None:
        self.raw.synchronize()


class CudaEvent:
    def __init__(self, timing: bool):
        # blocking=True: a host thread in synchronize() sleeps instead of spinning (audit item 4)
        self.raw = torch.cuda.Event(enable_timing=timing, blocking=True)

    def record(self, stream=None) -> "CudaEvent":
        self.raw.record(stream.raw if stream is not None else None)
        return self

    def synchronize(self) -> None:
        self.raw.synchronize()

    def query(self) -> bool:
        return self.raw.query()

    def elapsed_s(self, end: "CudaEvent") -> float:
        return self.raw.elapsed_time(end.raw) / 1000.0


class _Lander:
    """A thread that waits for events in order and runs what was waiting for them (``after``): the
    host buffers of finished copies go back to their pools off the main thread."""

    def __init__(self, name: str, device=None):
        self._q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._device = device
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, ev, fn) -> None:
        self._q.put((ev, fn))

    def _run(self) -> None:
        if self._device is not None:
            torch.cuda.set_device(self._device)  # no stray context on device 0
        while True:
            item = self._q.get()
            if item is None:
                return
            ev, fn = item
            try:
                ev.synchronize()
            except BaseException as e:  # noqa: BLE001 - reported at the next check()
                self.error = self.error or e
            try:
                fn()  # even after a failed wait: a buffer that never returns stalls its pool's users
            except BaseException as e:  # noqa: BLE001
                self.error = self.error or e

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)


class CudaDevice:
    kind = "cuda"
    is_host = False

    def __init__(self, index: int | None = None):
        self.torch = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        torch.cuda.set_device(self.torch)
        self.compute = CudaStream(torch.cuda.current_stream(self.torch), "compute")
        self.sync_copies = 0
        self._lander = _Lander("fuyou-cuda-land", self.torch)
        self._cart = torch.cuda.cudart()
        self._pinned: dict[int, int] = {}   # host ranges this device registered: start -> end
        self._pin_lock = threading.Lock()

    def new_stream(self, name: str) -> CudaStream:
        return CudaStream(torch.cuda.Stream(self.torch), name)

    @contextmanager
    def on(self, stream: CudaStream):
        with torch.cuda.stream(stream.raw):
            yield

    def event(self, timing: bool = False) -> CudaEvent:
        return CudaEvent(timing)

    def empty(self, numel: int, dtype: torch.dtype, item: str) -> Tensor:
        return torch.empty(numel, dtype=dtype, device=self.torch)

    def track(self, t: Tensor, item: str) -> Tensor:
        return t

    def to_device(self, dst: Tensor, src: Tensor, stream=None) -> None:
        if not _within(self._pinned, src):
            self.sync_copies += 1
        with self._maybe_on(stream):
            dst.copy_(src, non_blocking=True)

    def to_host(self, dst: Tensor, src: Tensor, stream=None) -> None:
        if not _within(self._pinned, dst):
            self.sync_copies += 1
        with self._maybe_on(stream):
            dst.copy_(src, non_blocking=True)

    def _maybe_on(self, stream):
        return torch.cuda.stream(stream.raw) if stream is not None else nullcontext()

    def record_stream(self, t: Tensor, stream: CudaStream) -> None:
        t.record_stream(stream.raw)

    def after(self, ev: CudaEvent, fn) -> None:
        self._lander.put(ev, fn)

    def register_host(self, t: Tensor) -> bool:
        """Page-lock ``t`` in place (portable: every context may use it); raises on failure, where
        ignoring it would leave the buffer pageable and fail later at an unrelated copy."""
        nbytes = t.numel() * t.element_size()
        err = int(self._cart.cudaHostRegister(t.data_ptr(), nbytes, 1))  # cudaHostRegisterPortable
        if err != 0:
            _clear_last_error(self._cart)  # else the next kernel launch check reports it, far from here
            raise HostRegisterError(
                f"cudaHostRegister of {format_size(nbytes)} failed (CUDA error {err}): the system refused to "
                f"page-lock more memory; lower offload.cpu_mem or raise the locked-memory limit (ulimit -l)")
        with self._pin_lock:
            self._pinned[t.data_ptr()] = t.data_ptr() + nbytes
        return True

    def unregister_host(self, t: Tensor) -> None:
        with self._pin_lock:
            self._pinned.pop(t.data_ptr(), None)
        if int(self._cart.cudaHostUnregister(t.data_ptr())) != 0:
            _clear_last_error(self._cart)

    def poison_released(self, t: Tensor) -> None:
        pass

    def set_plan(self, items: dict[str, int] | None, budget: int | None) -> None:
        """Enforce the device budget: allocations beyond it fail in the caching allocator."""
        if budget is not None:
            total = torch.cuda.get_device_properties(self.torch).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), self.torch)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch)

    def check(self) -> None:
        if self._lander.error is not None:
            raise self._lander.error

    def memory(self) -> dict[str, int]:
        free, total = torch.cuda.mem_get_info(self.torch)
        return {"allocated": torch.cuda.memory_allocated(self.torch),
                "peak": torch.cuda.max_memory_allocated(self.torch),
                "reserved": torch.cuda.memory_reserved(self.torch), "free": free, "total": total}

    def close(self) -> None:
        self._lander.close()


def _clear_last_error(cart) -> None:
    """Reset the CUDA runtime's last error after a failed call whose failure fuyou reports itself."""
    get = getattr(cart, "cudaGetLastError", None)
    if get is not None:
        get()
        return
    try:  # not bound by this torch: the runtime library torch loaded
        import ctypes

        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):  # torch's own runtime first
            try:
                ctypes.CDLL(name).cudaGetLastError()
                return
            except OSError:
                continue
    except Exception:  # noqa: BLE001 - best effort: the typed error is raised either way
        pass


# ------------------------------------------------------------------------------------------------
# The fake: CPU compute with CUDA's asynchrony modelled and checked (Note: [Fake device rules])
# ------------------------------------------------------------------------------------------------
class _Handle(bytearray):
    """The memory of one fake device allocation; its finalizer runs when the last view is gone."""


class _Block:
    __slots__ = ("item", "nbytes", "stream", "alloc_pos", "recorded", "read_by_compute", "what")

    def __init__(self, item, nbytes, stream, alloc_pos, what):
        self.item, self.nbytes, self.stream, self.alloc_pos, self.what = item, nbytes, stream, alloc_pos, what
        self.recorded: set[str] = set()
        self.read_by_compute = False


class FakeStream:
    def __init__(self, dev: "FakeDevice", name: str):
        self.dev, self.name = dev, name
        self.pos = 0                       # operations queued so far (events count as operations)
        self.landed = 0                    # operations that have landed
        self.ops: deque = deque()          # (pos, enqueue time, fn, written block keys)
        self.seen: dict[str, int] = {}     # other stream -> its position this stream has waited for
        self.clock = 0.0                   # simulated time at which this stream's queued work ends

    def wait_event(self, ev: "FakeEvent") -> None:
        self.dev._wait(self, ev.stream, ev.pos)

    def wait_stream(self, other: "FakeStream") -> None:
        ev = self.dev.event()
        ev.record(other)
        self.wait_event(ev)

    def synchronize(self) -> None:
        with self.dev._lock:
            self.dev._land(self, self.pos)
        self.dev._run_due()


class FakeEvent:
    def __init__(self, dev: "FakeDevice", timing: bool = False):
        self.dev, self.timing = dev, timing
        self.stream: FakeStream | None = None
        self.pos = 0
        self.t = None

    def record(self, stream: FakeStream | None = None) -> "FakeEvent":
        d = self.dev
        with d._lock:
            s = stream or d.current()
            s.pos += 1
            self.stream, self.pos = s, s.pos
            now = time.perf_counter()
            self.t = now if s is d.compute else max(now, s.clock)
            if s is d.compute:
                s.landed = s.pos
        return self

    def synchronize(self) -> None:
        if self.stream is not None:
            self.dev._wait(None, self.stream, self.pos)

    def query(self) -> bool:
        return self.stream is None or self.stream.landed >= self.pos

    def elapsed_s(self, end: "FakeEvent") -> float:
        if not (self.timing and end.timing):  # CUDA raises here too
            raise DeviceHazard("elapsed time of an event created without timing=True")
        if not (self.query() and end.query()):
            raise DeviceHazard("elapsed time of an event that has not completed (wait for it first)")
        return end.t - self.t


class FakeDevice:
    """See Note: [Fake device rules]. ``capacity``: the device memory it reports (default 16 GiB)."""

    kind = "fake"
    is_host = False

    def __init__(self, capacity: int = 16 * 1024**3):
        self.torch = torch.device("cpu")
        self.capacity = capacity
        self._lock = threading.RLock()
        self.compute = FakeStream(self, "compute")
        self._streams = [self.compute]
        self._local = threading.local()
        self._blocks: dict[int, _Block] = {}          # storage address -> block of device memory
        self._pinned: dict[int, int] = {}             # registered host ranges: start -> end
        self.live: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.limits: dict[str, int] | None = None
        self.budget: int | None = None
        self.sync_copies = 0
        self.copies = 0
        self.hazards: list[str] = []
        self._callbacks: list[tuple[FakeStream, int, object]] = []
        self._due: list = []
        self._closed = False
        self._timer = threading.Thread(target=self._land_old, name="fuyou-fake-gpu", daemon=True)
        self._timer.start()

    # -- streams and events ----------------------------------------------------------------------
    def new_stream(self, name: str) -> FakeStream:
        s = FakeStream(self, name)
        self._streams.append(s)
        return s

    def current(self) -> FakeStream:
        return getattr(self._local, "stream", None) or self.compute

    @contextmanager
    def on(self, stream: FakeStream):
        prev = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            yield
        finally:
            self._local.stream = prev

    def event(self, timing: bool = False) -> FakeEvent:
        return FakeEvent(self, timing)

    def _wait(self, waiter: FakeStream | None, s: FakeStream, pos: int) -> None:
        with self._lock:
            self._land(s, pos)
            if waiter is not None:
                waiter.seen[s.name] = max(waiter.seen.get(s.name, 0), pos)
                if waiter is self.compute and s is not self.compute:
                    for blk in self._blocks.values():   # rule 3: compute may read what s wrote
                        if blk.stream == s.name and blk.alloc_pos <= pos:
                            blk.read_by_compute = True
        self._run_due()
        self.check()

    def _land(self, s: FakeStream, pos: int) -> None:
        while s.ops and s.ops[0][0] <= pos:
            _, _, fn = s.ops.popleft()
            fn()
        s.landed = max(s.landed, pos)
        for cb in [c for c in self._callbacks if c[0] is s and c[1] <= s.landed]:
            self._callbacks.remove(cb)
            self._due.append(cb[2])

    def _run_due(self) -> None:
        """Run what waited for landed events, outside the lock: the callbacks take other locks (a pool's),
        whose holders may be waiting for this one."""
        while True:
            with self._lock:
                if not self._due:
                    return
                fn = self._due.pop(0)
            fn()

    def _land_old(self) -> None:
        while not self._closed:
            time.sleep(LAND_AFTER_S / 4)
            with self._lock:
                old = time.perf_counter() - LAND_AFTER_S
                for s in self._streams:
                    due = [op[0] for op in s.ops if op[1] <= old]
                    if due:
                        self._land(s, max(due))
                    elif not s.ops:
                        self._land(s, s.pos)  # events with nothing before them
            self._run_due()

    def after(self, ev: FakeEvent, fn) -> None:
        with self._lock:
            if not ev.query():
                self._callbacks.append((ev.stream, ev.pos, fn))
                return
        fn()

    def synchronize(self) -> None:
        with self._lock:
            for s in self._streams:
                self._land(s, s.pos)
        self._run_due()
        self.check()

    # -- memory ----------------------------------------------------------------------------------
    def empty(self, numel: int, dtype: torch.dtype, item: str) -> Tensor:
        size = torch.empty((), dtype=dtype).element_size()
        nbytes = numel * size
        h = _Handle(max(nbytes, size))
        t = torch.frombuffer(h, dtype=dtype)[:numel]
        _fill_poison(t)
        s = self.current()
        with self._lock:
            s.pos += 1
            self._claim(t, item, nbytes, s, s.pos, h, f"{format_size(nbytes)} for {item}")
        return t

    def track(self, t: Tensor, item: str) -> Tensor:
        """Charge ``t`` (made by compute, on the compute stream) to ``item`` while it lives."""
        with self._lock:
            if t.untyped_storage().data_ptr() not in self._blocks:
                self._claim(t, item, t.untyped_storage().nbytes(), self.compute, self.compute.pos, t,
                            f"{format_size(t.untyped_storage().nbytes())} for {item}")
        return t

    def _claim(self, t, item, nbytes, stream, pos, owner, what) -> None:
        key = t.untyped_storage().data_ptr()
        if self.limits is not None:
            if item not in self.limits:
                raise DeviceBudgetError(f"device memory for {item!r} ({what}) is not an item of the memory plan "
                                        f"({', '.join(self.limits)}): the plan under-counts the device")
            if self.live.get(item, 0) + nbytes > self.limits[item]:
                raise DeviceBudgetError(
                    f"device item {item!r} would hold {format_size(self.live.get(item, 0) + nbytes)}, above the "
                    f"{format_size(self.limits[item])} the memory plan gives it")
        total = sum(self.live.values()) + nbytes
        if self.budget is not None and total > self.budget:
            raise DeviceBudgetError(f"device memory {format_size(total)} above the budget {format_size(self.budget)}")
        self._blocks[key] = _Block(item, nbytes, stream.name, pos, what)
        self.live[item] = self.live.get(item, 0) + nbytes
        self.peak[item] = max(self.peak.get(item, 0), self.live[item])
        weakref.finalize(owner, self._free, key)

    def _free(self, key: int) -> None:
        with self._lock:
            blk = self._blocks.pop(key, None)
            if blk is None:
                return
            self.live[blk.item] -= blk.nbytes
            if blk.read_by_compute and blk.stream != "compute" and "compute" not in blk.recorded:
                self.hazards.append(f"{blk.what}, allocated on stream {blk.stream} and read by compute, was freed "
                                    f"without record_stream(compute): the allocator could reuse it on {blk.stream} "
                                    f"while compute still reads it")

    def record_stream(self, t: Tensor, stream: FakeStream) -> None:
        with self._lock:
            blk = self._blocks.get(t.untyped_storage().data_ptr())
            if blk is not None:
                blk.recorded.add(stream.name)

    def _check_use(self, t: Tensor, s: FakeStream, what: str) -> None:
        """Rules 2 and 3 for device memory ``t`` used by a copy on side stream ``s``."""
        blk = self._blocks.get(t.untyped_storage().data_ptr())
        if blk is None or blk.stream == s.name:
            return
        if s.seen.get(blk.stream, 0) < blk.alloc_pos:
            raise DeviceHazard(f"a copy on stream {s.name} {what} {blk.what}, allocated on stream {blk.stream}, "
                               f"without waiting for {blk.stream} since the allocation: allocate it on {s.name} "
                               f"(inside its stream context) or make {s.name} wait for {blk.stream}")
        if s.name not in blk.recorded:
            raise DeviceHazard(f"a copy on stream {s.name} {what} {blk.what}, allocated on stream {blk.stream}, "
                               f"without record_stream({s.name}): the allocator could reuse it before the copy ran")

    def _pinned_host(self, t: Tensor) -> bool:
        return _within(self._pinned, t)

    def _copy(self, dst: Tensor, src: Tensor, stream, device_side: Tensor, host_side: Tensor, what: str) -> None:
        s = stream or self.current()
        now = time.perf_counter()
        with self._lock:
            self._raise_hazards()
            self.copies += 1
            if s is not self.compute:
                self._check_use(device_side, s, what)
            pinned = self._pinned_host(host_side)
            if not pinned:
                self.sync_copies += 1
            if s is self.compute or not pinned:
                dst.copy_(src)  # compute runs eagerly; a pageable copy is synchronous on CUDA (rule 4)
                return
            _fill_poison(dst)
            s.pos += 1
            nbytes = src.numel() * src.element_size()
            s.clock = max(s.clock, now) + nbytes / FAKE_COPY_BW
            s.ops.append((s.pos, now, lambda: dst.copy_(src)))

    def to_device(self, dst: Tensor, src: Tensor, stream=None) -> None:
        self._copy(dst, src, stream, dst, src, "writes")

    def to_host(self, dst: Tensor, src: Tensor, stream=None) -> None:
        self._copy(dst, src, stream, src, dst, "reads")

    def register_host(self, t: Tensor) -> bool:
        with self._lock:
            a = t.data_ptr()
            self._pinned[a] = a + t.numel() * t.element_size()
        return True

    def unregister_host(self, t: Tensor) -> None:
        with self._lock:
            self._pinned.pop(t.data_ptr(), None)

    def poison_released(self, t: Tensor) -> None:
        _fill_poison(t.view(torch.uint8))

    def set_plan(self, items: dict[str, int] | None, budget: int | None) -> None:
        with self._lock:
            self.limits = dict(items) if items is not None else None
            self.budget = budget

    def check(self) -> None:
        with self._lock:
            self._raise_hazards()

    def _raise_hazards(self) -> None:
        if self.hazards:
            msg = self.hazards[0]
            self.hazards.clear()
            raise DeviceHazard(msg)

    def memory(self) -> dict[str, int]:
        with self._lock:
            used = sum(self.live.values())
            return {"allocated": used, "peak": sum(self.peak.values()), "free": self.capacity - used,
                    "total": self.capacity}

    def close(self) -> None:
        self.synchronize()
        self._closed = True


def _fill_poison(t: Tensor) -> None:
    if t.numel() == 0:
        return
    if t.dtype.is_floating_point:
        t.fill_(math.nan)
    else:
        t.view(torch.uint8).fill_(0x5A)


class InFlight:
    """Copies whose events are not known to have run, oldest first, with what each keeps alive: the
    device memory an outgoing copy holds after compute is done with it. ``bound(n)`` waits for the
    oldest (a bounded host wait) until at most ``n`` are left, dropping those already done."""

    def __init__(self):
        self._q: deque = deque()

    def add(self, ev, keep=None) -> None:
        self._q.append((ev, keep))

    def bound(self, n: int) -> None:
        while self._q and (len(self._q) > n or self._q[0][0].query()):
            self._q.popleft()[0].synchronize()

    def clear(self) -> None:
        self._q.clear()


def make_device(name: str, index: int | None = None):
    """The device for ``train.device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``fake``;
    ``index``: which GPU (a data-parallel rank's local rank; default the current one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but no CUDA GPU is available; use train.device=cpu or auto")
        return CudaDevice(index)
    if name == "fake":
        return FakeDevice()
    return HostDevice()
