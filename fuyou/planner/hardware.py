"""Hardware presets and the resolved ``HardwareProfile`` the cost model runs on.

Every preset figure is what a workload like fuyou's can sustain, not a marketing peak, and names its
source. Where a datasheet gives a peak that real kernels do not reach, the preset keeps the datasheet
value and a *named setting* (``MATMUL_EFFICIENCY``, ``PCIE_EFFICIENCY``, ``STRIPE_EFFICIENCY``)
documents the discount, so a reader can see and change it.

A profile written by ``fuyou probe`` holds measured figures instead (no discount is applied to them).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, conlist, field_validator

from fuyou.errors import ConfigError
from fuyou.units import format_size
from fuyou.planner.config import HardwareConfig

GB = 1e9
GiB = 1024**3

#: Fraction of the datasheet dense bf16 tensor-core peak that large transformer matmuls sustain in
#: training (cuBLAS on the GEMM shapes of GPT-3-class blocks reaches 70-80% of peak; Megatron-LM
#: reports 52% MFU for the whole model, which includes non-matmul time; we take 0.75 for matmuls,
#: and ``BLOCK_EFFICIENCY`` for the rest of the block).
MATMUL_EFFICIENCY = 0.75
#: A block's time beyond its matmuls (attention softmax, norms, activations, launches) on a GPU, as a
#: factor on the matmul rate: 0.85 (fused/flash attention at sequence 1024-2048). A probe measures it.
BLOCK_EFFICIENCY = 0.85
#: Pinned host<->device copies reach about 80% of the PCIe link rate (bandwidthTest on gen4 x16:
#: 25-26 GB/s of 31.5; on gen5 x16: 50-55 of 63).
PCIE_EFFICIENCY = 0.8
#: RAID-0 / striping across N drives: aggregate = N x drive x this (md-raid and fuyou's striping lose
#: a little to uneven queueing; LoHan's 12-drive array is reported near-linear).
STRIPE_EFFICIENCY = 0.9

#: NCCL's reduce over NVLink reaches about 80% of the link's rate per direction (nccl-tests' bus
#: bandwidth on 8x H100 SXM: ~360-370 GB/s of NVLink 4's 450).
LINK_EFFICIENCY = 0.8

# GPUs: dense (no sparsity) bf16 tensor TFLOPS with fp32 accumulate, memory in bytes, host link, and
# the direct GPU-to-GPU link per direction in GB/s (NVLink; absent: data parallelism's collectives go
# through host memory over each GPU's PCIe link; GeForce cards have no NVLink and no peer-to-peer).
# The memory is what CUDA reports as the card's total (torch.cuda.get_device_properties().total_memory, the
# "total capacity" of PyTorch's out-of-memory errors), rounded down, not the marketed GB: RTX 3090 23.69 GiB,
# RTX 4090 23.61-23.68 GiB by driver, A100 40 GB 39.39 GiB, A100 80 GB 79.15 GiB, H100 80 GB 79.11 GiB, H200
# ~139 GiB. (The presets mixed 24 GiB for the GeForce cards, 0.35 GiB over what a 4090 has, with decimal GB for
# the others, 2.1-8.5 GiB under.)
GPUS: dict[str, dict] = {
    # NVIDIA Ampere GA102 whitepaper, table "RTX 3090": bf16 tensor with fp32 accumulate 71 TFLOPS dense.
    "rtx3090": dict(tflops=71.0, mem=int(23.6 * GiB), pcie="gen4x16"),
    # NVIDIA Ada Lovelace whitepaper (AD102), RTX 4090: bf16 tensor, fp32 accumulate, 165.2 TFLOPS dense.
    "rtx4090": dict(tflops=165.2, mem=int(23.6 * GiB), pcie="gen4x16"),
    # NVIDIA A100 datasheet: bf16 tensor 312 TFLOPS dense (624 with sparsity); 40 GB / 80 GB HBM2(e).
    # NVLink 3 (SXM): 600 GB/s total, 300 each way.
    "a100-40gb": dict(tflops=312.0, mem=int(39.3 * GiB), pcie="gen4x16", link=300.0),
    "a100-80gb": dict(tflops=312.0, mem=int(79.1 * GiB), pcie="gen4x16", link=300.0),
    # NVIDIA H100 datasheet (SXM): bf16 tensor 989 TFLOPS dense (1979 with sparsity), 80 GB HBM3.
    # NVLink 4 (SXM): 900 GB/s total, 450 each way.
    "h100": dict(tflops=989.0, mem=int(79.1 * GiB), pcie="gen5x16", link=450.0),
    # NVIDIA H200 datasheet (SXM): same compute as H100 SXM, 141 GB HBM3e, the same NVLink.
    "h200": dict(tflops=989.0, mem=139 * GiB, pcie="gen5x16", link=450.0),
}

# NVMe drives: sustained sequential read / write GB/s, capacity in bytes and rated endurance (bytes
# written over the warranty, "TBW", from the same datasheets).
SSDS: dict[str, dict] = {
    # Intel/Solidigm D7-P5510 3.84 TB product brief: seq read 6.5 GB/s, seq write 3.4 GB/s (128 KiB).
    # Enterprise TLC without an SLC cache: the write figure is sustained. LoHan's testbed uses 12.
    # Endurance 1 drive write per day for 5 years: 7.0 PBW at 3.84 TB.
    "d7-p5510": dict(read=6.5, write=3.4, capacity=3.84e12, tbw=7.0e15),
    # Samsung 990 Pro 2 TB datasheet: 7.45 read / 6.9 write GB/s, but the write figure holds only inside
    # the SLC cache (~200 GB); training rewrites terabytes, and reviews (Tom's Hardware, AnandTech)
    # measure ~1.5 GB/s after the cache fills. We use the sustained figure.
    # Endurance: 1,200 TBW for the 2 TB model (Samsung's warranty).
    "990-pro": dict(read=7.45, write=1.5, capacity=2.0e12, tbw=1.2e15),
    # A generic PCIe 4.0 TLC drive (for example WD SN850X / Crucial P5 Plus class): ~5 GB/s read and
    # ~2 GB/s sustained write past the SLC cache (review measurements), 2 TB.
    # Endurance 1,200 TBW at 2 TB (SN850X and P5 Plus warranties).
    "pcie4-generic": dict(read=5.0, write=2.0, capacity=2.0e12, tbw=1.2e15),
}

# PCIe x16 links: raw rate per direction after 128b/130b encoding (PCI-SIG): gen3 15.75, gen4 31.5,
# gen5 63 GB/s; the profile applies PCIE_EFFICIENCY.
PCIE: dict[str, float] = {"gen3x16": 15.75, "gen4x16": 31.5, "gen5x16": 63.0}

#: CPU AdamW throughput default (parameters per second) for a server socket: the fused kernel moves
#: ~28 bytes per parameter (fp32 weight, m, v read and written, bf16 gradient in, bf16 copy out) and
#: is memory-bound; ~100 GB/s of sustained DRAM bandwidth (8-channel DDR4-3200 with STREAM efficiency)
#: gives ~3.5e9; we take 3e9. The development machine's 2 vCPUs measure ~2e9 (bench/RESULTS.md, issue 4).
CPU_ADAM_DEFAULT = 3.0e9

#: Data parallelism's transfers through CPU memory between the processes of one machine (gloo over
#: loopback TCP, ``fuyou/engine/exchange.py`` and, on a CPU device, the gradient sums), bytes/s:
#: measured on the development machine (2 vCPUs; torchrun with 2 ranks, 16-256 MiB tensors,
#: median of 5): a broadcast 1.5 GB/s, a reduce of fp32 (which also adds) 0.65 GB/s. A server's
#: cores move more; `fuyou probe` measures this machine's.
GLOO_BROADCAST_DEFAULT = 1.5e9
GLOO_REDUCE_DEFAULT = 0.65e9


# compute rates a probe times besides the blocks' forward and backward (``HardwareProfile``; unset: those)
PROBED_RATES = ("lora_fwd_flops", "lora_bwd_flops", "head_flops", "lora_head_flops")


class HardwareProfile(BaseModel):
    """Numbers the cost model uses. Bandwidths in bytes/s, throughput in FLOP/s and parameters/s."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # (a profile edited to Infinity was taken)

    source: str = Field(description="Where the figures come from (presets, a probe, overrides).")
    device: Literal["cuda", "cpu"] = Field("cuda", description="Compute device; 'cpu' shares cores with AdamW.")
    fwd_flops: float = Field(gt=0, description="Sustained FLOP/s of a block's forward (model FLOPs).")
    bwd_flops: float = Field(gt=0, description="Sustained FLOP/s of a block's recompute + backward.")
    matmul_flops: float = Field(gt=0, description="Sustained FLOP/s of the model's matmuls alone.")
    lora_fwd_flops: float | None = Field(
        None, gt=0, description="Sustained FLOP/s of a block's forward with LoRA adapters on a frozen base "
        "(`fuyou probe` times it); unset: fwd_flops.")
    lora_bwd_flops: float | None = Field(
        None, gt=0, description="Sustained FLOP/s of a block's recompute + backward with LoRA adapters on a frozen "
        "base (only the input's and the adapters' gradients); unset: bwd_flops.")
    head_flops: float | None = Field(
        None, gt=0, description="Sustained FLOP/s of the head's forward + backward (model FLOPs, 3x the LM head "
        "matmul; the loss's softmax over the vocabulary included), `fuyou probe` at the model's vocabulary; unset: "
        "bwd_flops.")
    lora_head_flops: float | None = Field(
        None, gt=0, description="The same with the head frozen (LoRA: no weight gradient, 2x the matmul); unset: "
        "head_flops, else bwd_flops.")
    gpu_mem: int = Field(gt=0, description="Device memory usable by training, bytes.")
    gpu_card: int | None = Field(None, gt=0, description="The card's memory, bytes, of which gpu_mem is what training "
                                 "may use (``resolve``: after --gpu-reserve); unset: gpu_mem.")
    gpu_budget: bool = Field(False, description="gpu_mem is fuyou train's device budget (offload.gpu_mem), not a "
                             "card's memory: what does not fit is told as that budget (plan).")
    gpu_reserve: int | None = Field(None, ge=0, description="--gpu-reserve as given (unset: the default headroom, "
                                    "CUDA's context and 5 %).")
    h2d: float = Field(gt=0, description="Host-to-device bandwidth, bytes/s (pinned).")
    d2h: float = Field(gt=0, description="Device-to-host bandwidth, bytes/s (pinned).")
    ssd_read: float = Field(gt=0, description="Aggregate SSD read bandwidth through fuyou's store, bytes/s.")
    ssd_write: float = Field(gt=0, description="Aggregate SSD write bandwidth through fuyou's store, bytes/s.")
    ssd_mixed_factor: float = Field(
        1.0, gt=0, description="Measured time of reading and writing at once over the sum of the separate "
        "times (1.0: the device time-shares; <1: it overlaps some); multiplies every SSD task.")
    ssd_cpu_s_per_gb: float = Field(
        0.0, ge=0, description="CPU seconds the store's I/O threads spend per GB moved (CRC-32, syscalls, the "
        "kernel's O_DIRECT work), measured by the probe. On a CPU compute device it is charged to the cores "
        "that compute and AdamW share; 0 (presets) leaves it out.")
    adam_io_efficiency: float = Field(
        1.0, gt=0, description="Measured time the simulator predicts for one out-of-core AdamW job of the model's "
        "block, alone, over the time the job took (the pipeline's fill and drain at low queue depth and its "
        "per-request work, which the store's streaming rates leave out); the optimizer's SSD tasks run at this "
        "fraction of the store's rates. 1.0 (presets): the rates hold.")
    ssd_capacity: int = Field(gt=0, le=1 << 70, description="Usable SSD space, bytes (at most 1 ZiB).")
    ssd_drives: int = Field(1, ge=1, description="Drives striped (for 'what if twice the SSDs').")
    ssd_tbw: float | None = Field(None, gt=0, description="Rated endurance of all the drives together, bytes "
                                  "written (presets' datasheets, or --ssd-tbw); None: unknown.")
    cpu_adam: float = Field(gt=0, description="CPU AdamW throughput, parameters/s (fuyou's fused kernel).")
    cpu_mem: int | None = Field(None, gt=0, description="CPU memory of the machine, bytes (probe; informative).")
    compute_block: conlist(int, min_length=2, max_length=2) | None = Field(
        None, description="The probe's timed block: [d_model, tokens a micro-batch]. Its FLOP/s hold near that "
        "shape; a plan far from it extrapolates them, and says so. None: presets.")
    compute_precision: Literal["bf16", "fp32"] | None = Field(
        None, description="The dtype the probe timed its block in (probe --precision); a plan of the other "
        "precision says its compute times are the probe's other dtype's. None: presets, or older profiles.")
    bf16_native: bool | None = Field(
        None, description="Whether the compute device multiplies bf16 natively (``fuyou.models.precision.bf16_native``"
        "): what train.precision=auto computes in there. None: presets (GPUs: yes), or older profiles (a CPU's: "
        "this machine's).")
    gpu_link: float | None = Field(None, gt=0, description="Data parallel: GPU-to-GPU bandwidth per direction for "
                                   "NCCL's gradient sums, bytes/s (NVLink); None: through host memory over each "
                                   "GPU's PCIe link.")
    gloo_broadcast: float = Field(GLOO_BROADCAST_DEFAULT, gt=0, description="Data parallel: bytes/s of a gloo "
                                  "broadcast between two processes of the machine (the weight exchange).")
    gloo_reduce: float = Field(GLOO_REDUCE_DEFAULT, gt=0, description="Data parallel on a CPU device: bytes/s of a "
                               "gloo reduce of fp32 between two processes (the gradient sums).")

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, v, info):
        """``true`` is not a figure (``"ssd_read": true`` was taken as 1 B/s: a pass)."""
        if isinstance(v, bool) and info.field_name not in ("gpu_budget", "bf16_native"):
            raise ValueError("a number is expected, not true/false")
        return v

    @field_validator("compute_block")
    @classmethod
    def _positive_block(cls, v):
        if v is not None and min(v) < 1:  # (a hand-edited [0, 1024] divided by zero in the report: a pass)
            raise ValueError("compute_block is [d_model, tokens], both at least 1")
        return v

    def computes_bf16(self) -> bool:
        """Whether train.precision=auto computes in bf16 on this profile's device (``bf16_native``)."""
        if self.bf16_native is not None:
            return self.bf16_native
        if self.device == "cuda":  # (the presets' GPUs: Ampere on)
            return True
        from fuyou.models.precision import bf16_native

        return bf16_native("cpu")  # (a CPU profile from before the field: this machine's, which probed it)


