"""Where each stage's training state lives: one ``StageState`` record per stage.

Each stage's owned parameters are laid out as one flat vector (in ``Stage.params`` order), so the
state moves in a few large transfers: the store holds ``<stage>/master.<c>``, ``<stage>/exp_avg.<c>``,
``<stage>/exp_avg_sq.<c>`` (fp32, copies ``c`` = 0, 1, ...; see Note: [State copies]) and, unless they
are cached in CPU memory, ``<stage>/weights`` (the compute-precision copy the forward and backward
use). Parameter ``p`` is elements ``[offset, offset + numel)`` of each vector. A *resident* stage also
holds master, m and v in CPU memory (``resident``): its updates read and write them there, and the
state is written to a store copy only when it is committed or read (until then it is *dirty*).

Note: [State copies]
    ``cur`` names the copy holding the newest state (the next update reads it), ``committed`` the
    copy the last commit record names (never written until the next commit replaces it; None
    without crash-safe commits). An update writes ``target(keep_source)``: in place when it may, or
    a copy that is neither committed nor, when the update is speculative (exact clipping may have to
    redo it from its source, ``fuyou.engine.engine``), its source. So a stage needs one copy
    (commit 'none', no speculation), two (commits every step, or speculation without commits, or
    commits at an interval without speculation) or three (commits at an interval with speculation);
    ``copies_needed`` says which. ``cur`` and ``committed`` are the main thread's: it picks every
    job's source and target when it submits the job, and the worker runs jobs in that order.

States of a stage's compute weights, kept in ``StageState.updated``:

* *current* (event set): they reflect every optimizer job submitted so far; loads may proceed.
* *updating* (event clear): jobs for the stage were handed to the optimizer worker (``pending`` of
  them unfinished; a redo may follow a speculative update), which is rewriting master, moments and
  compute weights. Every load of the stage's weights waits for *current* (no stale weights, DESIGN.md
  idea 1), including prefetches of the next step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from fuyou.models import Stage
from fuyou.optim.adamw import torch_tail_width
from fuyou.optim.out_of_core import Segment, StateKeys


@dataclass
class ParamSlot:
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class StageState:
    """The offloaded state of one stage (see the module docstring for its states)."""

    stage: Stage
    numel: int
    slots: dict[str, ParamSlot]
    segments: list[Segment]
    copies: tuple[StateKeys, ...]          # the store copies of the optimizer state (Note: [State copies])
    cur: int = 0                           # the copy holding the newest state
    committed: int | None = None           # the copy the last commit record names
    cache: Tensor | None = None            # compute weights held in CPU memory, or None: on SSD
    resident: tuple[Tensor, ...] | None = None  # the state's tensors (master, m, v, ...) held in CPU memory too
    dirty: bool = False                    # resident state newer than every store copy
    held_grad: Tensor | None = None        # resident, exact clipping: the gradient waiting for the norm
    spare: tuple[Tensor, ...] | None = None  # resident, exact clipping: a second copy (engine.py, Note: [Spare copies])
    updated: threading.Event = field(default_factory=threading.Event)
    pending: int = 0                       # optimizer jobs submitted and not finished
    error: BaseException | None = None     # set when this stage's update failed
    owned: bool = True                     # data parallel: this rank holds the stage's optimizer state
    owner: int = 0                         # the rank that does (fuyou.engine.exchange)
    exchanged: threading.Event = field(default_factory=threading.Event)  # the owner's broadcast of the
    # last update's weights is done: the next update may overwrite them
    packing: object = None                 # LoRA over a quantised base: the stage's ``PackedStage`` (models/quant.py)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def index(self) -> int:
        return self.stage.index

    @property
    def wnumel(self) -> int:
        """Elements of the compute dtype the stage's stored weights take: its parameters, or its packed
        quantised base's bytes (``packing``)."""
        return self.numel if self.packing is None else self.packing.numel

    @property
    def keys(self) -> StateKeys:
        """Where the newest state is (updates read it)."""
        return self.copies[self.cur]

    def target(self, keep_source: bool) -> int:
        """The copy the next update (or flush) writes: ``cur`` itself unless it is committed or must be
        kept as the source of a redo; else a copy that is neither (Note: [State copies])."""
        avoid = {self.committed} | ({self.cur} if keep_source else set())
        if self.cur not in avoid:
            return self.cur
        free = [c for c in range(len(self.copies)) if c not in avoid]
        assert free, f"{self.stage.name}: {len(self.copies)} state copies cannot keep {sorted(avoid, key=str)}"
        return free[0]

    # -- the updated event (module docstring) ----------------------------------------------------
    def begin_update(self) -> None:
        """A job for this stage was submitted: loads wait until every pending job is done."""
        with self._lock:
            self.pending += 1
            self.updated.clear()

    def weights_ready(self) -> None:
        """The running job has written the compute weights: loads may go on unless more jobs follow."""
        with self._lock:
            if self.pending <= 1:
                self.updated.set()

    def end_update(self) -> None:
        with self._lock:
            self.pending -= 1
            if self.pending <= 0:
                self.pending = 0
                self.updated.set()

    def read_weights_from_master(self) -> None:
        """A master in the compute dtype is the compute weights (``StateFormat.master_is_compute``): this
        stage's loads read the current copy's master, and no separate weights copy is stored."""
        self.copies = tuple(replace(k, weights=k.master) for k in self.copies)

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Parameter-shaped views of a flat vector of this stage."""
        return {name: flat[s.offset:s.offset + s.numel].view(s.shape) for name, s in self.slots.items()}

    def weight_views(self, flat: Tensor, scratch: Tensor | None = None) -> dict[str, Tensor]:
        """The parameters from a flat vector of the stage's stored weights (``wnumel`` long): views, or
        with a quantised base the dequantised matmul weights (``PackedStage.unpack``, into ``scratch``)."""
        return self.views(flat) if self.packing is None else self.packing.unpack(flat, scratch)

    def flatten_grads(self, grads: dict[str, Tensor], out: Tensor) -> Tensor:
        for name, s in self.slots.items():
            out[s.offset:s.offset + s.numel].copy_(grads[name].reshape(-1))
        return out


def copies_needed(commit: str, every_step: bool, speculative: bool) -> int:
    """Store copies of one stage's fp32 state (Note: [State copies]). ``commit``: 'cow' or 'none';
    ``every_step``: commits after every step; ``speculative``: its updates may be redone (exact
    clipping, stages that are not resident)."""
    if commit != "cow":
        return 1 + speculative
    return 2 if every_step else 2 + speculative


def build_states(stages: list[Stage], weight_decay: float, n_copies: int = 2, int8: bool = False) -> list[StageState]:
    """One record per stage with ``n_copies`` store copies (the engine trims them per stage once it
    knows which stages are resident: ``copies_needed``). ``int8``: the moments are int8 codes, with
    block scales (``fuyou.optim.compressed``)."""
    states = []
    width = torch_tail_width()  # each tensor's last numel % width elements: rounded as torch does them
    for st in stages:
        slots, segments, off = {}, [], 0
        for name, spec in st.params.items():
            slots[name] = ParamSlot(off, spec.shape)
            wd = weight_decay if spec.decay else 0.0
            body = spec.numel - (spec.numel % width if width else 0)
            if segments and segments[-1].weight_decay == wd and segments[-1].end == off and not segments[-1].torch_tail:
                segments[-1] = Segment(segments[-1].start, off + body, wd)
            elif body:
                segments.append(Segment(off, off + body, wd))
            if body < spec.numel:
                segments.append(Segment(off + body, off + spec.numel, wd, torch_tail=True))
            off += spec.numel
        copies = tuple(StateKeys(f"{st.name}/master.{c}", f"{st.name}/exp_avg.{c}", f"{st.name}/exp_avg_sq.{c}",
                                 f"{st.name}/weights",
                                 *((f"{st.name}/exp_avg_scale.{c}", f"{st.name}/exp_avg_sq_scale.{c}") if int8 else ()))
                       for c in range(n_copies))
        s = StageState(st, off, slots, segments, copies)
        s.updated.set()
        s.exchanged.set()
        states.append(s)
    return states


#: SSD space a rank's store asks for beyond its tensors and its manifest: the commit record, the markers
STORE_FILES = 1024**2


def store_margin(nbytes: int, n_tensors: int, checksum_block: int, stripe_unit: int) -> tuple[int, int]:
    """SSD space a rank's store needs beyond its tensors' ``nbytes``: each tensor's padding to 4 KiB and the
    small files, spread over its directories; and its manifest, in the first (``store.layout.manifest_bytes``).
    The planner counts both. (A constant 64 MiB asked 1.5x a small state's space, and was a third of what
    a 175B state's manifest needs.)"""
    from fuyou.store.layout import ALIGN, manifest_bytes

    return ALIGN * n_tensors + STORE_FILES, manifest_bytes(nbytes, n_tensors, checksum_block, stripe_unit)


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
