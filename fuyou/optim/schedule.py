"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, steps: int, warmup: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up over ``warmup`` steps, then
    ``schedule``: cosine or linear decay towards ``min_ratio`` x ``peak``, which step ``steps`` (the one
    after the last) would reach, as Hugging Face's schedulers do (the last step's rate is one decay step
    above it); or constant."""
    warmup = min(warmup, steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    shape = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (min_ratio + (1 - min_ratio) * shape)


def lr_of(cfg, step: int) -> float:
    """``lr_at`` for a ``FuyouConfig``."""
    t = cfg.train
    return lr_at(step, cfg.optim.lr, t.steps, t.warmup, t.min_lr_ratio, t.lr_schedule)
