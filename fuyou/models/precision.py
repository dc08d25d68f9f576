"""The compute precision: bf16 autocast (fp32 master weights elsewhere) or plain fp32, and which one
``train.precision=auto`` takes on a device (``auto_precision``)."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch


def autocast(device: torch.device, precision: str):
    """The autocast context of ``train.precision`` on ``device``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def bf16_native(device_type: str) -> bool:
    """Whether a ``device_type`` ("cuda" or "cpu") device multiplies bf16 matrices at full speed: a GPU of
    compute capability 8.0 on (Ampere; earlier ones emulate bf16), a CPU with oneDNN's bf16 path (AVX-512 or
    AMX, as torch routes bf16 matmuls). Elsewhere torch falls back to a scalar path: on an AVX2 CPU a 1024^3
    bf16 matmul took 2.25 s against 0.017 s in fp32 (about 130x), and the default run 14.6 s a step against 0.37 s
    (bench/cpu_precision.py)."""
    if device_type == "cuda":
        if not torch.cuda.is_available():  # (train.device=cuda without a GPU is refused where the device is made)
            return True
        # (under torchrun the config is read before the rank takes its GPU: the rank's own, not GPU 0)
        rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        return torch.cuda.get_device_capability(rank if rank < torch.cuda.device_count() else 0)[0] >= 8
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # (a torch without the query: what it was built to dispatch to)
        return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


def compute_device_type(device: str) -> str:
    """The kind of device ``train.device`` computes on: "cuda" or "cpu" (the fake device computes on the CPU)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device == "cuda" else "cpu"


def auto_precision(device: str) -> str:
    """``train.precision=auto`` on ``train.device`` ``device``: bf16 where the device computes it natively
    (``bf16_native``), else fp32."""
    return "bf16" if bf16_native(compute_device_type(device)) else "fp32"


def auto_fp32_clause(train) -> str:
    """For a refused budget of a run whose ``train`` (a ``TrainConfig``) computes in fp32 because auto chose it
    (``precision_chosen``): why its bytes are fp32's (a refusal named no precision, and the same command had fit
    under the old bf16 default: a pass); else ""."""
    if train.precision != "fp32" or not train.precision_chosen:
        return ""
    return ("; it computes in fp32 (train.precision=auto: this device has no native bf16), whose weights and "
            "activations take twice bf16's bytes: train.precision=bf16 needs less memory but runs tens of times "
            "slower here")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _RoundStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype):
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def round_stage_input(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (a ``fuyou.policy`` checkpoint dtype) and back, the gradient passing
    through unchanged: a block input stored as a bf16 checkpoint (fuyou/policy.py, Note: [Checkpoint
    dtype]), as the reference trainer computes it."""
    if DTYPES[dtype] == x.dtype:
        return x
    return _RoundStraightThrough.apply(x, DTYPES[dtype])
