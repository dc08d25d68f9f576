"""The compute precision: bf16 autocast (fp32 master weights elsewhere) or plain fp32."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast(device: torch.device, precision: str):
    """The autocast context of ``train.precision`` on ``device``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
