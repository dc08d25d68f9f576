"""An int8 base for LoRA (``lora.base = int8``): weight-only, per-output-channel int8 matmul weights.

Each matmul weight ``W`` (out x in) of a block becomes int8 codes ``q`` and one fp32 scale per output
row: ``s = max|W[r]| / 127``, ``q = round(W / s)`` (round half to even; a row of zeros has ``s = 0`` and
codes 0). It is read back as ``q * s`` computed in fp32 and rounded once to the compute dtype. The
quantisation starts from the fp32 values (the checkpoint's or the seeded init), never from the rounded
compute copy. Norms, biases, the embedding and the LM head keep the compute dtype (as QLoRA keeps them
unquantised). A block's base then streams about 1 byte per parameter instead of 2 (bf16) or 4 (fp32):
the store, the weight cache, the SSD reads and the host-to-device copies all carry the packed stage.

A stage's packed weights are one byte vector, the store's and the cache's unit, in slot order and
64-byte aligned: each plain parameter's values in the compute dtype, then each quantised one's scales
(fp32) and codes (int8). It is held in a tensor of the compute dtype (its bytes rounded up), so the
engine's pools, store and device copies treat it like any stage's weights; ``PackedStage.unpack``
gives the parameters back, the quantised ones dequantised into new tensors on the tensor's device.

The planner (``fuyou.planner``) counts the packed bytes wherever weights are stored, cached or moved,
and the dequantised stage in the device plan; it charges no time for the dequantisation itself, an
elementwise pass over a stage that is small beside the stage's matmuls.

The in-memory reference (``fuyou.train.reference``) trains over ``fake_quantise``'s values: the same
``q * s``, kept in fp32 (rounded to the compute dtype by autocast, as the engine rounds them). So the
offloaded LoRA over an int8 base equals the reference bit for bit in fp32, as it does over the plain one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

QMAX = 127
ALIGN = 64


def quantise_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 codes, fp32 scale per row) of a 2-D weight (module docstring)."""
    w = w.float()
    scale = w.abs().amax(dim=1) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / safe[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, scale


def dequantise_rows(codes: Tensor, scale: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """``codes * scale`` per row, computed in fp32 and rounded once to ``dtype``. On the CPU the kernel
    library's ``fuyou_dequant_rows`` (adamw.cpp: the same bits, ~20x the mixed-dtype torch op), else torch."""
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device) if out is None else out
    if (codes.dim() != 2 or codes.dtype != torch.int8 or scale.dtype != torch.float32 or out.dtype != dtype
            or out.shape != codes.shape or scale.shape != codes.shape[:1]
            or not codes.device == scale.device == out.device):
        raise ValueError(f"dequantise_rows: int8 codes {tuple(codes.shape)} on {codes.device}, fp32 scales "
                         f"{tuple(scale.shape)} and an output of the codes' shape in {dtype} on the same device; got "
                         f"{codes.dtype} codes, {scale.dtype} scales {tuple(scale.shape)} on {scale.device}, output "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    lib = _kernel() if codes.device.type == "cpu" and dtype in _OTYPE else None
    if lib is None or not (codes.is_contiguous() and scale.is_contiguous() and out.is_contiguous()):
        return torch.mul(codes, scale[:, None], out=out)
    rows, cols = codes.shape
    lib.fuyou_dequant_rows(codes.data_ptr(), scale.data_ptr(), out.data_ptr(), _OTYPE[dtype], rows, cols,
                           torch.get_num_threads())
    return out


_OTYPE = {torch.float32: 0, torch.bfloat16: 1}


def _kernel():
    from fuyou.kernels.build import load_adamw_lib

    return load_adamw_lib()


def quantised_names(stage) -> list[str]:
    """The parameters of ``stage`` an int8 base quantises: its blocks' matmul weights (none in the
    embedding or the head)."""
    from fuyou.models.lora import ALL_LINEAR

    return [f"{n}.weight" for n in ALL_LINEAR[stage.cfg.family] if f"{n}.weight" in stage.params]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class PackedStage:
    """Where each parameter of a stage is in its packed byte vector (module docstring)."""

    plain: dict[str, tuple[int, tuple[int, ...]]]            # name -> (byte offset, shape), compute dtype
    quantised: dict[str, tuple[int, int, tuple[int, int]]]   # name -> (scales' offset, codes' offset, shape)
    nbytes: int
    csize: int
    order: tuple[str, ...]                                   # the stage's parameters in slot order

    @classmethod
    def of(cls, stage, csize: int) -> "PackedStage | None":
        """The layout of ``stage``'s packed weights in a compute dtype of ``csize`` bytes; None when it
        has nothing to quantise (the embedding, the head)."""
        q = set(quantised_names(stage))
        if not q:
            return None
        plain, quantised, at = {}, {}, 0
        for name, spec in stage.params.items():
            if name in q:
                rows = spec.shape[0]
                scales = at
                codes = _align(scales + 4 * rows)
                quantised[name] = (scales, codes, tuple(spec.shape))
                at = _align(codes + spec.numel)
            else:
                plain[name] = (at, tuple(spec.shape))
                at = _align(at + csize * spec.numel)
        return cls(plain, quantised, -(-at // csize) * csize, csize, tuple(stage.params))

    @property
    def numel(self) -> int:
        """Elements of the compute-dtype tensor that holds the packed bytes."""
        return self.nbytes // self.csize

    def pack(self, values: dict[str, Tensor], out: Tensor) -> Tensor:
        """``values`` (local name -> fp32) into ``out`` (``numel`` elements of the compute dtype)."""
        raw = out.view(torch.uint8)
        raw.zero_()
        for name, (at, shape) in self.plain.items():
            n = _numel(shape)
            raw[at:at + self.csize * n].view(out.dtype).copy_(values[name].reshape(-1))
        for name, (s_at, c_at, (rows, cols)) in self.quantised.items():
            codes, scale = quantise_rows(values[name].reshape(rows, cols))
            raw[s_at:s_at + 4 * rows].view(torch.float32).copy_(scale)
            raw[c_at:c_at + rows * cols].view(torch.int8).copy_(codes.reshape(-1))
        return out

    @property
    def dequant_numel(self) -> int:
        """Elements of the compute dtype the stage's dequantised matmul weights take."""
        return sum(rows * cols for _, _, (rows, cols) in self.quantised.values())

    def unpack(self, flat: Tensor, scratch: Tensor | None = None) -> dict[str, Tensor]:
        """The stage's parameters from its packed tensor: plain ones as views, quantised ones
        dequantised (in ``flat``'s dtype, on its device) into ``scratch`` (at least ``dequant_numel``
        elements, reused stage after stage: the engine's) or new tensors."""
        raw = flat.view(torch.uint8)
        out, at = {}, 0
        for name, (p_at, shape) in self.plain.items():
            out[name] = raw[p_at:p_at + self.csize * _numel(shape)].view(flat.dtype).view(shape)
        for name, (s_at, c_at, (rows, cols)) in self.quantised.items():
            codes = raw[c_at:c_at + rows * cols].view(torch.int8).view(rows, cols)
            dst = None if scratch is None else scratch[at:at + rows * cols].view(rows, cols)
            out[name] = dequantise_rows(codes, raw[s_at:s_at + 4 * rows].view(torch.float32), flat.dtype, dst)
            at += rows * cols
        return {name: out[name] for name in self.order}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def fake_quantise(stage, values: dict[str, Tensor]) -> dict[str, Tensor]:
    """``values`` (global key -> fp32) with ``stage``'s quantised weights replaced by their int8 base's
    values ``q * s`` in fp32: what the reference trains over (module docstring)."""
    out = dict(values)
    for name in quantised_names(stage):
        key = stage.key(name)
        codes, scale = quantise_rows(values[key])
        out[key] = dequantise_rows(codes, scale, torch.float32)
    return out


def packed_bytes(stage, csize: int) -> int:
    """Bytes of ``stage``'s base weights as stored and streamed with an int8 base."""
    p = PackedStage.of(stage, csize)
    return csize * stage.num_params if p is None else p.nbytes
