"""Where each stage's training state lives: one ``StageState`` record per stage.

Each stage's owned parameters are laid out as one flat vector (in ``Stage.params`` order), so the
state moves in a few large transfers: the store holds ``<stage>/master.<c>``, ``<stage>/exp_avg.<c>``,
``<stage>/exp_avg_sq.<c>`` (fp32; copies ``c`` = 0 and 1 with copy-on-write commits, see
``commit``) and, unless they are cached in CPU memory, ``<stage>/weights`` (the compute-precision
copy the forward and backward use). Parameter ``p`` is elements ``[offset, offset + numel)`` of
each vector. ``cur`` names the copy holding the last committed step's state. A *resident* stage also
holds master, m and v in CPU memory (``resident``): its updates read them there; with copy-on-write
commits they also write them to the store's next copy every step (the commit needs it), with commit
'none' they stay *dirty* in CPU memory and are written back only when the store is read or closed.

States of a stage's compute weights, kept in ``StageState.updated``:

* *current* (event set): they reflect every optimizer step submitted so far; loads may proceed.
* *updating* (event clear): the stage's gradients were handed to the optimizer worker, which is
  rewriting master, moments and compute weights. Every load of the stage's weights waits for
  *current* (no stale weights, DESIGN.md idea 1), including prefetches of the next step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fuyou.models import Stage
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
    copies: tuple[StateKeys, StateKeys]
    cow: bool = True                       # copy-on-write commits: updates write the other copy
    cur: int = 0                           # the copy updates read (the last committed state)
    cache: Tensor | None = None            # compute weights held in CPU memory, or None: on SSD
    resident: tuple[Tensor, Tensor, Tensor] | None = None  # fp32 master, m, v held in CPU memory too
    dirty: bool = False                    # resident state newer than the store's (commit 'none' only)
    updated: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None     # set when this stage's update failed

    @property
    def index(self) -> int:
        return self.stage.index

    @property
    def keys(self) -> StateKeys:
        """Where the current state is (updates read it)."""
        return self.copies[self.cur]

    @property
    def next_keys(self) -> StateKeys:
        """Where an update writes (the other copy with copy-on-write, else the same)."""
        return self.copies[1 - self.cur] if self.cow else self.copies[self.cur]

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Parameter-shaped views of a flat vector of this stage."""
        return {name: flat[s.offset:s.offset + s.numel].view(s.shape) for name, s in self.slots.items()}

    def flatten_grads(self, grads: dict[str, Tensor], out: Tensor) -> Tensor:
        for name, s in self.slots.items():
            out[s.offset:s.offset + s.numel].copy_(grads[name].reshape(-1))
        return out


def build_states(stages: list[Stage], weight_decay: float, cow: bool = True) -> list[StageState]:
    states = []
    for st in stages:
        slots, segments, off = {}, [], 0
        for name, spec in st.params.items():
            slots[name] = ParamSlot(off, spec.shape)
            wd = weight_decay if spec.decay else 0.0
            if segments and segments[-1].weight_decay == wd and segments[-1].end == off:
                segments[-1] = Segment(segments[-1].start, off + spec.numel, wd)
            else:
                segments.append(Segment(off, off + spec.numel, wd))
            off += spec.numel
        copies = tuple(StateKeys(f"{st.name}/master.{c}", f"{st.name}/exp_avg.{c}", f"{st.name}/exp_avg_sq.{c}",
                                 f"{st.name}/weights") for c in (0, 1))
        s = StageState(st, off, slots, segments, copies, cow)
        s.updated.set()
        states.append(s)
    return states


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
