"""What the training loop (``fuyou.train.loop``) needs of a trainer: the in-memory reference trainer and
the three-tier engine both provide it, and the loop uses nothing else of either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass
class StepStats:
    """One optimizer step as the loop reports it."""

    loss: float
    lr: float
    grad_norm: float | None
    tokens: int            # tokens the step ran (micro-batches x sequences x length, padding included)
    loss_tokens: int = 0   # of those, the tokens with a target (the loss is their mean)


class EvaluationStopped(Exception):
    """``evaluate(should_stop)``: the stop was asked for between two held-out batches, and the evaluation
    abandoned there (its loss would be of part of the held-out data)."""


class Trainer(Protocol):
    device: torch.device
    clipping: bool
    start_step: int          # the first step to run (after a resume: the last commit's)
    resumed: bool
    failed: bool             # set by the loop when anything raised: ``close`` must not wait or write
    completed: bool          # set by the loop once the final weights are saved: ``close`` may free the state
    trace_step: int          # the step whose tasks ``--trace`` records
    batches: object          # the training batches (``fuyou.data.batches.make_batches``): batch(i), epochs(n)

    def startup_lines(self) -> list[str]:
        """What the loop prints before the first step (the memory plan, clipping, commits)."""

    def train_step(self, step: int) -> StepStats: ...

    def step_counters(self) -> dict | None:
        """The last step's counters (seconds and bytes by kind), or None."""

    def evaluate(self, should_stop=None) -> float | None:
        """The mean loss over the held-out batches, or None without any. ``should_stop()`` is asked before
        each batch (on every rank at the same points: it may agree over them) and, when true, the evaluation
        is abandoned by raising :class:`EvaluationStopped`."""

    def commit(self, steps_done: int) -> None:
        """Make the state after ``steps_done`` steps the one a resume starts from (no-op in memory)."""

    def write_trace(self, path: str | Path) -> None:
        """Write the trace of ``trace_step`` (after its background work is done)."""

    def state_location(self) -> str | None:
        """Where a state that outlives the run stays (``run.save_weights=false``), or None."""

    def master_chunks(self): ...

    def close(self) -> None: ...
