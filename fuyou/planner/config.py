"""Hardware section of the config: which machine the planner's cost model describes.

A machine is given by a profile written by ``fuyou probe`` or by preset names the planner knows
(``fuyou/planner/hardware.py`` lists them with their sources), and any figure may be overridden by
a number. ``fuyou.planner.hardware.resolve`` turns this section into a ``HardwareProfile``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fuyou.units import parse_size


class HardwareConfig(BaseModel):
    """A machine, by a profile written by `fuyou probe` or by preset names the planner knows."""

    model_config = ConfigDict(extra="forbid")

    profile: str | None = Field(None, description="Path of a hardware profile JSON written by `fuyou probe`.")
    gpu: str | None = Field(None, description="GPU preset name (for example 'rtx4090', 'a100-80gb', 'h100').")
    ssd: str | None = Field(None, description="SSD preset, optionally with a count: '12xd7-p5510'.")
    pcie: str | None = Field(None, description="PCIe generation and width, for example 'gen4x16'.")
    gpu_tflops: float | None = Field(
        None, gt=0, description="Override: sustained dense matmul TFLOPS of the GPU in the compute dtype.")
    gpu_mem: int | None = Field(None, gt=0, description="Override: GPU memory in bytes (or '24GiB').")
    gpu_reserve: int | None = Field(
        None, ge=0, description="GPU memory the plan leaves unused, bytes (or '2GiB'); default: the CUDA context "
        "(768 MiB) and 5 % of the rest, as the engine leaves of a GPU's free memory when offload.gpu_mem is unset.")
    ssd_read: float | None = Field(None, gt=0, description="Override: aggregate SSD read bandwidth, GB/s (1e9 B/s).")
    ssd_write: float | None = Field(None, gt=0, description="Override: aggregate SSD write bandwidth, GB/s.")
    ssd_capacity: int | None = Field(None, gt=0, description="Override: usable SSD space in bytes (or '30TB').")
    pcie_bw: float | None = Field(None, gt=0, description="Override: host<->GPU bandwidth each way, GB/s.")
    ssd_tbw: float | None = Field(
        None, gt=0, description="Override: rated endurance of one drive in TB written (the datasheet's TBW).")
    cpu_adam: float | None = Field(
        None, gt=0, description="Override: CPU AdamW throughput in parameters per second (e.g. 3e9).")
    gpu_link: float | None = Field(
        None, ge=0, description="Override: GPU-to-GPU bandwidth per direction for data parallelism's gradient sums, "
        "GB/s (NVLink); 0: none, through host memory over PCIe.")

    @field_validator("gpu_mem", "ssd_capacity", "gpu_reserve", mode="before")
    @classmethod
    def _size(cls, v):
        return None if v is None else parse_size(v)
