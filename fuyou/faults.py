"""Fault injection for kill-and-resume tests: named points where the process can kill itself.

With ``FUYOU_FAULT=name`` (or ``name@step``) in the environment, reaching point ``name`` (at that
step) sends SIGKILL to this process: no cleanup, no flush, as a power cut or the OOM killer would.
Points: ``forward``, ``backward``, ``optimizer`` (between two chunks of a stage's AdamW), ``redo``
(before a stage's update is redone under triggered exact clipping), ``commit``
(after the record's temporary file is written, before the rename), ``map_cache`` (data parallel:
once the ranks' shared weight cache is mapped, before its name is removed), ``run_dir`` (a new
run's directory and records made, before rank 0 tells the other ranks), ``saved`` (the run's end: its
weights saved, before its SSD state is deleted), ``reshard_copy`` (fuyou
reshard, while copying a tensor into the new state), ``reshard_switch`` (fuyou reshard, after its
decision, before the renames). Unset, it costs one dict lookup.

``FUYOU_FAULT=sigint:name`` (or ``sigint:name@step``) sends SIGINT instead, as Ctrl-C would, at a point
reached in the main thread, once a process (a point reached once a stage, as ``backward`` is, sent one a
stage, and one more than half a second after the first is a second Ctrl-C, "exit at once": an audit).
Points for it too: ``evaluation`` (before the second held-out batch of an evaluation, before its only one if
it has one round of batches; its step: which evaluation of this process, 0 the first), ``loop_start`` (after
the evaluation before the first step, before the ranks agree on a stop).

``FUYOU_FAULT=stall:name`` (or ``stall:name@step``) instead makes the thread reaching ``stall(name)``
hang for an hour, as a stuck disk or driver would: the engine's deadlines (``fuyou.watchdog``) must
turn that into an error. Points: ``optimizer`` (the worker, before a stage's update), ``load`` (a
weight load, before it reads).

``FUYOU_FAULT_RANK=r`` limits either to the data-parallel rank ``r`` (torchrun's ``RANK``).
"""

from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "FUYOU_FAULT"
RANK_ENV = "FUYOU_FAULT_RANK"  # with data parallelism: only the process of this RANK faults


def _this_rank() -> bool:
    want = os.environ.get(RANK_ENV)
    return want is None or want == os.environ.get("RANK", "0")


_interrupted = False  # a SIGINT was sent (once a process)


def fault(name: str, step: int | None = None) -> None:
    global _interrupted
    want = os.environ.get(FAULT_ENV)
    if not want or not _this_rank():
        return
    sig = signal.SIGKILL
    if want.startswith("sigint:"):
        if _interrupted:
            return
        sig, want = signal.SIGINT, want[len("sigint:"):]
    point, _, at = want.partition("@")
    if point == name and (not at or (step is not None and int(at) == step)):
        _interrupted = sig == signal.SIGINT
        os.kill(os.getpid(), sig)


def stall(name: str, step: int | None = None) -> None:
    want = os.environ.get(FAULT_ENV)
    if not want or not want.startswith("stall:") or not _this_rank():
        return
    point, _, at = want[len("stall:"):].partition("@")
    if point == name and (not at or (step is not None and int(at) == step)):
        time.sleep(3600)
