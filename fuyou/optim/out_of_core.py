"""The out-of-core AdamW step: one layer's optimizer state streamed from the SSD store in chunks.

A stage's fp32 master weights, Adam m and v live in the store as three flat tensors. ``update``
walks them in chunks through a bounded set of pool buffers, as a pipeline::

    read chunk k+1 (and k+2 ... up to ``depth``)  |  fused AdamW on chunk k  |  write chunk k-1 ...

so the disk reads, the kernel and the disk writes overlap. The fused kernel also emits the new
compute-precision (bf16/fp16, or fp32) weights, into a caller's tensor (the CPU weight cache) or back
to the store. The gradient comes either as a CPU tensor (the normal, overlapped path) or as a store
key (the deferred path used by exact gradient clipping, where gradients wait on SSD for the norm).

Buffers: at most ``(2 * depth + 1)`` chunks are held at once (``depth`` being read, one being
updated, ``depth`` being written), each chunk needing 12 bytes per element for master, m and v, plus
2-4 for a gradient read from the store and 2-4 for low-precision weights written to it. That bound is
``max_buffer_bytes``; the engine reserves it in the CPU budget.

Thread safety: ``update`` may be called from several threads on *different* stages at once; the
store and the pool are thread-safe. Numerics: chunking does not change any element's arithmetic, so
the result is bit-identical to one ``fused_adamw_`` call over the whole flat tensors.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from fuyou.faults import fault
from fuyou.watchdog import beat
from fuyou.optim.adamw import fused_adamw_
from fuyou.optim.config import AdamWConfig


@dataclass(frozen=True)
class StateKeys:
    """Store keys of one stage's optimizer state (flat tensors of equal length)."""

    master: str
    exp_avg: str
    exp_avg_sq: str
    weights: str | None = None  # compute-precision weights in the store (None: kept in CPU memory)

    @property
    def fp32(self) -> tuple[str, str, str]:
        """The three fp32 tensors of the state, in (master, m, v) order."""
        return (self.master, self.exp_avg, self.exp_avg_sq)


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, end)`` of the flat state share one weight decay."""

    start: int
    end: int
    weight_decay: float


@dataclass
class UpdateStats:
    """What one ``update`` cost: wall time, time inside the kernel, bytes moved each way."""

    busy_s: float = 0.0
    kernel_s: float = 0.0
    read_bytes: int = 0
    written_bytes: int = 0
    params: int = 0
    chunks: list[tuple[float, float]] = field(default_factory=list)  # (start, end) perf_counter of kernels


class OutOfCoreAdamW:
    """Updates stages whose AdamW state lives in ``store``, using buffers from ``pool``."""

    def __init__(self, store, pool, cfg: AdamWConfig, *, chunk_numel: int = 1 << 20, depth: int = 2,
                 num_threads: int | None = None):
        # A chunk must start on a checksum block for every dtype involved (fp32 state, 2-byte weights).
        align = store.checksum_block // 2
        self.chunk = max(align, (chunk_numel + align - 1) // align * align)
        self.store, self.pool, self.cfg, self.depth, self.num_threads = store, pool, cfg, depth, num_threads

    def max_buffer_bytes(self, grad_bytes: int = 4, lowp_bytes: int = 4) -> int:
        """The most pool memory one ``update`` holds at once (see the module docstring)."""
        return (2 * self.depth + 1) * self.chunk * (12 + grad_bytes + lowp_bytes)

    def update(self, keys: StateKeys, grad: torch.Tensor | str, *, numel: int, segments: list[Segment],
               lr: float, step: int, grad_scale: float = 1.0, lowp_out: torch.Tensor | None = None,
               lowp_dtype: torch.dtype = torch.bfloat16, grad_dtype: torch.dtype | None = None,
               out_keys: StateKeys | None = None, resident: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               on_weights_ready=None) -> UpdateStats:
        """One AdamW step of one stage; returns its stats. Blocks until every write is done.

        The state is read from ``keys`` and written to ``out_keys`` (default: the same, in place; a
        second copy makes crash-safe commits possible, see ``fuyou.engine.commit``).
        ``grad``: a flat CPU tensor of ``numel`` elements, or the store key of one (``grad_dtype``).
        ``lowp_out``: flat tensor receiving the new compute-precision weights; when None they go to
        the store under ``keys.weights`` as ``lowp_dtype``. ``step`` counts from 1.
        Errors (a corrupt chunk, a full disk) propagate after every buffer is released; the state on
        the SSD is then partly updated, which the caller must treat as lost (resume from a commit).

        ``resident``: the stage's (master, m, v) held in CPU memory (flat fp32). They are updated in
        place and nothing of them is read from or written to the store: the caller writes them back
        (the engine's commit flush) before anyone reads the store. ``on_weights_ready()`` is called once
        the new compute weights are in ``lowp_out`` / the store.
        """
        if resident is not None:
            return self._update_resident(keys, grad, resident, numel=numel, segments=segments, lr=lr, step=step,
                                         grad_scale=grad_scale, lowp_out=lowp_out, lowp_dtype=lowp_dtype,
                                         grad_dtype=grad_dtype, out_keys=out_keys or keys,
                                         on_weights_ready=on_weights_ready)
        t_start = time.perf_counter()
        out_keys = out_keys or keys
        stats = UpdateStats(params=numel)
        gkey = grad if isinstance(grad, str) else None
        gdtype = grad_dtype if gkey else grad.dtype
        wdtype = lowp_out.dtype if lowp_out is not None else lowp_dtype
        chunks = [(s, min(s + self.chunk, numel)) for s in range(0, numel, self.chunk)]
        reading: deque = deque()
        writing: deque = deque()

        def issue_read(span):
            s, e = span
            n = e - s
            bufs = [self.pool.acquire(4 * n, torch.float32) for _ in range(3)]
            futs = [self.store.read_into(k, b.tensor, start=s) for k, b in zip(keys.fp32, bufs)]
            if gkey:
                gb = self.pool.acquire(n * _size(gdtype), gdtype)
                bufs.append(gb)
                futs.append(self.store.read_into(gkey, gb.tensor, start=s))
            stats.read_bytes += sum(b.tensor.numel() * b.tensor.element_size() for b in bufs)
            reading.append((span, bufs, futs))

        def retire(entry):
            futs, bufs = entry
            try:
                for f in futs:
                    f.result()
            finally:
                for b in bufs:
                    b.release()

        try:
            for span in chunks[: self.depth]:
                issue_read(span)
            nxt = self.depth
            while reading:
                (s, e), bufs, futs = reading.popleft()
                try:
                    for f in futs:
                        f.result()
                except BaseException:
                    for b in bufs:
                        b.release()
                    raise
                master, m, v = (b.tensor for b in bufs[:3])
                g = bufs[3].tensor if gkey else grad[s:e]
                wbuf = None
                if lowp_out is None:
                    wbuf = self.pool.acquire((e - s) * _size(wdtype), wdtype)
                    bufs.append(wbuf)
                    lowp = wbuf.tensor
                else:
                    lowp = lowp_out[s:e]
                self._step_chunk(s, e, segments, (master, m, v), s, g, lowp, lr, step, grad_scale, stats)
                wf = [self.store.write_from(k, t, start=s)
                      for k, t in zip(out_keys.fp32, (master, m, v))]
                stats.written_bytes += 12 * (e - s)
                if wbuf is not None:
                    wf.append(self.store.write_from(out_keys.weights, lowp, start=s))
                    stats.written_bytes += (e - s) * _size(wdtype)
                writing.append((wf, bufs))
                fault("optimizer", step - 1)  # tests: killed between two chunks of an update
                while len(writing) > self.depth:
                    retire(writing.popleft())
                if nxt < len(chunks):
                    issue_read(chunks[nxt])
                    nxt += 1
        finally:
            _drain(reading, writing, retire)
        if on_weights_ready is not None:
            on_weights_ready()
        stats.busy_s = time.perf_counter() - t_start
        return stats

    def _step_chunk(self, s: int, e: int, segments: list[Segment], state, state_start: int, g: torch.Tensor,
                    lowp: torch.Tensor, lr: float, step: int, grad_scale: float, stats: UpdateStats) -> None:
        """The fused kernel over elements ``[s, e)``, one call per weight-decay segment. ``state`` is
        (master, m, v) holding elements from ``state_start`` on (a chunk buffer: ``s``; resident
        state: 0); ``g`` and ``lowp`` hold elements ``[s, e)``."""
        c = self.cfg
        master, m, v = state
        fp32_copy = lowp.dtype == torch.float32  # fp32 training: the compute copy is the master
        t0 = time.perf_counter()
        for seg in segments:
            a, b = max(seg.start, s), min(seg.end, e)
            if a >= b:
                continue
            st, ch = slice(a - state_start, b - state_start), slice(a - s, b - s)
            fused_adamw_(master[st], g[ch], m[st], v[st], lr=lr, beta1=c.beta1, beta2=c.beta2, eps=c.eps,
                         weight_decay=seg.weight_decay, step=step, grad_scale=grad_scale,
                         out_lowp=None if fp32_copy else lowp[ch], num_threads=self.num_threads)
            if fp32_copy:
                lowp[ch].copy_(master[st])
        t1 = time.perf_counter()
        beat()  # progress, for the engine's deadlines (fuyou.watchdog)
        stats.kernel_s += t1 - t0
        stats.chunks.append((t0, t1))

    def _update_resident(self, keys: StateKeys, grad, resident, *, numel, segments, lr, step, grad_scale, lowp_out,
                         lowp_dtype, grad_dtype, out_keys, on_weights_ready) -> UpdateStats:
        """``update`` for state held in CPU memory: kernels over chunks (the same arithmetic per element,
        so bit-identical) and the compute weights to ``lowp_out`` or the store; the state stays in memory."""
        t_start = time.perf_counter()
        stats = UpdateStats(params=numel)
        master, m, v = resident
        gkey = grad if isinstance(grad, str) else None
        wdtype = lowp_out.dtype if lowp_out is not None else lowp_dtype
        pending: list = []  # (future, buffer or None)
        try:
            for s in range(0, numel, self.chunk):
                e = min(s + self.chunk, numel)
                gbuf = wbuf = None
                if gkey:
                    gbuf = self.pool.acquire((e - s) * _size(grad_dtype), grad_dtype)
                    pending.append((self.store.read_into(gkey, gbuf.tensor, start=s), gbuf))
                    pending[-1][0].result()
                    stats.read_bytes += (e - s) * _size(grad_dtype)
                g = gbuf.tensor if gbuf is not None else grad[s:e]
                if lowp_out is None:
                    wbuf = self.pool.acquire((e - s) * _size(wdtype), wdtype)
                lowp = wbuf.tensor if wbuf is not None else lowp_out[s:e]
                self._step_chunk(s, e, segments, resident, 0, g, lowp, lr, step, grad_scale, stats)
                if wbuf is not None:
                    pending.append((self.store.write_from(out_keys.weights, lowp, start=s), wbuf))
                    stats.written_bytes += (e - s) * _size(wdtype)
                fault("optimizer", step - 1)
            for f, buf in pending:  # the compute weights are in place before the forward is told so
                f.result()
            for _, buf in pending:
                buf.release()
            pending = []
            if on_weights_ready is not None:
                on_weights_ready()
        finally:
            first = None
            for f, buf in pending:
                try:
                    f.result()
                except BaseException as exc:  # noqa: BLE001 -- re-raised below unless one propagates
                    first = first or exc
                if buf is not None:
                    buf.release()
            if first is not None and sys.exc_info()[0] is None:
                raise first
        stats.busy_s = time.perf_counter() - t_start
        return stats


def _drain(reading: deque, writing: deque, retire) -> None:
    """Wait for every in-flight request and release every buffer, even after an error; the first
    error is re-raised only if none is propagating already."""
    first: BaseException | None = None
    while reading:
        _, bufs, futs = reading.popleft()
        for f in futs:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 - collected, re-raised below
                first = first or e
        for b in bufs:
            b.release()
    while writing:
        try:
            retire(writing.popleft())
        except BaseException as e:  # noqa: BLE001
            first = first or e
    if first is not None:
        import sys

        if sys.exc_info()[0] is None:
            raise first


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
