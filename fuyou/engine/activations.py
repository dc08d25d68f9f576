"""Activation swapping: keep chosen activations for backward, on the GPU, in CPU memory or on SSD,
instead of recomputing them (DESIGN.md idea 2).

Policy, per block (``BlockPolicy``):

* ``checkpoint``: where the block's input lives between forward and backward (always kept);
* one tier per activation class (``ACT_CLASSES``: the outputs of fc2, proj, qkv, fc1): a kept class's
  matmul is *not* recomputed in backward: its stored output is put back in the recomputed graph by
  ``KnownLinear``, whose backward is the matmul's own (bit-identical gradients, tested);
* ``all``: the block's whole autograd graph is kept from the forward pass, every tensor autograd
  saves is swapped out through saved-tensor hooks, and backward runs **without any recomputation**.

Tiers: ``gpu`` (stays on the compute device), ``cpu`` (CPU memory, up to ``cpu_bytes`` of the
budget, then overflow to SSD), ``ssd`` (through the store). Everything not kept is recomputed from
the checkpoint.

The SSD path is a bounded pipeline: a tensor leaves the device chunk by chunk into a fixed set of
staging buffers (``staging``, page-locked on CUDA) and each chunk goes on to the store as an
asynchronous write; a chunk buffer returns to the pool when its write completes. So CPU memory never
holds more than the staging buffers, however large the activations. In backward, ``prefetch``
starts bringing a block's tensors back (in reverse block order, ``prefetch_blocks`` ahead) on a
reader thread, chunk by chunk through the same staging pool. Every chunk read from SSD is checked
against its CRC32 (the store's checksums): a corrupt or truncated activation raises
``StoreCorruptError`` naming the key and file and is never trained on.

Note: [Activation stream hand-off] On CUDA a tensor leaving the device is copied into a staging
buffer on ``d2h_stream`` after an event recorded on the compute stream; the writer waits on that
copy's event (in the writer, not in the hot loop). Coming back, the H2D copy runs on ``h2d_stream``
and ``get`` makes the compute stream wait on its event.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from fuyou import watchdog
from fuyou.engine.trace import Tracer


@dataclass
class BlockPolicy:
    """What one block keeps for backward (see the module docstring); tiers or ``None`` (recompute)."""

    checkpoint: str = "gpu"
    classes: dict[str, str] = field(default_factory=dict)   # class -> tier, only kept classes
    all: str | None = None                                    # keep the whole graph in this tier

    @property
    def recomputes(self) -> bool:
        return self.all is None


def leaves(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Autograd leaves viewing the given tensors (gradients are taken with respect to these)."""
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


class KnownLinear(torch.autograd.Function):
    """``F.linear(x, w, b)`` whose output is already known (kept from the forward pass): returns it
    without the matmul, and back-propagates exactly as the matmul does (same kernels, same layouts)."""

    @staticmethod
    def forward(ctx, x, w, b, y):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = g2.mm(w).view(x.shape)
        gw = x.reshape(-1, x.shape[-1]).t().mm(g2).t()
        gb = g2.sum(0) if ctx.has_bias else None
        return gx, gw, gb, None


@dataclass
class Slot:
    """One kept activation: where it went and how to get it back."""

    key: str
    tier: str                       # tier actually used (cpu may have overflowed to ssd)
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensor: Tensor | None = None    # gpu/cpu tiers
    writes: list = field(default_factory=list)   # ssd: futures of the chunk writes
    fetch: Future | None = None     # a started read-back
    nbytes: int = 0


