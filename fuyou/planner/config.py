"""Hardware profile: the figures the planner's cost model runs on."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class HardwareConfig(BaseModel):
    """A machine, by a profile written by `fuyou probe` or by preset names the planner knows."""

    model_config = ConfigDict(extra="forbid")

    profile: str | None = Field(None, description="Path of a hardware profile JSON written by `fuyou probe`.")
    gpu: str | None = Field(None, description="GPU preset name (for example 'rtx4090', 'a100-80gb', 'h100').")
    ssd: str | None = Field(None, description="SSD preset, optionally with a count: '12xd7-p5510'.")
    pcie: str | None = Field(None, description="PCIe generation and width, for example 'gen4x16'.")