def _ssd_preset(spec: str) -> tuple[int, dict]:
    m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9.\-]+)", spec.strip().lower())
    if not m or m.group(2) not in SSDS:
        raise ConfigError(f"unknown SSD {spec!r}; write NAME or NxNAME with NAME one of: {', '.join(SSDS)} "
                          f"(for example 12xd7-p5510), or give --ssd-read/--ssd-write/--ssd-capacity numbers")
    n = int(m.group(1) or 1)
    if n < 1:
        raise ConfigError(f"SSD count must be at least 1 in {spec!r}")
    return n, SSDS[m.group(2)]


def check_names(hw: HardwareConfig) -> None:
    """The preset names of ``hw`` (hardware.gpu, hardware.ssd, hardware.pcie) are the planner's, or a
    ConfigError naming the choices: fuyou train took unknown ones in silence and then said to set them (a pass)."""
    if hw.gpu is not None and hw.gpu.strip().lower() not in GPUS:
        raise ConfigError(f"unknown GPU hardware.gpu={hw.gpu!r}; choose one of: {', '.join(GPUS)}, or give "
                          f"hardware.gpu_tflops")
    if hw.ssd is not None:
        _ssd_preset(hw.ssd)
    if hw.pcie is not None and hw.pcie not in PCIE:
        raise ConfigError(f"unknown PCIe link hardware.pcie={hw.pcie!r}; choose one of: {', '.join(PCIE)}, or give "
                          f"hardware.pcie_bw")


