"""The weight exchange of data parallelism with a sharded optimizer state (fuyou/distributed.py).

Each stage's optimizer state (master, moments) lives on one rank, its *owner*
(``distributed.stage_owners``): only the owner updates the stage, reading and writing its state on
its own SSD share, so each rank moves about 1/N of the state per step. Every rank still runs the
stage's forward and backward, so after the owner's update the new compute weights go to every other
rank: this thread broadcasts them, stage by stage in the order the next forward needs them, on a
gloo group of its own (the weights are in CPU memory: the weight cache or a pool buffer read from the
store). A receiver writes them where its weight stream reads them (its cache, else its store's
``<stage>/weights``). Where the ranks of one machine map one weight cache (``fuyou/store/shared.py``)
a cached stage's new weights are already there: its broadcast is a one-byte token, which keeps the
order and the waiting the same.

States (``layout``): at ``schedule`` (main thread, once the step's updates, redos included, are all
submitted) a stage this rank does not own becomes *updating* (``begin_update``): its next load waits
until the broadcast has landed. A stage this rank owns is broadcast once its update is done
(``StageState.updated``); until then ``exchanged`` is clear, and the engine makes the stage's next
update wait for it (the broadcast reads the weights that update would overwrite).

Every rank schedules the same stages in the same order, so the broadcasts pair up. An error here
(a dead peer: the broadcast fails within the group's deadline) marks the stages not yet received as
failed, so the loads waiting for them raise instead of hanging.
"""

from __future__ import annotations

import queue
import threading
import time

import torch

from fuyou import watchdog
from fuyou.engine.layout import StageState, dtype_size
from fuyou.engine.worker import Outstanding


class WeightExchange:
    def __init__(self, dist, store, pool, dtype: torch.dtype, chunk: int, tracer, counters_ref,
                 shared_cache: bool = False):
        self.dist, self.store, self.pool, self.dtype, self.chunk = dist, store, pool, dtype, chunk
        self.shared_cache = shared_cache  # the ranks map one weight cache: a cached stage's update is already there
        self._token = torch.zeros(1, dtype=torch.uint8)
        self.tracer, self._counters = tracer, counters_ref
        self._q: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._pending = Outstanding()
        self._thread = threading.Thread(target=self._run, name="fuyou-exchange", daemon=True)
        self._thread.start()

    def schedule(self, states: list[StageState]) -> None:
        """Exchange ``states``' current weights, in this order (main thread; module docstring)."""
        self.check()
        items = []
        for st in states:
            if st.owned:
                st.exchanged.clear()
            else:
                st.begin_update()
            items.append((st, st.keys.weights))  # the key now: the main thread may move ``cur`` on
        self._pending.add()
        self._q.put(items)

    def wait_all(self) -> None:
        self._pending.wait("the weight exchange between the ranks")
        self.check()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            items = self._q.get()
            if items is None:
                return
            try:
                for st, key in items:
                    try:
                        if self._error is None:
                            self._exchange(st, key)
                    except BaseException as e:  # noqa: BLE001 - handed to the main thread via check()
                        self._error = self._error or e
                    finally:
                        if st.owned:
                            st.exchanged.set()
                        else:
                            if self._error is not None:
                                st.error = st.error or self._error
                            st.end_update()
            finally:
                watchdog.beat()
                self._pending.done()

    def _exchange(self, st: StageState, key: str) -> None:
        if st.owned:  # broadcast what the update wrote, once it is done (redo included)
            watchdog.wait_event(st.updated, f"the update of {st.stage.name} (before its weights go to the other ranks)")
            if st.error is not None:
                raise st.error
        t0, size = time.perf_counter(), dtype_size(self.dtype)
        if st.cache is not None and self.shared_cache:  # its owner wrote it in place: only say it is done
            self.dist.broadcast_tensor(self._token, st.owner, f"the exchange of {st.stage.name}'s weights")
            self.tracer.add(f"{'send' if st.owned else 'receive'} token {st.stage.name}", "exchange", t0,
                            time.perf_counter())
            return
        read = written = 0
        for a in range(0, st.numel, self.chunk):
            n = min(self.chunk, st.numel - a)
            if st.cache is not None:  # straight from and into the weight cache
                self.dist.broadcast_tensor(wire(st.cache[a:a + n]), st.owner, f"the exchange of {st.stage.name}'s weights")
                continue
            with watchdog.acquire(self.pool, n * size, self.dtype, "a buffer for the weight exchange") as buf:
                if st.owned:
                    watchdog.result(self.store.read_into(key, buf.tensor, start=a), f"the read of {st.stage.name}'s weights")
                    read += n * size
                self.dist.broadcast_tensor(wire(buf.tensor), st.owner, f"the exchange of {st.stage.name}'s weights")
                if not st.owned:
                    watchdog.result(self.store.write_from(st.keys.weights, buf.tensor, start=a),
                                    f"the write of {st.stage.name}'s weights")
                    written += n * size
        self._counters().add(ssd_read_bytes=read, ssd_write_bytes=written, exchange_bytes=size * st.numel)
        self.tracer.add(f"{'send' if st.owned else 'receive'} weights {st.stage.name}", "exchange", t0,
                        time.perf_counter())

    def close(self, timeout: float | None = None) -> None:
        self._q.put(None)
        self._thread.join(timeout if timeout is not None else watchdog.limit())


def wire(t: torch.Tensor) -> torch.Tensor:
    """The tensor as gloo carries it: its bytes (gloo has no 16-bit types; a broadcast only copies)."""
    return t.view(torch.uint8)
