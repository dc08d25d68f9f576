"""What a step spent its time on: Chrome/Perfetto trace events and per-step counters.

The trace uses the same task names and resources as the planner's simulation (DESIGN.md: "The
planner, the engine and the trace speak one language"): resources are the rows of the trace
(``compute``, ``h2d``, ``d2h``, ``ssd-read``, ``ssd-write``, ``cpu-adam``, ``wait``, and ``exchange``: data parallel weight broadcasts). Open the file in
ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

RESOURCES = ["compute", "h2d", "d2h", "ssd-read", "ssd-write", "cpu-adam", "wait", "exchange"]


@dataclass
class StepCounters:
    """Seconds and bytes of one optimizer step, summed over micro-batches."""

    compute_s: float = 0.0
    wait_weights_s: float = 0.0
    wait_optimizer_s: float = 0.0
    optimizer_busy_s: float = 0.0
    optimizer_kernel_s: float = 0.0
    ssd_read_bytes: int = 0
    ssd_write_bytes: int = 0
    commit_write_bytes: int = 0    # of ssd_write_bytes, a commit's writes (the resident state, LoRA's adapters)
    commits: int = 0               # commits whose writes landed in these counters
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    cache_hits: int = 0
    wait_activations_s: float = 0.0
    act_gpu_bytes: int = 0
    act_cpu_bytes: int = 0
    act_ssd_write_bytes: int = 0
    act_ssd_read_bytes: int = 0
    act_overflow_bytes: int = 0    # of act_ssd_write_bytes, the cpu tier's: its share was full (offload.act_cpu_mem)
    exchange_bytes: int = 0        # data parallel: compute weights this rank sent or received (exchange.py)
    clipped: bool = False          # exact clipping triggered: the step's speculative updates were redone
    deferred: bool = False         # exact clipping: updates waited for the norm (the previous step clipped)
    started: bool = field(default=False, repr=False, compare=False)  # a step counts into these (Engine)
    _next: "StepCounters | None" = field(default=None, repr=False, compare=False)

    def add(self, **amounts) -> None:
        """Add to counters from any thread: the loader, reader, optimizer and main threads count into
        the same step's counters, and ``x += n`` on an attribute is not atomic (updates were lost). Once
        the step's counters are read (``close``), what a background thread still adds (an update or a
        commit's writes finishing late) goes to the next counters, not into a record already read."""
        with _COUNT_LOCK:
            c = self
            while c._next is not None:
                c = c._next
            for k, v in amounts.items():
                setattr(c, k, getattr(c, k) + v)

    def close(self, successor: "StepCounters") -> None:
        """Freeze these counters: later adds go to ``successor``."""
        with _COUNT_LOCK:
            self._next = successor

    def as_dict(self) -> dict:
        with _COUNT_LOCK:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("started", "_next")}


_COUNT_LOCK = threading.Lock()


class Tracer:
    """Collects complete ("X") events while ``enabled``; thread-safe. Times are perf_counter based."""

    def __init__(self):
        self.enabled = False
        self.events: list[dict] = []
        self._device: list[tuple] = []   # rows timed by device events, resolved after the step's sync
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    def add(self, name: str, resource: str, start: float, end: float, **args) -> None:
        if not self.enabled:
            return
        ev = {"name": name, "cat": resource, "ph": "X", "pid": 1, "tid": RESOURCES.index(resource) + 1,
              "ts": (start - self._t0) * 1e6, "dur": max(0.0, end - start) * 1e6}
        if args:
            ev["args"] = args
        with self._lock:
            self.events.append(ev)

    def add_gpu(self, name: str, resource: str, start_ev, end_ev, **args) -> None:
        """A row timed by two device events (``fuyou.engine.device``): its times are known only once
        the device has run it, so it is resolved at the end of the step (``resolve_device``)."""
        if self.enabled:
            with self._lock:
                self._device.append((name, resource, start_ev, end_ev, args))

    def resolve_device(self, anchor, anchor_t: float) -> None:
        """Turn the step's device-timed rows into host times: ``anchor`` is an event recorded on the
        compute stream at host time ``anchor_t``."""
        with self._lock:
            rows, self._device = self._device, []
        for name, resource, ev0, ev1, args in rows:
            ev1.synchronize()
            start = anchor_t + anchor.elapsed_s(ev0)
            self.add(name, resource, start, start + ev0.elapsed_s(ev1), **args)

    @contextmanager
    def span(self, name: str, resource: str, **args):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, resource, t0, time.perf_counter(), **args)

    def write(self, path: str | Path) -> None:
        """The events as a trace file. A resource's events that overlap in time (several threads write or read
        at once) go to lanes of their own, ``ssd-write 2`` and on: the format wants a row's events nested or
        apart, and Perfetto drops or garbles the others (a pass found half the writes overlapping)."""
        with self._lock:
            events = sorted((dict(e) for e in self.events), key=lambda e: (e["ts"], -e["dur"]))
        ends: dict[int, list[float]] = {}  # a resource's row -> each lane's last end
        for e in events:
            lanes = ends.setdefault(e["tid"], [])
            lane = next((k for k, end in enumerate(lanes) if e["ts"] >= end), len(lanes))
            if lane == len(lanes):
                lanes.append(0.0)
            lanes[lane] = e["ts"] + e["dur"]
            if lane:
                e["tid"] = e["tid"] * 100 + lane
        meta = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "fuyou step"}}]
        for i, r in enumerate(RESOURCES):
            for lane in range(max(1, len(ends.get(i + 1, [])))):
                tid = (i + 1) * 100 + lane if lane else i + 1
                meta.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid,
                             "args": {"name": r if not lane else f"{r} {lane + 1}"}})
                meta.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid,
                             "args": {"sort_index": (i + 1) * 100 + lane}})
        Path(path).write_text(json.dumps({"traceEvents": meta + events, "displayTimeUnit": "ms"}))
