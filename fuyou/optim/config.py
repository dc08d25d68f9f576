"""AdamW hyper-parameters (shared by the reference trainer and the offloaded optimizer)."""

from __future__ import annotations

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