CUDA_CONTEXT = 768 * 1024**2
GPU_USABLE_FRACTION = 0.95  # of a card's memory beyond the context, without --gpu-reserve (``resolve``, ``card_for``)
"""Device memory the CUDA context, cuBLAS and the kernels' modules take before training allocates
anything (an estimate; the engine measures the real figure as the GPU's free memory after a warm-up)."""


def resolve(hw: HardwareConfig, gpu_budget: bool = False) -> HardwareProfile:
    """The profile for a hardware section: a probe's file, else presets, then numeric overrides. ``gpu_budget``:
    its gpu_mem is fuyou train's device budget (offload.gpu_mem, no reserve), not a card's memory."""
    if hw.profile:
        named = [f"--{k} {v}" for k, v in (("gpu", hw.gpu), ("ssd", hw.ssd), ("pcie", hw.pcie)) if v]
        if named:  # (a new-user pass found them ignored in silence beside a profile)
            raise ConfigError(f"--profile {hw.profile} is the machine as measured: {' and '.join(named)} would not "
                              f"be planned; give the presets without --profile, or change a measured figure with "
                              f"its own flag (--gpu-tflops, --gpu-mem, --ssd-read, --ssd-write, --pcie-bw)")
        base = load_profile(hw.profile).model_dump()
        src = [f"probe {hw.profile}"]
        m = re.search(r"d=(\d+) ff=\d+ batch=(\d+) seq=(\d+)", base["source"])
        if base.get("compute_block") is None and m:  # a profile written before the field: its source names it
            base["compute_block"] = [int(m.group(1)), int(m.group(2)) * int(m.group(3))]
    else:
        if hw.gpu is None and hw.gpu_tflops is None:
            raise ConfigError("no hardware given: name a GPU (--gpu, one of: " + ", ".join(GPUS) + ") or "
                              "--gpu-tflops, or pass --profile FILE written by `fuyou probe`")
        gpu = GPUS.get((hw.gpu or "").strip().lower(), None)  # (RTX4090 as rtx4090, as the SSD presets)
        if hw.gpu is not None and gpu is None:  # (before the SSD: a GPU misnamed is the first thing to say)
            raise ConfigError(f"unknown GPU {hw.gpu!r}; choose one of: {', '.join(GPUS)}, or give --gpu-tflops")
        if not (hw.ssd or "").strip() and (hw.ssd_read is None or hw.ssd_write is None):  # ("": 1 B/s: a pass)
            raise ConfigError("no SSD given: name one (--ssd 12xd7-p5510; presets: " + ", ".join(SSDS) + ") "
                              "or give --ssd-read and --ssd-write in GB/s")
        gpu = gpu or dict(tflops=hw.gpu_tflops, mem=GPUS["rtx4090"]["mem"], pcie="gen4x16")  # (--gpu-mem: a 24 GB card's)
        pcie = hw.pcie or gpu["pcie"]
        if pcie not in PCIE:
            raise ConfigError(f"unknown PCIe link {pcie!r}; choose one of: {', '.join(PCIE)}, or give --pcie-bw")
        link = PCIE[pcie] * GB * PCIE_EFFICIENCY
        mm = gpu["tflops"] * 1e12 * MATMUL_EFFICIENCY
        n, drive = _ssd_preset(hw.ssd) if hw.ssd else (1, dict(read=0, write=0, capacity=4e12))
        scale = n * (STRIPE_EFFICIENCY if n > 1 else 1.0)
        base = dict(device="cuda", matmul_flops=mm, fwd_flops=mm * BLOCK_EFFICIENCY, bwd_flops=mm * BLOCK_EFFICIENCY,
                    gpu_mem=int(gpu["mem"]), h2d=link, d2h=link, ssd_read=drive["read"] * GB * scale or 1.0,
                    ssd_write=drive["write"] * GB * scale or 1.0, ssd_capacity=int(drive["capacity"] * n),
                    ssd_drives=n, cpu_adam=CPU_ADAM_DEFAULT, ssd_tbw=drive["tbw"] * n if "tbw" in drive else None,
                    gpu_link=gpu["link"] * GB * LINK_EFFICIENCY if gpu.get("link") else None)
        src = [f"presets gpu={hw.gpu or '-'} ssd={hw.ssd or '-'} pcie={pcie}"]
        if not hw.ssd and hw.ssd_capacity is None:  # (a 4 TB drive stood in the plan unsaid: a pass)
            src.append("SSD capacity assumed 4 TB (--ssd-capacity)")
    over = {"gpu_mem": hw.gpu_mem, "ssd_capacity": hw.ssd_capacity, "cpu_adam": hw.cpu_adam}
    if hw.gpu_link is not None:  # GB/s; 0: no direct link
        over["gpu_link"] = hw.gpu_link * GB or None
    if hw.ssd_tbw is not None:  # per drive, in TB, as datasheets give it
        over["ssd_tbw"] = hw.ssd_tbw * 1e12 * (base.get("ssd_drives", 1) or 1)
    if hw.gpu_tflops:
        mm = hw.gpu_tflops * 1e12 * (MATMUL_EFFICIENCY if not hw.profile else 1.0)
        over.update(matmul_flops=mm, fwd_flops=mm * BLOCK_EFFICIENCY, bwd_flops=mm * BLOCK_EFFICIENCY)
    for k, v in (("ssd_read", hw.ssd_read), ("ssd_write", hw.ssd_write), ("h2d", hw.pcie_bw), ("d2h", hw.pcie_bw)):
        if v is not None:
            over[k] = v * GB
    over = {k: v for k, v in over.items() if v is not None or k == "gpu_link"}
    if over:
        src.append("overrides " + ", ".join(sorted(over)))
    merged = {**base, **over}
    if hw.gpu_tflops:
        merged["compute_block"] = None  # the compute rate is the user's, not the probe's shape's
        for k in PROBED_RATES:  # (nor the rates it timed beside the block's)
            merged[k] = None
    if merged.get("device", "cuda") == "cuda":  # headroom: what training may use of the card
        card = merged["gpu_mem"]
        usable = (card - hw.gpu_reserve if hw.gpu_reserve is not None
                  else int((card - CUDA_CONTEXT) * GPU_USABLE_FRACTION))
        if usable <= 0:
            if hw.gpu_reserve is not None:
                raise ConfigError(f"--gpu-reserve {format_size(hw.gpu_reserve)} leaves nothing of the GPU's "
                                  f"{format_size(card)}; reserve less")
            raise ConfigError(f"a GPU of {format_size(card)} leaves nothing for training after CUDA's context "
                              f"(about {format_size(CUDA_CONTEXT)}); give --gpu-mem the card's memory, or a "
                              f"larger GPU")
        merged["gpu_mem"], merged["gpu_card"], merged["gpu_reserve"] = usable, card, hw.gpu_reserve
        merged["gpu_budget"] = gpu_budget
        src.append(f"device budget {format_size(usable)} (offload.gpu_mem)" if gpu_budget else
                   f"GPU memory {usable / GiB:.2f} of {card / GiB:.2f} GiB usable (--gpu-reserve)")
    return HardwareProfile(**{**merged, "source": "; ".join(src)})