class ActivationSwapper:
    """Puts activations into tiers and brings them back (module docstring)."""

    def __init__(self, store, device: torch.device, cpu_bytes: int, staging_pool, chunk_bytes: int,
                 tracer: Tracer, counters_ref):
        self.store, self.device, self.cpu_bytes, self.pool = store, device, cpu_bytes, staging_pool
        align = store.checksum_block
        self.chunk_bytes = max(align, chunk_bytes // align * align)
        self.tracer, self._counters = tracer, counters_ref
        self.cpu_used = 0
        self._lock = threading.Lock()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuyou-act-read")
        if device.type == "cuda":
            self.d2h_stream = torch.cuda.Stream(device)
            self.h2d_stream = torch.cuda.Stream(device)

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
            slot.tensor = t
            c.act_gpu_bytes += nbytes
            return slot
        if tier == "cpu":
            with self._lock:
                fits = self.cpu_used + nbytes <= self.cpu_bytes
                if fits:
                    self.cpu_used += nbytes
            if fits:
                # CUDA: a synchronous D2H copy (a marked sync point of the main thread; the CPU tier
                # trades it for keeping SSD bandwidth free)
                slot.tensor = t if self.device.type == "cpu" else t.to("cpu", non_blocking=False)
                c.act_cpu_bytes += nbytes
                return slot
            slot.tier = "ssd"  # CPU share used up: overflow to SSD
        self._write_ssd(slot, t)
        return slot

    def _write_ssd(self, slot: Slot, t: Tensor) -> None:
        flat = t.contiguous().view(-1)
        if slot.key not in self.store:
            self.store.allocate(slot.key, (flat.numel(),), flat.dtype)
        per = self.chunk_bytes // flat.element_size()
        t0 = time.perf_counter()
        for a in range(0, flat.numel(), per):
            n = min(per, flat.numel() - a)
            buf = watchdog.acquire(self.pool, n * flat.element_size(), flat.dtype,
                                   f"a staging buffer for activation {slot.key}")  # waits: bounded staging
            if self.device.type == "cuda":
                self.d2h_stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.d2h_stream):
                    buf.tensor.copy_(flat[a:a + n], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(self.d2h_stream)
                ev.synchronize()  # see Note: [Activation stream hand-off]
            else:
                buf.tensor.copy_(flat[a:a + n])
            fut = self.store.write_from(slot.key, buf.tensor, start=a)
            fut.add_done_callback(lambda _f, b=buf: b.release())
            slot.writes.append(fut)
        c = self._counters()
        c.act_ssd_write_bytes += slot.nbytes
        c.ssd_write_bytes += slot.nbytes
        self.tracer.add(f"swap out {slot.key}", "d2h", t0, time.perf_counter(), bytes=slot.nbytes)

    # -- back ------------------------------------------------------------------------------------
    def prefetch(self, slot: Slot) -> None:
        """Start bringing an SSD slot back (no-op for the other tiers or when already started)."""
        if slot.tier == "ssd" and slot.fetch is None:
            slot.fetch = self._reader.submit(self._read_ssd, slot)

    def get(self, slot: Slot) -> Tensor:
        """The kept tensor on the compute device; waits for its read-back if it was on SSD."""
        if slot.tier == "gpu":
            return slot.tensor
        if slot.tier == "cpu":
            if self.device.type == "cpu":
                return slot.tensor
            return slot.tensor.to(self.device, non_blocking=True)
        self.prefetch(slot)
        t0 = time.perf_counter()
        out, ev = watchdog.result(slot.fetch, f"the activation {slot.key} read back from SSD", slot.nbytes)
        waited = time.perf_counter() - t0
        self._counters().wait_activations_s += waited
        if waited > 1e-4:
            self.tracer.add(f"wait activation {slot.key}", "wait", t0, t0 + waited)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        return out

    def _read_ssd(self, slot: Slot):
        for f in slot.writes:  # a read must not overtake its own writes
            watchdog.result(f, f"the write of activation {slot.key}")
        numel = slot.nbytes // torch.empty((), dtype=slot.dtype).element_size()
        out = torch.empty(numel, dtype=slot.dtype, device=self.device)
        per = self.chunk_bytes // out.element_size()
        t0 = time.perf_counter()
        ev = None
        for a in range(0, numel, per):
            n = min(per, numel - a)
            with watchdog.acquire(self.pool, n * out.element_size(), slot.dtype, f"a buffer to read {slot.key}") as buf:
                watchdog.result(self.store.read_into(slot.key, buf.tensor, start=a),  # CRC32 checked here
                                f"the read of activation {slot.key}")
                if self.device.type == "cuda":
                    with torch.cuda.stream(self.h2d_stream):
                        out[a:a + n].copy_(buf.tensor, non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(self.h2d_stream)
                    ev.synchronize()  # the staging buffer is reused after this (reader thread only)
                else:
                    out[a:a + n].copy_(buf.tensor)
        c = self._counters()
        c.act_ssd_read_bytes += slot.nbytes
        c.ssd_read_bytes += slot.nbytes
        self.tracer.add(f"swap in {slot.key}", "ssd-read", t0, time.perf_counter(), bytes=slot.nbytes)
        return out.view(slot.shape), ev

    def free(self, slot: Slot) -> None:
        """The activation is no longer needed (its block's backward is done)."""
        if slot.tier == "cpu":
            with self._lock:
                self.cpu_used -= slot.nbytes
        slot.tensor = None
        slot.fetch = None

    def close(self) -> None:
        self._reader.shutdown(wait=True)


class RecordContext:
    """Forward pass (no grad) of one block: computes each classed matmul and keeps the kept ones."""

    def __init__(self, swapper: ActivationSwapper, block: int, policy: BlockPolicy):
        self.swapper, self.block, self.policy = swapper, block, policy
        self.slots: dict[str, Slot] = {}
        self._n: dict[str, int] = {}

    def linear(self, cls: str, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        y = F.linear(x, w, b)
        tier = self.policy.classes.get(cls)
        if tier is not None:
            name = _name(self._n, cls)
            self.slots[name] = self.swapper.put(f"act/{self.block}/{name}", y, tier)
        return y


class ReplayContext:
    """Recompute of one block (with grad): kept matmul outputs come back through ``KnownLinear``."""

    def __init__(self, swapper: ActivationSwapper, slots: dict[str, Slot]):
        self.swapper, self.slots = swapper, slots
        self._n: dict[str, int] = {}

    def linear(self, cls: str, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        name = _name(self._n, cls)
        slot = self.slots.get(name)
        if slot is None:
            return F.linear(x, w, b)
        y = self.swapper.get(slot)
        if torch.is_autocast_enabled(x.device.type):  # the casts autocast would have made for F.linear
            dt = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dt), w.to(dt)
            b = b.to(dt) if b is not None else None
        return KnownLinear.apply(x, w, b, y)


def _name(counter: dict[str, int], cls: str) -> str:
    n = counter.get(cls, 0)
    counter[cls] = n + 1
    return f"{cls}.{n}"



class GraphKeeper:
    """Saved-tensor hooks of a block kept whole (policy ``all``): every tensor autograd saves leaves
    through the swapper, except views of the block's weights and of its input, which are recorded
    as markers and rebuilt in backward from the weights loaded then (the forward's weight buffer may
    have been reused) and from the kept input."""

    def __init__(self, swapper: ActivationSwapper, prefix: str, tier: str, weights: Tensor, inp: Tensor):
        self.swapper, self.prefix, self.tier = swapper, prefix, tier
        self.fwd_weights, self.inp = weights, inp
        self.bwd_weights: Tensor | None = None
        self.slots: list[Slot] = []

    def pack(self, t: Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr == self.fwd_weights.untyped_storage().data_ptr():
            return ("w", t.storage_offset() - self.fwd_weights.storage_offset(), t.shape, t.stride())
        if ptr == self.inp.untyped_storage().data_ptr():
            return ("in", t.storage_offset() - self.inp.storage_offset(), t.shape, t.stride())
        slot = self.swapper.put(f"{self.prefix}/saved{len(self.slots)}", t, self.tier)
        self.slots.append(slot)
        return ("s", slot)

    def unpack(self, packed):
        kind = packed[0]
        if kind == "s":
            return self.swapper.get(packed[1])
        _, rel, shape, stride = packed
        base = self.bwd_weights if kind == "w" else self.inp
        assert base is not None, "backward of a kept block before its weights were bound"
        return base.as_strided(shape, stride, base.storage_offset() + rel)

    def prefetch(self) -> None:
        for s in reversed(self.slots):
            self.swapper.prefetch(s)

    def free(self) -> None:
        for s in self.slots:
            self.swapper.free(s)
        self.slots.clear()


class BlockState:
    """What the forward pass left for one block's backward."""

    def __init__(self, checkpoint: Slot | None = None, slots: dict[str, Slot] | None = None,
                 graph: tuple | None = None, keeper: GraphKeeper | None = None):
        self.checkpoint, self.slots, self.graph, self.keeper = checkpoint, slots or {}, graph, keeper

    def prefetch(self, swapper: ActivationSwapper) -> None:
        if self.keeper is not None:
            self.keeper.prefetch()
            return
        if self.checkpoint is not None:
            swapper.prefetch(self.checkpoint)
        for s in self.slots.values():
            swapper.prefetch(s)

    def free(self, swapper: ActivationSwapper) -> None:
        if self.keeper is not None:
            self.keeper.free()
        if self.checkpoint is not None:
            swapper.free(self.checkpoint)
        for s in self.slots.values():
            swapper.free(s)


def forward_block(swapper: ActivationSwapper, block: int, policy: BlockPolicy, fn, weights: Tensor,
                  params: dict[str, Tensor], x: Tensor, autocast_ctx) -> tuple[Tensor, BlockState]:
    """Run block ``block`` forward under ``policy``; return its output and what backward needs."""
    if policy.all is not None:
        inp = x.detach().requires_grad_(True)
        params = leaves(params)
        keeper = GraphKeeper(swapper, f"act/{block}", policy.all, weights, inp)
        with torch.enable_grad(), autocast_ctx(), torch.autograd.graph.saved_tensors_hooks(keeper.pack, keeper.unpack):
            out = fn(params, inp, None)
        return out.detach(), BlockState(graph=(out, inp, params), keeper=keeper)
    ck = swapper.put(f"act/{block}/checkpoint", x, policy.checkpoint)
    rec = RecordContext(swapper, block, policy) if policy.classes else None
    with torch.no_grad(), autocast_ctx():
        out = fn(params, x, rec)
    return out, BlockState(checkpoint=ck, slots=rec.slots if rec else {})


def backward_block(swapper: ActivationSwapper, state: BlockState, fn, weights: Tensor,
                   params: dict[str, Tensor], grad_out: Tensor, autocast_ctx) -> tuple[Tensor, dict[str, Tensor]]:
    """Backward of one block (recomputing what the policy did not keep); returns the gradient of
    its input and of its parameters by local name."""
    if state.graph is not None:
        out, inp, wrt = state.graph
        state.keeper.bwd_weights = weights
        grads = torch.autograd.grad(out, [inp, *wrt.values()], grad_out)
        state.graph = None
    else:
        inp = swapper.get(state.checkpoint).detach().requires_grad_(True)
        wrt = leaves(params)
        rep = ReplayContext(swapper, state.slots) if state.slots else None
        with torch.enable_grad(), autocast_ctx():
            out = fn(wrt, inp, rep)
        grads = torch.autograd.grad(out, [inp, *wrt.values()], grad_out)
    state.free(swapper)
    return grads[0], dict(zip(wrt, grads[1:]))


def block_policies(spec: str, n_layer: int) -> dict[int, BlockPolicy]:
    """Engine policies from ``--act-policy`` (the planner's human form, or a JSON file path). A block
    whose four classes are all kept in one tier is kept whole (no recomputation at all)."""
    from pathlib import Path

    from fuyou.planner.policy import ActivationPolicy, parse_act_policy

    if spec.endswith(".json") and Path(spec).is_file():
        pol = ActivationPolicy.from_json(Path(spec).read_text())
        pol.check_layers(n_layer)
    else:
        pol = parse_act_policy(spec, n_layer)
    return engine_policies(pol, n_layer)


def engine_policies(pol, n_layer: int) -> dict[int, BlockPolicy]:
    """The engine's per-block policies for a planner ``ActivationPolicy`` (see ``block_policies``)."""
    from fuyou.planner.policy import CLASSES

    out = {}
    for i in range(n_layer):
        b = pol.block(i)
        kept = {c: getattr(b, c) for c in CLASSES if getattr(b, c) != "recompute"}
        tiers = set(kept.values())
        if len(kept) == len(CLASSES) and len(tiers) == 1:
            out[i] = BlockPolicy(checkpoint=b.checkpoint, all=tiers.pop())
        else:
            out[i] = BlockPolicy(checkpoint=b.checkpoint, classes=kept)
    return out
