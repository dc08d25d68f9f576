"""AdamW hyper-parameters (shared by the reference trainer and the offloaded optimizer)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class AdamWConfig(BaseModel):
    """AdamW with decoupled weight decay, as ``torch.optim.AdamW`` defines it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lr: float = Field(1e-3, ge=0, description="Peak learning rate (the schedule scales it).")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam's first-moment decay.")
    beta2: float = Field(0.95, ge=0, lt=1, description="Adam's second-moment decay.")
    eps: float = Field(1e-8, gt=0, description="Adam's denominator epsilon.")
    weight_decay: float = Field(
        0.1, ge=0, description="Decoupled weight decay, applied to matrices only (not norms, biases, embeddings)."
    )
    master: Literal["fp32", "bf16"] = Field(
        "fp32", description="How the master weights are stored: 'fp32' (exact) or 'bf16' (2 bytes, updated with "
        "stochastic rounding, deterministic in seed, step and position; fuyou/optim/compressed.py).")
    moments: Literal["fp32", "bf16", "int8"] = Field(
        "fp32", description="How Adam's moments are stored: 'fp32' (exact), 'bf16' (round to nearest) or 'int8' "
        "(block-wise 8-bit minifloat codes with an fp32 scale per 256 elements; fuyou/optim/compressed.py).")
