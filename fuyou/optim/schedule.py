"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, steps: int, warmup: int, min_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    warmup = min(warmup, steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
