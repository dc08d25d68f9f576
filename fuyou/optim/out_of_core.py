"""The out-of-core AdamW step: one layer's optimizer state streamed from the SSD store in chunks.

A stage's fp32 master weights, Adam m and v live in the store as three flat tensors. ``update``
walks them in chunks through a bounded set of pool buffers, as a pipeline::

    read chunk k+1 (and k+2 ... up to ``depth``)  |  fused AdamW on chunk k  |  write chunk k-1 ...

so the disk reads, the kernel and the disk writes overlap. The fused kernel also emits the new
compute-precision (bf16/fp16, or fp32) weights, into a caller's tensor (the CPU weight cache) or back
to the store. The gradient comes either as a CPU tensor (the normal, overlapped path) or as a store
key (the deferred path used by exact gradient clipping, where gradients wait on SSD for the norm). A
master already in memory (``update``'s ``master_in``: the compute weights, where the master is them) is
updated where it is, and only the moments are read.

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
from fuyou.optim.compressed import QBLOCK, StateFormat, fused_adamw_q_, sr_key
from fuyou.optim.config import AdamWConfig


@dataclass(frozen=True)
class StateKeys:
    """Store keys of one stage's optimizer state (flat tensors; ``compressed.StateFormat`` says their
    dtypes: fp32 master, m and v by default)."""

    master: str
    exp_avg: str
    exp_avg_sq: str
    weights: str | None = None  # compute-precision weights in the store (None: kept in CPU memory)
    exp_avg_scale: str | None = None     # int8 moments: the block scales of m and v
    exp_avg_sq_scale: str | None = None

    @property
    def state(self) -> tuple[str, ...]:
        """The keys of the state's tensors, in ``StateFormat.roles`` order (master, m, v, scales)."""
        return tuple(k for k in (self.master, self.exp_avg, self.exp_avg_sq, self.exp_avg_scale,
                                 self.exp_avg_sq_scale) if k is not None)


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, end)`` of the flat state share one weight decay. ``torch_tail``: they are a
    tensor's last elements, which torch's fused AdamW rounds otherwise (``fused_adamw_(torch_tail=True)``)."""

    start: int
    end: int
    weight_decay: float
    torch_tail: bool = False


def decay_runs(segments: list[Segment]) -> list[Segment]:
    """Adjacent segments of one weight decay merged (the compressed state's kernel, whose reference is
    fuyou's own, has no tails to tell apart, and takes at most 64 segments a call)."""
    out: list[Segment] = []
    for sg in segments:
        if out and out[-1].end == sg.start and out[-1].weight_decay == sg.weight_decay:
            out[-1] = Segment(out[-1].start, sg.end, sg.weight_decay)
        else:
            out.append(Segment(sg.start, sg.end, sg.weight_decay))
    return out


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
                 num_threads: int | None = None, seed: int = 0):
        # A chunk must start on a checksum block for every dtype involved (the state's, 2-byte weights)
        # and, with int8 moments, on a quantisation block (``StateFormat.align``).
        self.fmt = StateFormat.of(cfg)
        align = self.fmt.align(store.checksum_block)
        self.chunk = max(align, (chunk_numel + align - 1) // align * align)
        self.store, self.pool, self.cfg, self.depth, self.num_threads = store, pool, cfg, depth, num_threads
        self.seed = seed  # of the stochastic rounding of a bf16 master (Note: [Compressed state])

    #: called as ``observer(key, nbytes, submitted, done)`` (perf_counter times) when one of the optimizer's
    #: reads completes, if set: the engine's ``--trace`` records the state's and saved gradients' SSD reads with it
    #: (an observer of every store read would see the weights' and activations' too, which have rows of their own)
    read_observer = None

    def _read(self, key: str, tensor: torch.Tensor, start: int = 0):
        observer, t0 = self.read_observer, time.perf_counter()
        fut = self.store.read_into(key, tensor, start=start)
        if observer is not None and hasattr(fut, "add_done_callback"):  # (kvikio's GPU-direct futures have none)
            fut.add_done_callback(lambda f: f.exception(0) or observer(key, f.nbytes, t0, time.perf_counter()))
        return fut

    def max_buffer_bytes(self, grad_bytes: int = 4, lowp_bytes: int = 4, largest_numel: int = 0) -> int:
        """The most pool memory one ``update`` holds at once (see the module docstring); with int8
        moments, the block scales of the largest stage (``largest_numel``) too."""
        return optimizer_buffer_bytes(self.fmt, self.chunk, self.depth, grad_bytes, lowp_bytes, largest_numel)

    def update(self, keys: StateKeys, grad: torch.Tensor | str, *, numel: int, segments: list[Segment],
               lr: float, step: int, grad_scale: float = 1.0, lowp_out: torch.Tensor | None = None,
               lowp_dtype: torch.dtype = torch.bfloat16, grad_dtype: torch.dtype | None = None,
               out_keys: StateKeys | None = None, resident: tuple[torch.Tensor, ...] | None = None,
               resident_src: tuple[torch.Tensor, ...] | None = None, on_weights_ready=None,
               stage: int = 0, master_in: torch.Tensor | None = None) -> UpdateStats:
        """One AdamW step of one stage; returns its stats. Blocks until every write is done.

        The state is read from ``keys`` and written to ``out_keys`` (default: the same, in place; a
        second copy makes crash-safe commits possible, see ``fuyou.engine.commit``).
        ``grad``: a flat CPU tensor of ``numel`` elements, or the store key of one (``grad_dtype``).
        ``lowp_out``: flat tensor receiving the new compute-precision weights; when None they go to
        the store under ``keys.weights`` as ``lowp_dtype``. ``step`` counts from 1.
        Errors (a corrupt chunk, a full disk) propagate after every buffer is released; the state on
        the SSD is then partly updated, which the caller must treat as lost (resume from a commit).

        ``resident``: the stage's state tensors held in CPU memory (flat, ``StateFormat.roles`` order).
        They are updated in place and nothing of them is read from or written to the store: the caller
        writes them back (the engine's commit flush) before anyone reads the store. ``resident_src``: a
        second copy of that state, read instead, ``resident`` being only written (a resident stage
        that speculates under exact clipping: adamw.cpp, Note: [Out of place]). ``on_weights_ready()``
        is called once the new compute weights are in ``lowp_out`` / the store. ``stage``: the stage's
        index (a bf16 master's stochastic rounding depends on it).

        ``master_in``: the stage's master as ``keys`` hold it, already in CPU memory (a master in the compute
        dtype is the compute weights: the weight cache, or the weights backward read: Note: [Master in
        memory] in fuyou/engine/engine.py). Nothing of the master is read from the store: the kernel
        updates it in place there, the new master is written to ``out_keys`` from there, and it is the
        new compute weights (no ``lowp_out``).
        """
        if master_in is not None:
            assert resident is None and lowp_out is None and master_in.numel() == numel, "master_in: streamed state"
            assert master_in.dtype == self.fmt.master_dtype, (master_in.dtype, self.fmt.master_dtype)
        if not self.fmt.exact:
            return self._update_q(keys, grad, numel=numel, segments=segments, lr=lr, step=step, grad_scale=grad_scale,
                                  lowp_out=lowp_out, lowp_dtype=lowp_dtype, grad_dtype=grad_dtype,
                                  out_keys=out_keys or keys, resident=resident, resident_src=resident_src,
                                  on_weights_ready=on_weights_ready, stage=stage, master_in=master_in)
        if resident is not None:
            return self._update_resident(keys, grad, resident, numel=numel, segments=segments, lr=lr, step=step,
                                         grad_scale=grad_scale, lowp_out=lowp_out, lowp_dtype=lowp_dtype,
                                         grad_dtype=grad_dtype, out_keys=out_keys or keys, src=resident_src,
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

        read = keys.state if master_in is None else keys.state[1:]  # (the master in memory: m and v only)

        def issue_read(span):
            s, e = span
            n = e - s
            bufs = [self.pool.acquire(4 * n, torch.float32) for _ in read]
            futs = [self._read(k, b.tensor, start=s) for k, b in zip(read, bufs)]
            if gkey:
                gb = self.pool.acquire(n * _size(gdtype), gdtype)
                bufs.append(gb)
                futs.append(self._read(gkey, gb.tensor, start=s))
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
                *master, m, v = (b.tensor for b in bufs[:len(read)])
                master = master[0] if master else master_in[s:e]
                g = bufs[len(read)].tensor if gkey else grad[s:e]
                wbuf = lowp = None
                if lowp_out is not None:
                    lowp = lowp_out[s:e]
                elif master_in is None and out_keys.weights != out_keys.master:  # else the new master is the weights
                    wbuf = self.pool.acquire((e - s) * _size(wdtype), wdtype)
                    bufs.append(wbuf)
                    lowp = wbuf.tensor
                self._step_chunk(s, e, segments, (master, m, v), s, g, lowp, lr, step, grad_scale, stats)
                wf = [self.store.write_from(k, t, start=s)
                      for k, t in zip(out_keys.state, (master, m, v))]
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
                    lowp: torch.Tensor | None, lr: float, step: int, grad_scale: float, stats: UpdateStats,
                    src=None) -> None:
        """The fused kernel over elements ``[s, e)``, one call per weight-decay segment. ``state`` is
        (master, m, v) holding elements from ``state_start`` on (a chunk buffer: ``s``; resident
        state: 0); ``g`` and ``lowp`` hold elements ``[s, e)`` (``lowp`` None: the master is the compute weights,
        no copy is made). ``src``: out of place, the state read
        (laid out as ``state``)."""
        c = self.cfg
        master, m, v = state
        fp32_copy = lowp is not None and lowp.dtype == torch.float32  # fp32 training: the compute copy is the master
        # (lowp None: no copy at all, the master being the compute weights)
        t0 = time.perf_counter()
        for seg in segments:
            a, b = max(seg.start, s), min(seg.end, e)
            if a >= b:
                continue
            st, ch = slice(a - state_start, b - state_start), slice(a - s, b - s)
            fused_adamw_(master[st], g[ch], m[st], v[st], lr=lr, beta1=c.beta1, beta2=c.beta2, eps=c.eps,
                         weight_decay=seg.weight_decay, step=step, grad_scale=grad_scale,
                         out_lowp=None if fp32_copy or lowp is None else lowp[ch], num_threads=self.num_threads,
                         src=None if src is None else tuple(t[st] for t in src), torch_tail=seg.torch_tail)
            if fp32_copy:
                lowp[ch].copy_(master[st])
        t1 = time.perf_counter()
        beat()  # progress, for the engine's deadlines (fuyou.watchdog)
        stats.kernel_s += t1 - t0
        stats.chunks.append((t0, t1))

    def _update_resident(self, keys: StateKeys, grad, resident, *, numel, segments, lr, step, grad_scale, lowp_out,
                         lowp_dtype, grad_dtype, out_keys, on_weights_ready, src=None) -> UpdateStats:
        """``update`` for state held in CPU memory: kernels over chunks (the same arithmetic per element,
        so bit-identical) and the compute weights to ``lowp_out`` or the store; the state stays in memory
        (read from ``src`` when given: ``update``'s ``resident_src``)."""
        t_start = time.perf_counter()
        stats = UpdateStats(params=numel)
        master, m, v = resident
        gkey = grad if isinstance(grad, str) else None
        wdtype = lowp_out.dtype if lowp_out is not None else lowp_dtype
        pending: list = []  # (future, buffer or None): the compute weights' writes, at most ``depth`` at once
        try:
            for s in range(0, numel, self.chunk):
                e = min(s + self.chunk, numel)
                gbuf = wbuf = None
                while len(pending) >= self.depth:  # each chunk's buffers go back as its write lands: held to the
                    f, buf = pending.pop(0)        # end, a stage larger than the pool waited on itself for ever (an
                    f.result()                     # audit: resident state, weights not cached, 51M parameters)
                    buf.release()
                try:
                    if gkey:
                        gbuf = self.pool.acquire((e - s) * _size(grad_dtype), grad_dtype)
                        self._read(gkey, gbuf.tensor, start=s).result()
                        stats.read_bytes += (e - s) * _size(grad_dtype)
                    g = gbuf.tensor if gbuf is not None else grad[s:e]
                    if lowp_out is None:
                        wbuf = self.pool.acquire((e - s) * _size(wdtype), wdtype)
                    lowp = wbuf.tensor if wbuf is not None else lowp_out[s:e]
                    self._step_chunk(s, e, segments, resident, 0, g, lowp, lr, step, grad_scale, stats, src=src)
                    if wbuf is not None:
                        pending.append((self.store.write_from(out_keys.weights, lowp, start=s), wbuf))
                        wbuf = None
                        stats.written_bytes += (e - s) * _size(wdtype)
                finally:
                    if gbuf is not None:  # (its read has landed, and the kernel is done with it)
                        gbuf.release()
                    if wbuf is not None:  # (no write took it: the kernel failed)
                        wbuf.release()
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


    # -- compressed state (fuyou/optim/compressed.py) ---------------------------------------------
    def _update_q(self, keys: StateKeys, grad, *, numel, segments, lr, step, grad_scale, lowp_out, lowp_dtype,
                  grad_dtype, out_keys, resident, on_weights_ready, stage, resident_src=None,
                  master_in=None) -> UpdateStats:
        """``update`` for a compressed state: the same pipeline with the format's tensors (the chunked
        ones chunk by chunk; int8 block scales read whole first and written whole last, 1/64 of the
        moments' bytes) and the compressed kernel. Resident state is updated in place, or from
        ``resident_src``; ``master_in`` as ``update``'s."""
        t_start = time.perf_counter()
        fmt, stats = self.fmt, UpdateStats(params=numel)
        src, dst = dict(zip(fmt.roles, keys.state)), dict(zip(fmt.roles, out_keys.state))
        held = dict(zip(fmt.roles, resident)) if resident is not None else None
        held_src = dict(zip(fmt.roles, resident_src)) if resident_src is not None else None
        gkey = grad if isinstance(grad, str) else None
        gdtype = grad_dtype if gkey else grad.dtype
        wdtype = lowp_out.dtype if lowp_out is not None else lowp_dtype
        key = sr_key(self.seed, step, stage)
        chunked, scaled = fmt.chunked, [t for t in fmt.tensors if t.per_block]
        read = [t for t in chunked if not (master_in is not None and t.role == "master")]  # from the store
        chunks = [(s, min(s + self.chunk, numel)) for s in range(0, numel, self.chunk)]
        reading: deque = deque()
        writing: deque = deque()
        scales: dict[str, object] = {}
        scale_reads: list = []

        def issue_read(span):
            s, e = span
            n, bufs, futs = e - s, [], []
            if held is None:
                for t in read:
                    bufs.append(self.pool.acquire(n * t.itemsize, t.dtype))
                    futs.append(self._read(src[t.role], bufs[-1].tensor, start=s))
            if gkey:
                bufs.append(self.pool.acquire(n * _size(gdtype), gdtype))
                futs.append(self._read(gkey, bufs[-1].tensor, start=s))
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
            for t in scaled:
                if held is not None:
                    scales[t.role] = held[t.role]
                    continue
                buf = self.pool.acquire(4 * t.numel(numel), torch.float32)
                scales[t.role] = buf
                scale_reads.append(self._read(src[t.role], buf.tensor))  # beside the first chunks'
                stats.read_bytes += 4 * t.numel(numel)
            for span in chunks[: self.depth]:
                issue_read(span)
            nxt = self.depth
            while reading:
                (s, e), bufs, futs = reading.popleft()
                try:
                    while scale_reads:
                        scale_reads.pop().result()
                    for f in futs:
                        f.result()
                except BaseException:
                    for b in bufs:
                        b.release()
                    raise
                wf: list = []
                try:
                    if held is None:
                        state = {t.role: b.tensor for t, b in zip(read, bufs)}
                        if master_in is not None:
                            state["master"] = master_in[s:e]
                    else:
                        state = {t.role: held[t.role][s:e] for t in chunked}
                    for t in scaled:
                        whole = scales[t.role] if held is not None else scales[t.role].tensor
                        state[t.role] = whole[s // QBLOCK: -(-e // QBLOCK)]
                    out_of_place = None  # the resident copy read (``resident_src``)
                    if held_src is not None:
                        out_of_place = {t.role: held_src[t.role][s:e] for t in chunked}
                        out_of_place.update({t.role: held_src[t.role][s // QBLOCK: -(-e // QBLOCK)] for t in scaled})
                    g = bufs[-1].tensor if gkey else grad[s:e]
                    wbuf = lowp = None
                    if lowp_out is not None:
                        lowp = lowp_out[s:e]
                    elif master_in is None and out_keys.weights != out_keys.master:  # else the master is the weights
                        wbuf = self.pool.acquire((e - s) * _size(wdtype), wdtype)
                        bufs.append(wbuf)
                        lowp = wbuf.tensor
                    segs = [(max(sg.start, s) - s, min(sg.end, e) - s, sg.weight_decay) for sg in decay_runs(segments)
                            if max(sg.start, s) < min(sg.end, e)]
                    c = self.cfg
                    t0 = time.perf_counter()
                    fused_adamw_q_(fmt, state, g, segments=segs, lr=lr, beta1=c.beta1, beta2=c.beta2, eps=c.eps, step=step,
                                   grad_scale=grad_scale, key=key, index0=s, out_lowp=lowp, num_threads=self.num_threads,
                                   src=out_of_place)
                    t1 = time.perf_counter()
                    beat()
                    stats.kernel_s += t1 - t0
                    stats.chunks.append((t0, t1))
                    if held is None:
                        for t in chunked:
                            wf.append(self.store.write_from(dst[t.role], state[t.role], start=s))
                            stats.written_bytes += (e - s) * t.itemsize
                    if wbuf is not None:
                        wf.append(self.store.write_from(out_keys.weights, lowp, start=s))
                        stats.written_bytes += (e - s) * _size(wdtype)
                except BaseException:  # the chunk's buffers are in no queue yet: release them here
                    for f in wf:
                        try:
                            f.result()
                        except BaseException:  # noqa: BLE001 -- the first error propagates
                            pass
                    for b in bufs:
                        b.release()
                    raise
                writing.append((wf, bufs))
                fault("optimizer", step - 1)
                while len(writing) > self.depth:
                    retire(writing.popleft())
                if nxt < len(chunks):
                    issue_read(chunks[nxt])
                    nxt += 1
            if held is None:  # the scales go out with the last chunks' writes
                writing.append(([self.store.write_from(dst[t.role], scales[t.role].tensor) for t in scaled], []))
                stats.written_bytes += sum(4 * t.numel(numel) for t in scaled)
            _drain(reading, writing, retire)
        finally:
            for f in scale_reads:  # an error before they were waited for: they still land in our buffers
                try:
                    f.result()
                except BaseException:  # noqa: BLE001 -- the first error propagates
                    pass
            _drain(reading, writing, retire)
            if held is None:
                for b in scales.values():
                    b.release()
        if on_weights_ready is not None:
            on_weights_ready()
        stats.busy_s = time.perf_counter() - t_start
        return stats


def optimizer_buffer_bytes(fmt: StateFormat, chunk: int, depth: int, grad_bytes: int, lowp_bytes: int,
                           largest_numel: int = 0) -> int:
    """Pool memory one update holds at most: ``2 * depth + 1`` chunks of the chunked state, a gradient
    read back and compute weights written; int8 moments add the largest stage's block scales (whole)."""
    per = sum(t.itemsize for t in fmt.chunked) + grad_bytes + lowp_bytes
    scales = sum(-(-4 * t.numel(largest_numel) // 4096) * 4096 for t in fmt.tensors if t.per_block)
    return (2 * depth + 1) * chunk * per + scales


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
