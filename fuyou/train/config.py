"""Training-run configuration: steps, batch, schedule, precision, logging."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


class TrainConfig(BaseModel):
    """One training run. Tokens per step = micro_batch_size * grad_accum * data.seq_len."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int = Field(240, ge=1, description="Optimizer steps to run (or give train.epochs instead).")
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training data instead of train.steps: steps = epochs x rows "
        "(fine-tuning examples) or tokens (text) / the step's batch, rounded up.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward/backward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    global_batch: int | None = Field(
        None, ge=1, description="Sequences per optimizer step, split into grad_accum micro-batches of "
        "micro_batch_size: give one of those two to set the split, or neither and the largest micro-batch "
        "of at most 16 sequences that divides it is used (`--plan auto`: the planner's fastest split that fits)."
    )
    warmup_steps: int = Field(20, ge=0, description="Linear learning-rate warm-up steps (capped at `steps`).")
    warmup_ratio: float | None = Field(
        None, ge=0, le=1, description="Warm-up as a share of the steps (rounded up); when set it replaces warmup_steps.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="After warm-up: 'cosine' or 'linear' decay to min_lr_ratio x the peak, or 'constant'.")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="The schedule decays to this fraction of the peak learning rate."
    )
    grad_clip: float | None = Field(
        1.0, gt=0, description="Global gradient-norm clipping threshold; unset (or 'none' on the CLI) disables it."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Compute precision: 'bf16' (autocast, fp32 master weights and moments), 'fp32', or "
        "'auto': bf16 where the compute device multiplies bf16 natively (a GPU from Ampere on, a CPU with AVX-512 "
        "or AMX), else fp32 (bf16 on an AVX2 CPU runs ~40x slower). Resolved when the config is read: the run's "
        "config.toml records the precision it trained in."
    )
    device: Literal["auto", "cpu", "cuda", "fake"] = Field(
        "auto", description="Compute device; 'auto' picks CUDA when available, else the CPU. 'fake' (for "
        "development): CPU compute through the engine's CUDA code paths, with CUDA's asynchrony modelled "
        "and its stream and memory rules checked (fuyou.engine.device)."
    )
    seed: int = Field(1234, ge=0, le=2**32 - 1, description="Seed of weight init and data order (0 to 2**32 - 1: the "
                      "generators' seeds are derived from it; a clock in nanoseconds overflowed them, a pass).")
    eval_every: int = Field(80, ge=0, description="Evaluate every N steps (0: only at start and end).")
    eval_batches: int = Field(8, ge=1, description="Held-out batches per evaluation.")
    log_every: int = Field(10, ge=1, description="Write a metrics line every N steps.")
    save_every: int = Field(
        0, ge=0, description="Write a snapshot (snapshots/step-N/model.safetensors, exportable with `fuyou export`) "
        "every N steps, between two steps (0: only the final weights).")
    keep_snapshots: int = Field(2, ge=1, description="Snapshots kept (the oldest are deleted).")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (default: torch's choice, usually the core count)."
    )

    _auto_split: bool = PrivateAttr(False)  # global_batch split by the rule above, not by the user

    @property
    def warmup(self) -> int:
        """Warm-up steps in effect (``warmup_ratio`` of the steps, else ``warmup_steps``)."""
        if self.warmup_ratio is not None:
            return math.ceil(self.warmup_ratio * self.steps)
        return self.warmup_steps

    @model_validator(mode="after")
    def _resolve_precision(self):
        if self.precision == "auto":  # (in place, and not counted as given: ``precision_chosen``)
            from fuyou.models.precision import auto_precision

            self.__dict__["precision"] = auto_precision(self.device)
            self.model_fields_set.discard("precision")
        return self

    @property
    def precision_chosen(self) -> bool:
        """Whether ``precision`` is auto's choice on this machine rather than a value given (a config a run
        wrote gives the one it chose)."""
        return "precision" not in self.model_fields_set

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if self.epochs is not None and "steps" in self.model_fields_set:
            raise ValueError(f"train.steps={self.steps} and train.epochs={self.epochs} both given; give one")
        return self

    @model_validator(mode="after")
    def _split(self):
        g = self.global_batch
        if g is None:
            return self
        mb, ga = "micro_batch_size" in self.model_fields_set, "grad_accum" in self.model_fields_set
        if mb and ga:
            if self.micro_batch_size * self.grad_accum != g:
                raise ValueError(f"micro_batch_size {self.micro_batch_size} x grad_accum {self.grad_accum} is not "
                                 f"global_batch {g}: set two of the three")
        elif mb or ga:
            part = self.micro_batch_size if mb else self.grad_accum
            if g % part:
                raise ValueError(f"global_batch {g} is not a multiple of "
                                 f"{'micro_batch_size' if mb else 'grad_accum'} {part}")
            other = g // part
            object.__setattr__(self, "grad_accum" if mb else "micro_batch_size", other)
        else:
            b = max(d for d in range(1, min(g, 16) + 1) if g % d == 0)
            object.__setattr__(self, "micro_batch_size", b)
            object.__setattr__(self, "grad_accum", g // b)
            self._auto_split = True
        return self

    @field_validator("grad_clip", mode="before")
    @classmethod
    def _none(cls, v):
        return None if isinstance(v, str) and v.lower() in ("none", "off") else v
