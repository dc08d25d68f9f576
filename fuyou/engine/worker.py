"""The optimizer worker: updates stages on the CPU while backward of earlier stages continues.

``submit`` marks the stage *updating* (layout docstring) and queues the job; a worker thread runs
the out-of-core AdamW (read fp32 master and moments from the job's source copy, fused kernel, write
them and the new compute weights to its target copy) and marks the stage *current* once no other job
for it is pending. A resident stage with cached weights is marked current as soon as its kernels are
done: the next forward needs only the cached compute weights. At most ``max_pending`` jobs wait in
the queue; a further ``submit`` blocks (back-pressure bounds the gradients held in CPU memory), and
that blocked time is counted as waiting for the optimizer. Other callables (a commit) can be queued
between jobs; the worker runs everything in submission order.

A job whose gradient may be needed again (a speculative update under exact clipping, see
``fuyou.engine.engine``) names ``save_grad``: the worker writes the gradient to that store key while
it updates, and releases the gradient's buffer only when both are done.

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

from fuyou import watchdog
from fuyou.engine.layout import StageState
from fuyou.engine.trace import StepCounters, Tracer
from fuyou.faults import fault, stall
from fuyou.optim.out_of_core import OutOfCoreAdamW


@dataclass
class UpdateJob:
    state: StageState
    grad: torch.Tensor | str   # flat CPU tensor, or the store key of a saved gradient
    grad_dtype: torch.dtype
    lr: float
    step: int                  # 1-based AdamW step
    grad_scale: float
    src: int                   # the state copy read (Note: [State copies])
    dst: int                   # the state copy written
    release: object | None = None   # callable freeing the gradient buffer after the update
    event: object | None = None     # CUDA event of the gradient's D2H copy
    save_grad: str | None = None    # store key the gradient is also written to (a redo may need it)
    redo: bool = False              # the redo of a speculative update (exact clipping triggered)
    update: bool = True             # False: only save the gradient (deferred clipping; the update follows)
    state_in: tuple | None = None   # a resident stage with a spare copy: the state tensors read ...
    state_out: tuple | None = None  # ... and those written (engine.py, Note: [Spare copies]); None: in place
    master_in: torch.Tensor | None = None  # the master of copy ``src``, in memory (engine.py, Note: [Master in
    master_release: object | None = None   # memory]); freed by this callable after the update, once
    master_event: object | None = None     # this event (its copy to the GPU) has completed


def _let_go(job: UpdateJob) -> None:
    """Free a job's gradient buffer and its master's (``release``, ``master_release``), each once the copy that
    filled or read it has run (a job skipped, or failed before it waited, may have its copies still running)."""
    for release, event in ((job.release, job.event), (job.master_release, job.master_event)):
        if release is None:
            continue
        if event is not None:
            try:
                event.synchronize()
            except BaseException:  # noqa: BLE001 - the first error is already recorded
                pass
        release()
    job.release = job.master_release = None


class Outstanding:
    """Work handed to a background thread and not finished yet (the optimizer worker's jobs, the weight
    exchange's batches): the submitter counts it in, the thread counts it out, and the main thread waits
    until none is left."""

    def __init__(self):
        self._n = 0
        self._idle = threading.Condition()

    def add(self) -> None:
        with self._idle:
            self._n += 1

    def done(self) -> None:
        with self._idle:
            self._n -= 1
            if self._n == 0:
                self._idle.notify_all()

    def wait(self, what: str) -> None:
        with self._idle:
            watchdog.wait_for(self._idle, lambda: self._n == 0, what)


class OptimizerWorker:
    def __init__(self, opt: OutOfCoreAdamW, lowp_dtype: torch.dtype, max_pending: int, tracer: Tracer, counters_ref):
        self.opt, self.lowp_dtype, self.tracer = opt, lowp_dtype, tracer
        self._counters = counters_ref
        self._q: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._pending = Outstanding()
        self._running: str = "nothing"
        self._thread = threading.Thread(target=self._run, name="fuyou-adam", daemon=True)
        self._thread.start()

    def submit(self, job: UpdateJob) -> None:
        try:
            self.check()
        except BaseException:
            _let_go(job)  # never queued: its buffers are the caller's no more
            raise
        job.state.begin_update()
        t0 = time.perf_counter()
        try:
            self._put(job, f"room in the optimizer queue (to update {job.state.stage.name})")
        except watchdog.StallError:  # never queued (any other error may come once it is: the worker has it)
            job.state.end_update()
            _let_go(job)
            raise
        waited = time.perf_counter() - t0
        if waited > 1e-4:
            self._counters().add(wait_optimizer_s=waited)
            self.tracer.add("wait optimizer queue", "wait", t0, t0 + waited)

    def submit_call(self, fn, name: str) -> None:
        """Queue ``fn()`` after every job submitted so far (a commit: later updates wait for it, the
        copy-on-write rule of ``fuyou.engine.commit``)."""
        self.check()
        self._put((name, fn), f"room in the optimizer queue (for {name})")

    def _put(self, item, what: str) -> None:
        self._pending.add()
        try:
            watchdog.put(self._q, item, what + f"; the worker is on: {self._running}")
        except BaseException:
            self._done()
            raise

    def _done(self) -> None:
        watchdog.beat()
        self._pending.done()

    def wait_all(self) -> None:
        """Block until every submitted job is finished (a step boundary for eval, commits and saving)."""
        self._pending.wait(f"the optimizer worker to finish (it is on: {self._running})")
        self.check()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                self._done()
                return
            if not isinstance(job, UpdateJob):  # a commit or another call
                self._running, fn = job
                try:
                    if self._error is None:
                        fn()
                except BaseException as e:  # noqa: BLE001 - handed to the main thread via check()
                    self._error = self._error or e
                finally:
                    self._running = "nothing"
                    self._done()
                continue
            st = job.state
            self._running = f"the update of {st.stage.name}"
            saving = None
            try:
                if self._error is not None:  # skipped: its stage must not look current with old weights
                    st.error = st.error or self._error
                else:
                    stall("optimizer", job.step - 1)
                    if job.redo:
                        fault("redo", job.step - 1)  # tests: killed while a clipped step is redone
                    if job.event is not None:
                        job.event.synchronize()  # see Note: [Gradient hand-off]
                    if job.master_event is not None:  # the master is updated in place: its copy to the GPU first
                        job.master_event.synchronize()
                    if job.save_grad is not None:
                        saving = self.opt.store.write_from(job.save_grad, job.grad)
                    if not job.update:
                        watchdog.result(saving, f"the saved gradient of {st.stage.name}")
                        saving = None
                        self._counters().add(ssd_write_bytes=job.grad.numel() * job.grad.element_size())
                        continue
                    stats = self.opt.update(
                        st.copies[job.src], job.grad, numel=st.numel, segments=st.segments, lr=job.lr,
                        step=job.step, grad_scale=job.grad_scale, lowp_dtype=self.lowp_dtype,
                        grad_dtype=job.grad_dtype, out_keys=st.copies[job.dst], stage=st.index,
                        master_in=job.master_in, lowp_out=st.cache if job.master_in is None else None,
                        resident=job.state_out if job.state_out is not None else st.resident,
                        resident_src=job.state_in,
                        on_weights_ready=st.weights_ready if st.cache is not None else None)
                    c: StepCounters = self._counters()
                    if saving is not None:
                        watchdog.result(saving, f"the saved gradient of {st.stage.name}")
                        saving = None
                        stats.written_bytes += job.grad.numel() * job.grad.element_size()
                    c.add(optimizer_busy_s=stats.busy_s, optimizer_kernel_s=stats.kernel_s,
                          ssd_read_bytes=stats.read_bytes, ssd_write_bytes=stats.written_bytes)
                    end = time.perf_counter()
                    name = f"adam {st.stage.name}" + (f" (redo, clip {job.grad_scale:.3g})" if job.redo else "")
                    # (step: a trace of step N holds the tail of step N-1's updates too, which it did not say)
                    self.tracer.add(name, "cpu-adam", end - stats.busy_s, end, step=job.step,
                                    params=stats.params, kernel_s=round(stats.kernel_s, 6),
                                    read_bytes=stats.read_bytes, written_bytes=stats.written_bytes)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread via check()
                st.error = e
                self._error = self._error or e
            finally:
                if saving is not None:  # an error above: the buffer may go only once the write is done
                    try:
                        saving.result(watchdog.limit())
                    except BaseException:  # noqa: BLE001 - the first error is already recorded
                        pass
                _let_go(job)
                self._running = "nothing"
                st.end_update()
                self._done()

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread after the queued jobs (``timeout``: give up waiting, after a failure)."""
        self._pending.add()
        try:
            self._q.put(None, timeout=timeout if timeout is not None else watchdog.limit())
        except queue.Full:
            return
        self._thread.join(timeout if timeout is not None else watchdog.limit())

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
