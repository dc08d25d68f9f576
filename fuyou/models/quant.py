"""A quantised base for LoRA (``lora.base = int8 | nf4``): weight-only int8 (per output channel) or
NF4 (per block of 64) matmul weights.

Each matmul weight ``W`` (out x in) of a block becomes int8 codes ``q`` and one fp32 scale per output
row: ``s = max|W[r]| / 127``, ``q = round(W / s)`` (round half to even; a row of zeros has ``s = 0`` and
codes 0). It is read back as ``q * s`` computed in fp32 and rounded once to the compute dtype. The
quantisation starts from the fp32 values (the checkpoint's or the seeded init), never from the rounded
compute copy. Norms, biases, the embedding and the LM head keep the compute dtype (as QLoRA keeps them
unquantised). A block's base then streams about 1 byte per parameter instead of 2 (bf16) or 4 (fp32):
the store, the weight cache, the SSD reads and the host-to-device copies all carry the packed stage.

``lora.base = nf4`` is QLoRA's 4-bit NormalFloat (Dettmers et al. 2023): the weight, flattened row
by row, in blocks of 64 with one fp32 absmax per block; each element is the index (4 bits, two to a
byte, the even element in the low nibble) of the nearest of 16 levels spaced as the quantiles of a
normal distribution (``NF4_LEVELS``, the paper's values; ties go to the lower level), read back as
``level * absmax`` in fp32 rounded once to the compute dtype. About 0.56 bytes a parameter.
``lora.base = nf4dq`` adds QLoRA's double quantisation: the absmax values themselves stored as int8
around their mean, with an fp32 scale per 256 of them (``double_quantise``), about 0.516 bytes a
parameter, 8 % fewer to store and stream; the absmax read back is ``code * scale / 127 + mean``.

A stage's packed weights are one byte vector, the store's and the cache's unit, in slot order and
64-byte aligned: each plain parameter's values in the compute dtype, then each quantised one's scales
(fp32) and codes. It is held in a tensor of the compute dtype (its bytes rounded up), so the
engine's pools, store and device copies treat it like any stage's weights; ``PackedStage.unpack``
gives the parameters back, the quantised ones dequantised on the tensor's device (into the engine's
one reused buffer).

The planner (``fuyou.planner``) counts the packed bytes wherever weights are stored, cached or moved,
and the dequantised stage in the device plan; it charges no time for the dequantisation itself, an
elementwise pass over a stage that is small beside the stage's matmuls.

The in-memory reference (``fuyou.train.reference``) trains over ``fake_quantise``'s values: the same
dequantised values, kept in fp32 (rounded to the compute dtype by autocast, as the engine rounds them). So
the offloaded LoRA over a quantised base equals the reference bit for bit in fp32, as over the plain one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

QMAX = 127
ALIGN = 64


def quantise_rows(w: Tensor, kernel: bool = True) -> tuple[Tensor, Tensor]:
    """(int8 codes, fp32 scale per row) of a 2-D weight (module docstring): on the CPU the kernel library's
    ``fuyou_quant_rows`` (the torch formula's bits, ~50x faster: a 70B model's base in minutes, not an
    hour), else (or ``kernel`` false) torch."""
    w = w.float()
    lib = _kernel() if kernel and w.device.type == "cpu" and w.dim() == 2 else None
    if lib is not None:
        w = w.contiguous()
        codes, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0])
        lib.fuyou_quant_rows(w.data_ptr(), codes.data_ptr(), scale.data_ptr(), w.shape[0], w.shape[1],
                             torch.get_num_threads())
        return codes, scale
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


NF4_BLOCK = 64
# The 16 NF4 levels (QLoRA, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def quantise_nf4(w: Tensor, kernel: bool = True) -> tuple[Tensor, Tensor]:
    """(packed 4-bit codes, two to a byte, and the fp32 absmax of each block of ``NF4_BLOCK``) of a
    weight flattened row by row; the last block is padded with zeros (module docstring). On the CPU the
    kernel library's ``fuyou_quant_nf4`` (the same bits), else (or ``kernel`` false) torch."""
    x = w.float().reshape(-1)
    nb = -(-x.numel() // NF4_BLOCK)
    lib = _kernel() if kernel and x.device.type == "cpu" else None
    if lib is not None:
        x = x.contiguous()
        codes, absmax = torch.empty(nb * NF4_BLOCK // 2, dtype=torch.uint8), torch.empty(nb)
        lib.fuyou_quant_nf4(x.data_ptr(), codes.data_ptr(), absmax.data_ptr(), x.numel(), torch.get_num_threads())
        return codes, absmax
    x = torch.cat([x, x.new_zeros(nb * NF4_BLOCK - x.numel())]).view(nb, NF4_BLOCK)
    absmax = x.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    idx = torch.bucketize(x / safe[:, None], (levels[1:] + levels[:-1]) / 2).to(torch.uint8).view(-1, 2)
    return idx[:, 0] | (idx[:, 1] << 4), absmax


def dequantise_nf4(codes: Tensor, absmax: Tensor, numel: int, dtype: torch.dtype, out: Tensor | None = None,
                   backend: str | None = None) -> Tensor:
    """The first ``numel`` values of NF4 ``codes`` (``quantise_nf4``'s), ``level * absmax`` in fp32 rounded
    once to ``dtype``, flat. On the CPU the kernel library's ``fuyou_dequant_nf4`` (its best path, or
    ``backend``: avx512, avx2, scalar, or torch), else torch."""
    nb = absmax.numel()
    out = torch.empty(numel, dtype=dtype, device=codes.device) if out is None else out.view(-1)
    if (codes.dtype != torch.uint8 or absmax.dtype != torch.float32 or codes.numel() != nb * NF4_BLOCK // 2
            or not 0 <= nb * NF4_BLOCK - numel < NF4_BLOCK or out.numel() != numel or out.dtype != dtype
            or not codes.device == absmax.device == out.device):
        raise ValueError(f"dequantise_nf4: {nb} blocks of codes (uint8, {nb * NF4_BLOCK // 2} bytes) and fp32 absmax "
                         f"for {numel} values into {dtype} on one device; got {codes.dtype} x {codes.numel()}, "
                         f"{absmax.dtype} absmax, output {out.dtype} x {out.numel()}")
    lib = _kernel() if codes.device.type == "cpu" and dtype in _OTYPE and backend != "torch" else None
    if lib is None or not (codes.is_contiguous() and absmax.is_contiguous() and out.is_contiguous()):
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=codes.device)
        idx = torch.stack([codes & 15, codes >> 4], dim=1).view(nb, NF4_BLOCK).long()
        return out.copy_((levels[idx] * absmax[:, None]).view(-1)[:numel])
    from fuyou.optim.adamw import _ISA
    lib.fuyou_dequant_nf4(codes.data_ptr(), absmax.data_ptr(), out.data_ptr(), _OTYPE[dtype], numel,
                          torch.get_num_threads(), _ISA[backend] if backend is not None else -1)
    return out


class _Int8Rows:
    """``lora.base = int8``: per-output-channel int8 (module docstring)."""

    description = "int8 with fp32 row scales"

    @staticmethod
    def sizes(rows: int, cols: int) -> tuple[int, int]:  # (bytes of scales, bytes of codes)
        return 4 * rows, rows * cols

    @staticmethod
    def quantise(w: Tensor) -> tuple[Tensor, Tensor]:
        codes, scale = quantise_rows(w)
        return codes.view(torch.uint8).reshape(-1), scale

    @staticmethod
    def dequantise(codes: Tensor, scale: Tensor, shape, dtype, out=None) -> Tensor:
        return dequantise_rows(codes.view(torch.int8).view(shape), scale.view(torch.float32), dtype, out)


class _NF4Blocks:
    """``lora.base = nf4``: QLoRA's NF4, blocks of 64 (module docstring)."""

    description = "NF4 with an fp32 absmax per 64"

    @staticmethod
    def sizes(rows: int, cols: int) -> tuple[int, int]:
        nb = -(-rows * cols // NF4_BLOCK)
        return 4 * nb, nb * NF4_BLOCK // 2

    @staticmethod
    def quantise(w: Tensor) -> tuple[Tensor, Tensor]:
        return quantise_nf4(w)

    @staticmethod
    def dequantise(codes: Tensor, scale: Tensor, shape, dtype, out=None) -> Tensor:
        return dequantise_nf4(codes, scale.view(torch.float32), math.prod(shape), dtype, out).view(shape)


NF4DQ_GROUP = 256  # absmax values per second-level scale (QLoRA's double quantisation)


def double_quantise(absmax: Tensor) -> Tensor:
    """QLoRA's double quantisation of NF4's absmax values, as one byte blob: their fp32 mean, then per
    group of ``NF4DQ_GROUP`` one fp32 scale (the group's largest |absmax - mean|), then one int8 code
    per absmax, ``round((absmax - mean) / scale * 127)``. 1.02 bytes per block of 64 instead of 4."""
    a = absmax.float().reshape(-1)
    nb = a.numel()
    ng = -(-nb // NF4DQ_GROUP)
    mean = a.mean().reshape(1)
    c = a - mean
    g = torch.cat([c, c.new_zeros(ng * NF4DQ_GROUP - nb)]).view(ng, NF4DQ_GROUP)
    s2 = g.abs().amax(dim=1)
    safe = torch.where(s2 > 0, s2, torch.ones_like(s2))
    q = torch.round(g / safe[:, None] * QMAX).clamp_(-QMAX, QMAX).to(torch.int8).reshape(-1)[:nb]
    return torch.cat([mean.view(torch.uint8), s2.view(torch.uint8), q.view(torch.uint8)])


def double_dequantise(blob: Tensor, nb: int) -> Tensor:
    """The fp32 absmax values ``double_quantise``'s blob stands for: ``code * (scale / 127) + mean``,
    computed in fp32 on the blob's device (the same bits on any device: no fused multiply-add)."""
    ng = -(-nb // NF4DQ_GROUP)
    mean = blob[:4].view(torch.float32)
    s2 = blob[4:4 + 4 * ng].view(torch.float32)
    q = blob[4 + 4 * ng:4 + 4 * ng + nb].view(torch.int8)
    step = (s2 / QMAX).repeat_interleave(NF4DQ_GROUP)[:nb]
    return q.float() * step + mean


class _NF4Double(_NF4Blocks):
    """``lora.base = nf4dq``: NF4 with QLoRA's double quantisation of the absmax values (module docstring)."""

    description = "NF4 with double-quantised absmax (int8 per 64, an fp32 scale per 256 of them)"

    @staticmethod
    def sizes(rows: int, cols: int) -> tuple[int, int]:
        nb = -(-rows * cols // NF4_BLOCK)
        return 4 + 4 * -(-nb // NF4DQ_GROUP) + nb, nb * NF4_BLOCK // 2

    @staticmethod
    def quantise(w: Tensor) -> tuple[Tensor, Tensor]:
        codes, absmax = quantise_nf4(w)
        return codes, double_quantise(absmax)

    @staticmethod
    def dequantise(codes: Tensor, scale: Tensor, shape, dtype, out=None) -> Tensor:
        absmax = double_dequantise(scale.view(torch.uint8), codes.numel() * 2 // NF4_BLOCK)
        return dequantise_nf4(codes, absmax, math.prod(shape), dtype, out).view(shape)


FORMATS = {"int8": _Int8Rows, "nf4": _NF4Blocks, "nf4dq": _NF4Double}


def quantised_names(stage) -> list[str]:
    """The parameters of ``stage`` a quantised base quantises: its blocks' matmul weights (none in the
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
    kind: str = "int8"                                       # the format (``FORMATS``)

    @classmethod
    def of(cls, stage, csize: int, kind: str = "int8") -> "PackedStage | None":
        """The layout of ``stage``'s packed weights (format ``kind``) in a compute dtype of ``csize``
        bytes; None when it has nothing to quantise (the embedding, the head)."""
        q, fmt = set(quantised_names(stage)), FORMATS[kind]
        if not q:
            return None
        plain, quantised, at = {}, {}, 0
        for name, spec in stage.params.items():
            if name in q:
                scale_bytes, code_bytes = fmt.sizes(*spec.shape)
                scales = at
                codes = _align(scales + scale_bytes)
                quantised[name] = (scales, codes, tuple(spec.shape))
                at = _align(codes + code_bytes)
            else:
                plain[name] = (at, tuple(spec.shape))
                at = _align(at + csize * spec.numel)
        return cls(plain, quantised, -(-at // csize) * csize, csize, tuple(stage.params), kind)

    @property
    def numel(self) -> int:
        """Elements of the compute-dtype tensor that holds the packed bytes."""
        return self.nbytes // self.csize

    def pack(self, values: dict[str, Tensor], out: Tensor) -> Tensor:
        """``values`` (local name -> fp32) into ``out`` (``numel`` elements of the compute dtype)."""
        raw = out.view(torch.uint8)
        raw.zero_()
        for name, (at, shape) in self.plain.items():
            n = math.prod(shape)
            raw[at:at + self.csize * n].view(out.dtype).copy_(values[name].reshape(-1))
        fmt = FORMATS[self.kind]
        for name, (s_at, c_at, (rows, cols)) in self.quantised.items():
            codes, scale = fmt.quantise(values[name].reshape(rows, cols))
            scale = scale.reshape(-1).view(torch.uint8)  # fp32 scales, or a format's byte blob
            raw[s_at:s_at + scale.numel()].copy_(scale)
            raw[c_at:c_at + codes.numel()].copy_(codes)
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
            out[name] = raw[p_at:p_at + self.csize * math.prod(shape)].view(flat.dtype).view(shape)
        fmt = FORMATS[self.kind]
        for name, (s_at, c_at, (rows, cols)) in self.quantised.items():
            scale_bytes, code_bytes = fmt.sizes(rows, cols)
            dst = None if scratch is None else scratch[at:at + rows * cols].view(rows, cols)
            out[name] = fmt.dequantise(raw[c_at:c_at + code_bytes], raw[s_at:s_at + scale_bytes], (rows, cols),
                                       flat.dtype, dst)
            at += rows * cols
        return {name: out[name] for name in self.order}


def fake_quantise(stage, values: dict[str, Tensor], kind: str = "int8") -> dict[str, Tensor]:
    """``values`` (global key -> fp32) with ``stage``'s quantised weights replaced by their quantised
    base's values in fp32 (format ``kind``): what the reference trains over (module docstring)."""
    out, fmt = dict(values), FORMATS[kind]
    for name in quantised_names(stage):
        key = stage.key(name)
        codes, scale = fmt.quantise(values[key])
        out[key] = fmt.dequantise(codes, scale, tuple(values[key].shape), torch.float32)
    return out


def packed_bytes(stage, csize: int, kind: str = "int8") -> int:
    """Bytes of ``stage``'s base weights as stored and streamed with a quantised base (``kind``)."""
    p = PackedStage.of(stage, csize, kind)
    return csize * stage.num_params if p is None else p.nbytes