def card_for(hw: HardwareProfile, usable: int) -> int:
    """The card memory whose usable part (``resolve``'s headroom, as this profile's) is ``usable``: what a
    plan's "a GPU with at least" names (a pass: it named the usable figure, which a card of that size lacks)."""
    if hw.gpu_card is None:
        return usable
    if hw.gpu_reserve is not None:
        return usable + hw.gpu_reserve
    return math.ceil(usable / GPU_USABLE_FRACTION) + CUDA_CONTEXT


def with_more_ssds(p: HardwareProfile, factor: float) -> HardwareProfile:
    """The same machine with ``factor`` times the SSD bandwidth and space (a 'what if')."""
    return p.model_copy(update=dict(ssd_read=p.ssd_read * factor, ssd_write=p.ssd_write * factor,
                                    ssd_capacity=int(p.ssd_capacity * factor),
                                    ssd_tbw=p.ssd_tbw * factor if p.ssd_tbw else None,
                                    ssd_drives=max(1, round(p.ssd_drives * factor))))


def load_profile(path: str | Path) -> HardwareProfile:
    p = Path(path)
    if not p.is_file():  # (a directory or /dev/null was said not to exist: a pass)
        what = ("does not exist" if not p.exists() else "is a directory" if p.is_dir() else "is not a regular file")
        raise ConfigError(f"hardware profile {p} {what}; write one with `fuyou probe --ssd DIR --out FILE`")
    try:
        raw = json.loads(p.read_text(encoding="utf-8-sig"))  # (a byte-order mark: a file saved on Windows)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not a hardware profile written by `fuyou probe` (not JSON: "
                          f"{type(e).__name__}); write one with `fuyou probe --ssd DIR --out {p}`") from None
    prof = raw.get("profile", raw) if isinstance(raw, dict) else raw
    if not isinstance(prof, dict):
        kind = {type(None): "null", list: "a list", str: "a string", bool: "true or false"}.get(type(prof), "a number")
        raise ConfigError(f"{p} is not a hardware profile written by `fuyou probe` (JSON, but {kind}, not an object "
                          f"of figures); write one with `fuyou probe --ssd DIR --out {p}`")
    try:
        return HardwareProfile.model_validate(prof)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'the file'}: {err['msg']}" for err in e.errors())
        newer = any(err["type"] == "extra_forbidden" for err in e.errors())
        raise ConfigError(f"{p} is not a hardware profile written by `fuyou probe`: {problems}"
                          + ("; a field this fuyou does not know (a profile from another version? probe again, or "
                             "remove the field)" if newer else "")) from None


def save_profile(profile: HardwareProfile, path: str | Path, measurements: dict | None = None) -> None:
    """Write ``{"profile": ..., "measurements": ...}``; ``load_profile`` reads it back."""
    body = profile.model_dump(exclude={"gpu_budget"})  # (a plan's reading of gpu_mem, not a figure of the machine)
    Path(path).write_text(json.dumps({"profile": body, "measurements": measurements or {}}, indent=2))
