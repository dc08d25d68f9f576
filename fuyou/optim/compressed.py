"""Compressed optimizer state (issue 19): how AdamW's state is stored, and the plain-PyTorch reference of
the update that reads and writes it.

``optim.master``: ``fp32`` (exact; the compute weights are a separate copy) or ``bf16`` (the master
weights *are* the compute weights, 2 bytes, updated with stochastic rounding). ``optim.moments``:
``fp32``, ``bf16`` (round to nearest even) or ``int8`` (block-wise quantised, below). The default
``fp32``/``fp32`` is the exact state the rest of fuyou has always kept.

Note: [Compressed state]
    One update of element ``i`` (its index in the stage's flat state) at step ``t``:

    1. *Decode.* A bf16 master or moment widens exactly. An int8 moment is a code and the fp32 scale
       ``a`` of its block of ``QBLOCK`` = 256 elements (``i // 256``): an 8-bit minifloat of ``x`` = the
       moment divided by the block's largest, so every code has the same relative precision (3 mantissa
       bits: within 6.25 %), as the dynamic maps of 8-bit Adam do:

       - m: sign, 4 exponent bits and 3 mantissa bits of ``x = |m| / a`` in [2^-15, 1]; code 0 is 0;
       - v: 5 exponent bits and 3 mantissa bits of ``x = v / a`` in [2^-31, 1]; **no code decodes to
         0** (code 0 is 2^-31): a second moment quantised to zero would make the update ``m / eps``
         (the failure 4-bit optimizers exclude zero for, Li et al. 2023). Adam's denominator
         ``sqrt(v)`` then spans 46341:1 within a block at 3 % precision. A block of zeros has scale 0.

       Decoding is ``bits((code + bias) << 20) * a``, exact integer work and one multiply.
    2. *Update* in fp32 with fuyou's AdamW arithmetic (``fused_adamw_``, bit-exact with torch's fused
       AdamW), per weight-decay segment, with one division an element instead of two: torch's
       ``p + ns * m / (sqrt(v) / bc2s + eps)`` is computed as ``p + (ns * bc2s) * m / (sqrt(v) + eps *
       bc2s)``, the two scalar products rounded once from double (in the reference, ``bc2s`` = 1 and
       the folded scalars: the division by 1 is exact). The step term differs from torch's by a few
       ulps (up to 5 measured; about half the elements differ), far below the codes' own rounding; a
       compressed state is not torch's bits anyway, and the division was a sixth of the int8 kernel's
       time.
    3. *Encode.* bf16 moments round to nearest even. int8: ``a`` = the block's largest ``|m|`` (``v``),
       ``x = |m| * fl(1/a)``, the fp32 bits of ``x`` rounded to 3 mantissa bits (to nearest, a tie
       up: one value in 2^20 of a binade; nearest-even cost the kernel three operations a vector more,
       a tenth of its encoding) and rebiased in the same add, clamped to the code range (values under
       the smallest code flush to it). Integer
       operations and one multiply an element, one division a block, so the C++ kernel and this module
       give the same bits and the kernel costs no square root or division beyond AdamW's own. A bf16
       master rounds stochastically: ``bits(p) + r`` truncated to its high 16 bits, ``r`` the high 16
       bits of ``(key + i) * 0x9E3779B1 mod 2^32`` (a multiplicative hash: one multiply an element),
       ``key = sr_key(seed, step, stage)`` (a strong hash, so each step's noise of an element is
       independent of the last): unbiased (``E[round(p)] = p``), and a deterministic function of (seed,
       step, position), so a resumed or redone update rounds the same way. NaN encodes as the canonical
       NaN.

    Bytes per parameter of state (read and written by each update): master 4 or 2, moments 8, 4 or
    2 + 8/256 (two fp32 scales a block), plus the separate compute copy (2 B, written) only with an fp32
    master under bf16 compute. ``fp32``/``fp32``: 12 (+2); ``bf16``/``int8``: 4.03.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

QBLOCK = 256                 # elements per int8 quantisation block (one fp32 scale each)
_MASK = 0xFFFFFFFF

#: parameters/s of the fused kernel per (master, moments) relative to the fp32 kernel, on the
#: development machine's two cores over buffers in memory (bench/adam_bench.py, medians of 6;
#: bench/RESULTS.md, issue 19): what the planner charges a compressed update's kernel. The compressed
#: formats move fewer bytes and compute more (the int8 ones ~1.6x the fp32 kernel's operations an
#: element, measured in cache on one core), so on a host whose memory keeps up with every core these
#: ratios are optimistic; the planner validation (2026-12-03) found them right on this one. The int8
#: formats' figures are those medians times the gain of the cheaper encode (2026-12-06, bench/kernel_ab.py:
#: +10 % fp32/int8, +12-14 % bf16/int8, the two builds alternated in one process).
KERNEL_SPEED = {("fp32", "fp32"): 1.0, ("fp32", "bf16"): 1.0, ("fp32", "int8"): 0.94, ("bf16", "fp32"): 1.2,
                ("bf16", "bf16"): 1.5, ("bf16", "int8"): 1.35}

MASTERS = ("fp32", "bf16")
MOMENTS = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class StateTensor:
    role: str               # master, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale
    dtype: torch.dtype
    per_block: bool = False  # one element per QBLOCK elements of the state (the int8 scales)

    def numel(self, n: int) -> int:
        return -(-n // QBLOCK) if self.per_block else n

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


@dataclass(frozen=True)
class StateFormat:
    """How one run stores AdamW's state (module docstring)."""

    master: str = "fp32"
    moments: str = "fp32"

    def __post_init__(self):
        if self.master not in MASTERS or self.moments not in MOMENTS:
            raise ValueError(f"optim.master is one of {MASTERS}, optim.moments one of {MOMENTS}; "
                             f"got {self.master!r}, {self.moments!r}")

    @classmethod
    def of(cls, optim_cfg) -> "StateFormat":
        return cls(getattr(optim_cfg, "master", "fp32"), getattr(optim_cfg, "moments", "fp32"))

    @property
    def exact(self) -> bool:
        return self.master == "fp32" and self.moments == "fp32"

    @functools.cached_property
    def tensors(self) -> tuple[StateTensor, ...]:
        """The stored tensors in their fixed order (keys, buffers and kernels use it)."""
        mdt = {"fp32": torch.float32, "bf16": torch.bfloat16}
        out = [StateTensor("master", mdt[self.master])]
        if self.moments == "int8":
            out += [StateTensor("exp_avg", torch.int8), StateTensor("exp_avg_sq", torch.uint8),
                    StateTensor("exp_avg_scale", torch.float32, True),
                    StateTensor("exp_avg_sq_scale", torch.float32, True)]
        else:
            out += [StateTensor("exp_avg", mdt[self.moments]), StateTensor("exp_avg_sq", mdt[self.moments])]
        return tuple(out)

    @property
    def master_dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @functools.cached_property
    def roles(self) -> tuple[str, ...]:
        return tuple(t.role for t in self.tensors)

    @functools.cached_property
    def chunked(self) -> tuple[StateTensor, ...]:
        """Tensors read and written chunk by chunk (the scales move whole: ``OutOfCoreAdamW``)."""
        return tuple(t for t in self.tensors if not t.per_block)

    def state_bytes(self, n: int) -> int:
        """Bytes of one copy of the state of ``n`` parameters."""
        return sum(t.numel(n) * t.itemsize for t in self.tensors)

    def bytes_per_param(self) -> float:
        return sum(t.itemsize / (QBLOCK if t.per_block else 1) for t in self.tensors)

    def master_is_compute(self, compute_dtype: torch.dtype) -> bool:
        """The master weights are the compute weights (no separate compute copy is stored): a bf16 master under
        bf16 compute, an fp32 master under fp32 compute (whose copy was the master's bytes again, written and
        read each step)."""
        return (self.master, compute_dtype) in (("bf16", torch.bfloat16), ("fp32", torch.float32))

    def align(self, checksum_block: int) -> int:
        """Chunk starts, in elements, that fall on a checksum block of every chunked tensor (and of
        2-byte compute weights) and on an int8 block."""
        smallest = min([2, *(t.itemsize for t in self.chunked)])
        a = max(1, checksum_block // smallest)
        return a * QBLOCK // math.gcd(a, QBLOCK)

    @property
    def kernel_speed(self) -> float:
        """The fused kernel's parameters/s relative to the fp32 kernel's (``KERNEL_SPEED``, measured)."""
        return KERNEL_SPEED[(self.master, self.moments)]

    def chunk_elements(self, optimizer_chunk: int, checksum_block: int) -> int:
        """Elements per chunk of the out-of-core pipeline for ``offload.optimizer_chunk`` (counted in fp32
        state's elements): as many as keep a chunk's bytes, and so the SSD requests' size, what fp32 state
        gives (a third more elements per byte of int8 codes), rounded up to ``align``."""
        per = sum(t.itemsize for t in self.chunked)
        n = -(-optimizer_chunk * 12 // per)
        a = self.align(checksum_block)
        return max(a, -(-n // a) * a)

    def describe(self) -> str:
        return f"master {self.master}, moments {self.moments} ({self.bytes_per_param():.3g} B/param)"


# -- stochastic rounding noise -------------------------------------------------------------------

def lowbias32(x: int) -> int:
    """A 32-bit integer hash (C. Wellons' lowbias32) of a Python int."""
    x &= _MASK
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def sr_key(seed: int, step: int, stage: int) -> int:
    """The stochastic-rounding key of one stage's update at ``step`` (Note: [Compressed state])."""
    return lowbias32((seed & _MASK) ^ lowbias32((step & _MASK) ^ lowbias32(stage + 0x9E3779B9)))


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 ``x`` in [0, 2^32), without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + ((hi * c) << 16)) & _MASK


def stochastic_bf16(p: Tensor, key: int, index0: int) -> Tensor:
    """fp32 ``p`` (flat; element j has index ``index0 + j``) rounded stochastically to bf16."""
    idx = torch.arange(p.numel(), dtype=torch.int64) + index0
    r = _mul32((idx + key) & _MASK, 0x9E3779B1) >> 16
    bits = p.view(torch.int32).to(torch.int64) & _MASK
    out = ((bits + r) >> 16) & 0xFFFF
    out = torch.where(torch.isnan(p), torch.full_like(out, 0x7FC0), out)
    return out.to(torch.int32).to(torch.int16).view(torch.bfloat16)  # low 16 bits, two's complement


def bf16_rne(x: Tensor) -> Tensor:
    """fp32 -> bf16, round to nearest even, NaN as the canonical 0x7FC0 (as the kernel; torch's own
    conversion writes NaN as 0xFFFF)."""
    u = x.view(torch.int32).to(torch.int64) & _MASK
    b = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    b = torch.where(torch.isnan(x), torch.full_like(b, 0x7FC0), b)
    return b.to(torch.int32).to(torch.int16).view(torch.bfloat16)


# -- int8 block codes ----------------------------------------------------------------------------

def _blocks(x: Tensor) -> Tensor:
    n = x.numel()
    nb = -(-n // QBLOCK)
    if nb * QBLOCK != n:
        x = torch.cat([x, x.new_zeros(nb * QBLOCK - n)])
    return x.view(nb, QBLOCK)


def _expand(scale: Tensor, n: int) -> Tensor:
    return scale[:, None].expand(-1, QBLOCK).reshape(-1)[:n].contiguous()


M_BIAS = (127 - 15) << 3    # m codes: 4 exponent bits (x in [2^-15, 1]) and 3 mantissa bits
V_BIAS = (127 - 31) << 3    # v codes: 5 exponent bits (x in [2^-31, 1]) and 3 mantissa bits


def _minifloat(x: Tensor, bias: int) -> Tensor:
    """x >= 0 (fp32) -> its bits rounded to 3 mantissa bits (nearest, a tie up), as (exponent << 3 |
    mantissa) - ``bias``: ``(bits + 2^19 - (bias << 20)) mod 2^32`` read as a signed 32-bit integer and
    shifted right by 20, as the kernel does it (a NaN from inf * 0 has its sign bit set)."""
    u = x.view(torch.int32).to(torch.int64) & _MASK
    w = (u + 0x80000 - (bias << 20)) & _MASK
    return (w - ((w >> 31) << 32)) >> 20  # signed: floor division, the kernel's arithmetic shift


def _from_code(c: Tensor) -> Tensor:
    return (c.to(torch.int64) << 20).to(torch.int32).view(torch.float32)


def _inverse(a: Tensor) -> Tensor:
    return torch.where(a > 0, torch.ones_like(a) / torch.where(a > 0, a, torch.ones_like(a)), torch.zeros_like(a))


def _absmax(x: Tensor) -> Tensor:
    """Each block's largest ``|x|``, as the kernel finds it: the largest bits of ``|x|`` read as integers
    (the float order for finite values; a NaN keeps its payload, where ``amax`` would make it canonical)."""
    return _blocks(x.abs()).view(torch.int32).amax(1).view(torch.float32)


def encode_m(m: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 m -> (int8 codes, fp32 block scales)."""
    a = _absmax(m)
    c = _minifloat(m.abs() * _expand(_inverse(a), m.numel()), M_BIAS).clamp(0, 127)
    return torch.where(torch.signbit(m), -c, c).to(torch.int8), a


def decode_m(q: Tensor, a: Tensor) -> Tensor:
    c = q.to(torch.int64).abs()
    x = torch.where(c == 0, torch.zeros(c.shape), _from_code(c + M_BIAS))
    return torch.where(q < 0, -x, x) * _expand(a, q.numel())  # the sign on the code, as the kernel: a NaN scale's bits win


def encode_v(v: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 v (>= 0) -> (uint8 codes, fp32 block scales)."""
    a = _absmax(v)
    c = _minifloat(v * _expand(_inverse(a), v.numel()), V_BIAS).clamp(0, 255)
    return c.to(torch.uint8), a


def decode_v(q: Tensor, a: Tensor) -> Tensor:
    return _from_code(q.to(torch.int64) + V_BIAS) * _expand(a, q.numel())


# -- the reference update --------------------------------------------------------------------------

def decode_state(fmt: StateFormat, state: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(master, m, v) in fp32 from the stored tensors (fresh tensors)."""
    p = state["master"].float().clone()
    if fmt.moments == "int8":
        m = decode_m(state["exp_avg"], state["exp_avg_scale"])
        v = decode_v(state["exp_avg_sq"], state["exp_avg_sq_scale"])
    else:
        m, v = state["exp_avg"].float().clone(), state["exp_avg_sq"].float().clone()
    return p, m, v


def encode_state(fmt: StateFormat, p: Tensor, m: Tensor, v: Tensor, state: dict[str, Tensor], *,
                 key: int, index0: int) -> None:
    """Store fp32 (master, m, v) into ``state``'s tensors, in place (Note: [Compressed state])."""
    if fmt.master == "bf16":
        state["master"].copy_(stochastic_bf16(p, key, index0))
    else:
        state["master"].copy_(p)
    if fmt.moments == "int8":
        for role, enc, x in (("exp_avg", encode_m, m), ("exp_avg_sq", encode_v, v)):
            q, a = enc(x)
            state[role].copy_(q)
            state[role + "_scale"].copy_(a)
    elif fmt.moments == "bf16":
        state["exp_avg"].copy_(bf16_rne(m))
        state["exp_avg_sq"].copy_(bf16_rne(v))
    else:
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)


def new_state(fmt: StateFormat, master: Tensor) -> dict[str, Tensor]:
    """A fresh state (zero moments) for fp32 initial weights ``master`` (flat). A bf16 master starts
    from the weights rounded to nearest (the initial values are not an update)."""
    n = master.numel()
    out = {t.role: torch.zeros(t.numel(n), dtype=t.dtype) for t in fmt.tensors}
    out["master"].copy_(master)
    return out


def reference_adamw_(fmt: StateFormat, state: dict[str, Tensor], grad: Tensor, *, segments, lr: float,
                     beta1: float, beta2: float, eps: float, step: int, grad_scale: float = 1.0,
                     key: int = 0, index0: int = 0, out_lowp: Tensor | None = None) -> None:
    """One AdamW step over a stage's stored state, in plain PyTorch: the math the fused kernel
    (``fused_adamw_q_``) reproduces bit for bit. ``segments``: (start, end, weight_decay) ranges of the
    flat state; ``index0``: the stage index of element 0 (a multiple of ``QBLOCK``)."""
    from fuyou.optim.adamw import _scalars, _torch_adamw_

    p, m, v = decode_state(fmt, state)
    g = grad.reshape(-1)
    for s, e, wd in segments:
        if s < e:
            decay, w1, b2, c2, bc2s, eps_, ns = _scalars(lr, beta1, beta2, eps, wd, step)
            # one division (Note: [Compressed state], 2): dividing by 1.0 is exact
            sc = (decay, w1, b2, c2, 1.0, eps_ * bc2s, ns * bc2s)
            _torch_adamw_(p[s:e], g[s:e], m[s:e], v[s:e], None, sc, float(grad_scale))
    encode_state(fmt, p, m, v, state, key=key, index0=index0)
    if out_lowp is not None:
        master = state["master"]
        out_lowp.copy_(bf16_rne(master) if out_lowp.dtype == torch.bfloat16 and master.dtype == torch.float32
                       else master)


# -- the fused kernel ------------------------------------------------------------------------------

_PTYPE = {torch.float32: 0, torch.bfloat16: 1}
_MTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 3}
_LTYPE = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


def fused_adamw_q_(fmt: StateFormat, state: dict[str, Tensor], grad: Tensor, *, segments, lr: float,
                   beta1: float, beta2: float, eps: float, step: int, grad_scale: float = 1.0, key: int = 0,
                   index0: int = 0, out_lowp: Tensor | None = None, num_threads: int | None = None,
                   backend: str | None = None, src: dict[str, Tensor] | None = None) -> str:
    """``reference_adamw_`` in one fused pass (adamw.cpp, compressed state): the same bits. ``state``
    holds the chunk's tensors (the scales of its blocks for int8); ``segments`` are relative to the
    chunk. Falls back to the reference when the C++ library is unavailable or ``backend="torch"``.
    ``src``: out of place, the tensors read (like ``state``, which is then only written; the same
    bits as copying them over first: adamw.cpp, Note: [Out of place])."""
    from fuyou.kernels.build import load_adamw_lib
    from fuyou.optim.adamw import _GTYPE, _ISA, _ISA_NAME, _check_src, _scalars

    n = state["master"].numel()
    if index0 % QBLOCK:
        raise ValueError(f"fused_adamw_q_: a chunk starts on a block of {QBLOCK} (index0={index0})")
    for name, t in (("grad", grad), ("out_lowp", out_lowp), *((r, state[r]) for r in fmt.roles)):
        if t is None:
            continue
        want = fmt.tensors[fmt.roles.index(name)] if name in fmt.roles else None
        numel = want.numel(n) if want is not None else n
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() != numel:
            raise ValueError(f"fused_adamw_q_: {name} must be a contiguous CPU tensor of {numel} elements; got "
                             f"device={t.device}, contiguous={t.is_contiguous()}, numel={t.numel()}")
        if want is not None and t.dtype != want.dtype:
            raise TypeError(f"fused_adamw_q_: {name} has dtype {t.dtype}, the format stores {want.dtype}")
    if out_lowp is not None and (out_lowp.dtype not in _LTYPE or (fmt.master == "bf16" and out_lowp.dtype == torch.float16)):
        raise TypeError(f"fused_adamw_q_: out_lowp dtype {out_lowp.dtype} is not one of bf16, fp32"
                        + ("" if fmt.master == "bf16" else ", fp16"))
    segs = [(s, e, wd) for s, e, wd in segments if s < e]
    if len(segs) > 64:
        raise ValueError("fused_adamw_q_: at most 64 weight-decay segments per call")
    if n and (not segs or segs[0][0] != 0 or segs[-1][1] != n
              or any(e0 != s1 for (_, e0, _), (s1, _, _) in zip(segs, segs[1:]))):
        raise ValueError(f"fused_adamw_q_: the segments must cover [0, {n}) in order; got {segments}")
    if src is not None:
        _check_src([src[r] for r in fmt.roles], [state[r] for r in fmt.roles], "fused_adamw_q_")
    lib = None if backend == "torch" else load_adamw_lib()
    if lib is None:
        if src is not None:
            for r in fmt.roles:
                state[r].copy_(src[r])
        reference_adamw_(fmt, state, grad, segments=segments, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step,
                         grad_scale=grad_scale, key=key, index0=index0, out_lowp=out_lowp)
        return "torch"
    if n == 0:
        return _ISA_NAME[lib.fuyou_adamw_best_isa()]
    sc0 = _scalars(lr, beta1, beta2, eps, 0.0, step)
    ends = torch.tensor([e for _, e, _ in segs], dtype=torch.int64)
    decays = torch.tensor([_scalars(lr, beta1, beta2, eps, wd, step)[0] for _, _, wd in segs], dtype=torch.float64)
    int8 = fmt.moments == "int8"
    ms = state["exp_avg_scale"].data_ptr() if int8 else None
    vs = state["exp_avg_sq_scale"].data_ptr() if int8 else None
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    isa = _ISA.get(backend, -1) if backend is not None else -1
    used = lib.fuyou_adamw_q_step(
        state["master"].data_ptr(), _PTYPE[state["master"].dtype], grad.data_ptr(), _GTYPE[grad.dtype],
        state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(),
        3 if int8 else _MTYPE[state["exp_avg"].dtype], ms, vs,
        None if out_lowp is None else out_lowp.data_ptr(), 0 if out_lowp is None else _LTYPE[out_lowp.dtype],
        n, index0, key & _MASK, ends.data_ptr(), decays.data_ptr(), len(segs), *sc0[1:], float(grad_scale),
        max(1, threads), isa,
        *((None,) * 5 if src is None else
          (src[r].data_ptr() if r in src else None
           for r in ("master", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"))))
    return _ISA_NAME[used]
