"""The optimizer worker: updates stages on the CPU while backward of earlier stages continues.

``submit`` marks the stage *updating* (layout docstring) and queues the job; a worker thread runs
the out-of-core AdamW (read fp32 master and moments from SSD, fused kernel, write them back and the
new compute weights) and marks the stage *current*. A resident stage with cached weights is marked
current as soon as its kernels are done: the next forward needs only the cached compute weights,
not the state's write to SSD (which the job still waits for before the next job starts). At most
``max_pending`` jobs wait in the queue; a further ``submit`` blocks (back-pressure bounds the
gradients held in CPU memory), and that blocked time is counted as waiting for the optimizer.

Note: [Gradient hand-off]
    On CUDA the gradient's D2H copy runs on the D2H stream into a pinned pool buffer and records an
    event; the worker calls ``event.synchronize()`` before reading the buffer. That is a sync point
    of the worker thread, not of the main thread, which goes on with backward.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch

from fuyou.engine.layout import StageState
from fuyou.engine.trace import StepCounters, Tracer
from fuyou.optim.out_of_core import OutOfCoreAdamW


@dataclass
class UpdateJob:
    state: StageState
    grad: torch.Tensor | str   # flat CPU tensor, or the store key of a deferred gradient
    grad_dtype: torch.dtype
    lr: float
    step: int                  # 1-based AdamW step
    grad_scale: float
    release: object | None = None   # callable freeing the gradient buffer after the update
    event: object | None = None     # CUDA event of the gradient's D2H copy


class OptimizerWorker:
    def __init__(self, opt: OutOfCoreAdamW, lowp_dtype: torch.dtype, max_pending: int, tracer: Tracer, counters_ref):
        self.opt, self.lowp_dtype, self.tracer = opt, lowp_dtype, tracer
        self._counters = counters_ref
        self._q: queue.Queue[UpdateJob | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuyou-adam", daemon=True)
        self._thread.start()

    def submit(self, job: UpdateJob) -> None:
        self.check()
        job.state.updated.clear()
        t0 = time.perf_counter()
        self._q.put(job)
        waited = time.perf_counter() - t0
        if waited > 1e-4:
            self._counters().wait_optimizer_s += waited
            self.tracer.add("wait optimizer queue", "wait", t0, t0 + waited)

    def submit_commit(self, commit) -> None:
        """Queue ``commit()`` after every update submitted so far; later updates wait for it (the
        copy-on-write rule of ``fuyou.engine.commit``)."""
        self.check()
        self._q.put(commit)

    def wait_all(self) -> None:
        """Block until every submitted update is finished (a step boundary for eval and saving)."""
        self._q.join()
        self.check()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                self._q.task_done()
                return
            if not isinstance(job, UpdateJob):  # a commit
                try:
                    if self._error is None:
                        job()
                except BaseException as e:  # noqa: BLE001 - handed to the main thread via check()
                    self._error = self._error or e
                finally:
                    self._q.task_done()
                continue
            st = job.state
            try:
                if self._error is None:
                    if job.event is not None:
                        job.event.synchronize()  # see Note: [Gradient hand-off]
                    stats = self.opt.update(
                        st.keys, job.grad, numel=st.numel, segments=st.segments, lr=job.lr, step=job.step,
                        grad_scale=job.grad_scale, lowp_out=st.cache, lowp_dtype=self.lowp_dtype,
                        grad_dtype=job.grad_dtype, out_keys=st.next_keys, resident=st.resident,
                        on_weights_ready=st.updated.set if st.cache is not None else None,
                        persist=st.cow)
                    st.dirty = st.resident is not None and not st.cow
                    st.cur = 1 - st.cur if st.cow else st.cur  # the new copy is current (committed later)
                    c: StepCounters = self._counters()
                    c.optimizer_busy_s += stats.busy_s
                    c.optimizer_kernel_s += stats.kernel_s
                    c.ssd_read_bytes += stats.read_bytes
                    c.ssd_write_bytes += stats.written_bytes
                    end = time.perf_counter()
                    self.tracer.add(f"adam {st.stage.name}", "cpu-adam", end - stats.busy_s, end,
                                    params=stats.params, kernel_s=round(stats.kernel_s, 6),
                                    read_bytes=stats.read_bytes, written_bytes=stats.written_bytes)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread via check()
                st.error = e
                self._error = self._error or e
            finally:
                if job.release is not None:
                    job.release()
                st.updated.set()
                self._q.task_done()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
