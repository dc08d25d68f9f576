"""Recomputation in backward, with kept activations put back: the autograd side of DESIGN.md idea 2.

Policy, per block (``fuyou.policy.KeepPolicy``):

* ``checkpoint``: where the block's input lives between forward and backward (always kept);
* one tier per activation class (``ACT_CLASSES``: the outputs of fc2, proj, qkv, fc1): a kept class's
  matmul is *not* recomputed in backward: its stored output is put back in the recomputed graph by
  ``KnownLinear``, whose backward is the matmul's own (bit-identical gradients, tested);
* ``all``: the block's whole autograd graph is kept from the forward pass, every tensor autograd
  saves is swapped out through saved-tensor hooks (``GraphKeeper``), and backward runs **without any
  recomputation**.

Everything not kept is recomputed from the checkpoint. Where kept tensors go and how they come back
is the swapper's business (``swapper.py``).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from fuyou.engine.swapper import ActivationSwapper, Slot
from fuyou.models.precision import DTYPES
from fuyou.policy import KeepPolicy


def leaves(params: dict[str, Tensor], trainable: set[str] | None = None) -> dict[str, Tensor]:
    """Autograd leaves viewing the given tensors (gradients are taken with respect to these).
    ``trainable``: the local names that train (LoRA's adapters); the others are views autograd does not
    differentiate (a frozen base). None: every one trains."""
    return {k: v.detach().requires_grad_(trainable is None or k in trainable) for k, v in params.items()}


def _grads_wanted(wrt: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in wrt.items() if v.requires_grad}


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
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]  # a frozen base (LoRA): neither
        gw = x.reshape(-1, x.shape[-1]).t().mm(g2).t() if need_w else None
        gb = g2.sum(0) if ctx.has_bias and need_b else None
        return gx, gw, gb, None



class RecordContext:
    """Forward pass (no grad) of one block: computes each classed matmul and keeps the kept ones."""

    def __init__(self, swapper: ActivationSwapper, tag: str, policy: KeepPolicy):
        self.swapper, self.tag, self.policy = swapper, tag, policy
        self.slots: dict[str, Slot] = {}
        self._n: dict[str, int] = {}

    def linear(self, cls: str, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        y = F.linear(x, w, b)
        tier = self.policy.classes.get(cls)
        if tier is not None:
            name = _name(self._n, cls)
            self.slots[name] = self.swapper.put(f"act/{self.tag}/{name}", y, tier)
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
    have been reused) and from the kept input. ``weights``: the tensors the block's weights view, in
    an order the backward's (``bwd_weights``) repeats: the stage's flat weights, and with a quantised base
    (``fuyou.models.quant``) each dequantised matmul weight after it (``weight_bases``)."""

    def __init__(self, swapper: ActivationSwapper, prefix: str, tier: str, weights: list[Tensor], inp: Tensor):
        self.swapper, self.prefix, self.tier = swapper, prefix, tier
        self.fwd_weights, self.inp = weights, inp
        self.bwd_weights: list[Tensor] | None = None
        self.slots: list[Slot] = []
        # A tensor saved twice (one input of two matmuls, each through its own view) is kept once. Known by its
        # place, shape and version while the tensor it views lives (weakly held: memory freed and reused for
        # a new tensor at the same address is not taken for it).
        self._seen: dict[tuple, tuple[weakref.ref, Slot]] = {}

    def pack(self, t: Tensor):
        if t.device != self.inp.device:  # e.g. the CPU RNG state SDPA saves on CUDA: small, kept as is
            return ("raw", t)
        ptr = t.untyped_storage().data_ptr()
        for k, base in enumerate(self.fwd_weights):
            if ptr == base.untyped_storage().data_ptr():
                return ("w", k, t.storage_offset() - base.storage_offset(), t.shape, t.stride())
        if ptr == self.inp.untyped_storage().data_ptr():
            return ("in", 0, t.storage_offset() - self.inp.storage_offset(), t.shape, t.stride())
        seen = (ptr, t.storage_offset(), t.shape, t.stride(), t.dtype, t._version)
        ref, slot = self._seen.get(seen, (None, None))
        if ref is not None and ref() is not None:
            return ("s", slot)
        slot = self.swapper.put(f"{self.prefix}/saved{len(self.slots)}", t, self.tier)
        self.slots.append(slot)
        self._seen[seen] = (weakref.ref(t if t._base is None else t._base), slot)
        return ("s", slot)

    def forward_done(self) -> None:
        """The forward pass is over: its weight buffer is the streamer's again, and no tensor saved later can be
        one it saved."""
        self.fwd_weights = None
        self._seen.clear()

    def unpack(self, packed):
        kind = packed[0]
        if kind == "raw":
            return packed[1]
        if kind == "s":
            return self.swapper.get(packed[1])
        _, k, rel, shape, stride = packed
        base = (self.bwd_weights[k] if self.bwd_weights is not None else None) if kind == "w" else self.inp
        assert base is not None, "backward of a kept block before its weights were bound"
        return base.as_strided(shape, stride, base.storage_offset() + rel)

    def prefetch(self) -> None:
        for s in reversed(self.slots):
            self.swapper.prefetch(s)

    def free(self) -> None:
        for s in self.slots:
            self.swapper.free(s)
        self.slots.clear()
        self._seen.clear()


class BlockState:
    """What the forward pass left for one block's backward."""

    def __init__(self, checkpoint: Slot | None = None, slots: dict[str, Slot] | None = None,
                 graph: tuple | None = None, keeper: GraphKeeper | None = None, dtype: torch.dtype | None = None):
        self.checkpoint, self.slots, self.graph, self.keeper = checkpoint, slots or {}, graph, keeper
        self.dtype = dtype  # the block input's dtype, when the checkpoint is stored narrower

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


def forward_block(swapper: ActivationSwapper, tag: str, policy: KeepPolicy, fn, weights: list[Tensor],
                  params: dict[str, Tensor], x: Tensor, autocast_ctx,
                  trainable: set[str] | None = None) -> tuple[Tensor, BlockState]:
    """Run a block forward under ``policy``; return its output and what backward needs. ``tag`` names
    what it keeps in the swapper (``act/<tag>/...``): the block and the micro-batch, ``"3.0"``.
    A bf16 ``policy.checkpoint_dtype`` rounds the input first (fuyou/policy.py, Note: [Checkpoint dtype])."""
    wide, narrow = x.dtype, DTYPES[policy.checkpoint_dtype]
    rounds = narrow != wide
    if rounds:  # in place: the caller's stream tensor (a fresh stage output) becomes the rounded input,
        rounded = x.to(narrow)  # so no second fp32 copy is held through the block
        x.copy_(rounded)
    if policy.all is not None:
        inp = x.detach().requires_grad_(True)
        params = leaves(params, trainable)
        keeper = GraphKeeper(swapper, f"act/{tag}", policy.all, weights, inp)
        with torch.enable_grad(), autocast_ctx(), torch.autograd.graph.saved_tensors_hooks(keeper.pack, keeper.unpack):
            out = fn(params, inp, None)
        release_forward_weights(params)
        keeper.forward_done()
        return out.detach(), BlockState(graph=(out, inp, params), keeper=keeper)
    ck = swapper.put(f"act/{tag}/checkpoint", rounded if rounds else x, policy.checkpoint)
    rounded = None
    rec = RecordContext(swapper, tag, policy) if policy.classes else None
    with torch.no_grad(), autocast_ctx():
        out = fn(params, x, rec)
    return out, BlockState(checkpoint=ck, slots=rec.slots if rec else {}, dtype=wide if rounds else None)


def weight_bases(flat: Tensor, params: dict[str, Tensor], packing=None) -> list[Tensor]:
    """The tensors a stage's weights view, for ``GraphKeeper``: its flat weights, and with a quantised base
    each dequantised matmul weight (``PackedStage.quantised``, in its order)."""
    return [flat] + ([params[n] for n in packing.quantised] if packing is not None else [])


def release_forward_weights(params: dict[str, Tensor]) -> None:
    """Let go of a kept block's forward weights. Its graph keeps the leaves, which view the forward's
    weight buffer: without this the whole block's forward weights would stay on the device until its
    backward (the fake device's ledger found it). Backward rebuilds what it needs from the weights
    loaded then (``GraphKeeper.bwd_weights``); autograd needs only the leaves' identity."""
    for p in params.values():
        p.data = p.data.new_empty(0)


def backward_block(swapper: ActivationSwapper, state: BlockState, fn, weights: list[Tensor],
                   params: dict[str, Tensor], grad_out: Tensor, autocast_ctx,
                   before_grad=None, trainable: set[str] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Backward of one block (recomputing what the policy did not keep); returns the gradient of
    its input and of its parameters by local name (``trainable`` ones only: see ``leaves``).
    ``weights``: what the block's weights view (``weight_bases``), for a block kept whole.
    ``before_grad()`` runs after the recompute, before autograd allocates the parameter gradients."""
    if state.graph is not None:
        out, inp, wrt = state.graph
        wrt = _grads_wanted(wrt)
        state.keeper.bwd_weights = weights
        if before_grad is not None:
            before_grad()
        grads = torch.autograd.grad(out, [inp, *wrt.values()], grad_out)
        state.graph = None
    else:
        inp = swapper.get(state.checkpoint).detach()
        if state.dtype is not None:  # a bf16 checkpoint: widen it and let the narrow copy go at once
            inp = inp.to(state.dtype)
            swapper.free(state.checkpoint)
            state.checkpoint = None
        inp.requires_grad_(True)
        bound = leaves(params, trainable)
        rep = ReplayContext(swapper, state.slots) if state.slots else None
        with torch.enable_grad(), autocast_ctx():
            out = fn(bound, inp, rep)
        wrt = _grads_wanted(bound)
        if before_grad is not None:
            before_grad()
        grads = torch.autograd.grad(out, [inp, *wrt.values()], grad_out)
    state.free(swapper)
    return grads[0], dict(zip(wrt, grads[1:]))


