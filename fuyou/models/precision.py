"""The compute precision: bf16 autocast (fp32 master weights elsewhere) or plain fp32."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast(device: torch.device, precision: str):
    """The autocast context of ``train.precision`` on ``device``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


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
