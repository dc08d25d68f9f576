"""Fused CPU AdamW: the in-memory kernel that the out-of-core optimizer runs on each chunk.

:func:`fused_adamw_` updates one flat, contiguous slice of parameters in a single pass: it reads the
fp32 master weight, the gradient (fp32, bf16 or fp16), m and v, and writes the new weight, m, v and,
if ``out_lowp`` is given, the bf16/fp16 copy of the new weight that the next forward needs. Writing
that copy in the same pass is what saves a whole pass over the weights compared with
``torch.optim.AdamW(fused=True)`` followed by ``.to(torch.bfloat16)``.

Semantics are ``torch.optim.AdamW`` (decoupled weight decay, bias correction) applied to the
effective gradient ``grad.float() * grad_scale``. Exactness: the C++ kernel repeats torch's float
operations in the same order (see the note [Bit-exact with torch] in ``fuyou/kernels/adamw.cpp``),
with the scalars (``1 - lr*wd``, ``lr / (1 - beta1**step)``, ``(1 - beta2**step) ** 0.5``) computed
here in double precision as torch does, so it is **bit-exact with torch.optim.AdamW(fused=True)**
on CPU (tested over 10 steps). Against ``foreach=False`` it is exact on m and v and within a few
ulps on the weight (max 2.4e-7 absolute after 10 steps at lr=1e-2): torch's elementwise
``Tensor.sqrt`` on CPU (MKL VML) is not correctly rounded, while ours, like the fused kernel's, is.
The copy in ``out_lowp`` equals ``param.to(out_lowp.dtype)`` (round to nearest even, NaN kept).
All backends (AVX-512, AVX2, scalar, torch) give the same bits, so a chunked caller may split a
tensor anywhere and a machine without a compiler computes the same numbers.

The step count and its bias corrections are plain scalars: a caller that updates a layer chunk by
chunk passes the same ``step`` for every chunk.
"""

from __future__ import annotations

import torch

from fuyou.errors import ConfigError
from fuyou.kernels.build import load_adamw_lib
from fuyou.optim.config import AdamWConfig

__all__ = ["AdamWConfig", "fused_adamw_", "adamw_backend", "BACKENDS"]

#: Backend names, fastest first. "torch" is the pure-torch fallback.
BACKENDS = ("avx512", "avx2", "scalar", "torch")
_ISA = {"scalar": 0, "avx2": 1, "avx512": 2}
_ISA_NAME = {v: k for k, v in _ISA.items()}
_GTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_LTYPE = {torch.bfloat16: 1, torch.float16: 2}


def adamw_backend() -> str:
    """The backend :func:`fused_adamw_` uses by default: "avx512", "avx2", "scalar" or "torch".

    The first call builds the C++ extension if needed (seconds); "torch" means it is unavailable
    (``FUYOU_NO_EXT=1``, no compiler, or a build error, which was logged once).
    """
    lib = load_adamw_lib()
    return "torch" if lib is None else _ISA_NAME[lib.fuyou_adamw_best_isa()]


def _check(param, grad, exp_avg, exp_avg_sq, out_lowp) -> None:
    n = param.numel()
    for name, t, dtypes in (("param", param, (torch.float32,)), ("grad", grad, tuple(_GTYPE)),
                            ("exp_avg", exp_avg, (torch.float32,)),
                            ("exp_avg_sq", exp_avg_sq, (torch.float32,)),
                            ("out_lowp", out_lowp, tuple(_LTYPE))):
        if t is None:
            continue
        if t.dtype not in dtypes:
            raise TypeError(f"fused_adamw_: {name} has dtype {t.dtype}, expected one of {dtypes}")
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() != n:
            raise ValueError(f"fused_adamw_: {name} must be a contiguous CPU tensor with {n} "
                             f"elements like param; got device={t.device}, "
                             f"contiguous={t.is_contiguous()}, numel={t.numel()}")


def _scalars(lr, beta1, beta2, eps, weight_decay, step):
    """The step's scalars, computed in double exactly as torch's single-tensor AdamW computes them."""
    if not (lr >= 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and eps > 0 and weight_decay >= 0):
        raise ConfigError(f"AdamW hyperparameters out of range: lr={lr} (>= 0), beta1={beta1}, "
                          f"beta2={beta2} (in [0, 1)), eps={eps} (> 0), "
                          f"weight_decay={weight_decay} (>= 0)")
    if step < 1:
        raise ConfigError(f"AdamW step must be >= 1 (the first update is step 1), got {step}")
    decay = 1 - lr * weight_decay if weight_decay != 0 else 1.0
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    return decay, 1 - beta1, beta2, 1 - beta2, bias_correction2_sqrt, eps, -step_size


def _torch_adamw_(param, grad, exp_avg, exp_avg_sq, out_lowp, sc, grad_scale, torch_tail: bool = False) -> None:
    """Pure-torch fallback: torch's own single-tensor ops, so bit-identical to the kernel.

    Costs about 4x the kernel's time and two fp32 temporaries of the slice's size (the effective
    gradient and the denominator); ``num_threads`` is not honoured (torch's intra-op pool is used).
    ``torch_tail``: v as torch's fused kernel computes a tensor's last elements, fma(v, b2, (c2*g)*g),
    here through fp64 (exact but for a double rounding, once in about 2**29 elements).
    """
    decay, w1, beta2, c2, bc2s, eps, neg_step = sc
    g = grad.to(torch.float32, copy=grad.dtype != torch.float32 or grad_scale != 1.0)
    if grad_scale != 1.0:
        g.mul_(grad_scale)
    if decay != 1.0:
        param.mul_(decay)
    exp_avg.lerp_(g, w1)
    if torch_tail:
        t = (g * torch.tensor(c2, dtype=torch.float32)) * g
        exp_avg_sq.copy_((exp_avg_sq.double() * torch.tensor(beta2, dtype=torch.float32).double()).add_(t.double()))
    else:
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=c2)
    # torch.sqrt on CPU (MKL VML) is not correctly rounded for fp32; through fp64 it is (fp64 has
    # more than 2*24+2 bits), which the kernel's IEEE sqrt gives. Costs an fp64 temporary.
    denom = (exp_avg_sq.double().sqrt_().float() / bc2s).add_(eps)
    param.addcdiv_(exp_avg, denom, value=neg_step)
    if out_lowp is not None:
        out_lowp.copy_(param)


def fused_adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, step: int, grad_scale: float = 1.0,
                 out_lowp: torch.Tensor | None = None, num_threads: int | None = None,
                 backend: str | None = None, src: tuple[torch.Tensor, ...] | None = None,
                 torch_tail: bool = False) -> str:
    """One AdamW step, in place, over contiguous CPU tensors with the same number of elements.

    Args:
        param: fp32 master weights, updated in place.
        grad: fp32, bf16 or fp16 gradient; the step uses ``grad.float() * grad_scale``.
        exp_avg, exp_avg_sq: fp32 Adam moments m and v, updated in place.
        lr, beta1, beta2, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled decay
            ``p *= 1 - lr*weight_decay`` before the Adam update).
        step: the step number, 1 for the first update (bias corrections ``1 - beta**step``).
        grad_scale: multiplies the gradient: pass ``1/loss_scale`` to unscale, times a clipping
            factor ``min(1, max_norm/total_norm)`` to clip. Rounded to fp32, as torch's ``mul_``.
        out_lowp: optional bf16/fp16 tensor that receives ``param.to(out_lowp.dtype)`` of the new
            weight, written in the same pass.
        num_threads: threads for this call (default ``torch.get_num_threads()``): the calling
            thread and helpers of the kernel's own pool, not OpenMP (adamw.cpp, note [Own threads,
            not OpenMP]). Calls from several Python threads run concurrently (the GIL is released):
            one uses the pool, the others run on their calling thread alone. Work is split in
            64K-element blocks, so a slice under 128K elements uses one thread.
        backend: force "avx512", "avx2", "scalar" or "torch" (a SIMD level above the CPU's is
            lowered to the best available); default: the fastest available.
        src: out of place: the (param, exp_avg, exp_avg_sq) the step reads, left as they are;
            ``param``, ``exp_avg`` and ``exp_avg_sq`` are then only written. The same bits as
            copying them over first (adamw.cpp, Note: [Out of place]), for the memory traffic of
            an in-place step. They must not overlap the destination.
        torch_tail: the elements are a tensor's last ``numel % torch_tail_width()``, which torch's fused
            AdamW updates with another rounding of v (adamw.cpp, Note: [Bit-exact with torch]): the same
            here (scalar, on the calling thread: a tail is a few elements).

    Returns:
        The backend that ran. Results are bit-identical whichever it is.

    Raises:
        TypeError, ValueError: a tensor has the wrong dtype, device, layout or size.
        ConfigError: a hyperparameter is out of range or ``step < 1``.
    """
    _check(param, grad, exp_avg, exp_avg_sq, out_lowp)
    if src is not None:
        _check_src(src, (param, exp_avg, exp_avg_sq), "fused_adamw_")
    sc = _scalars(lr, beta1, beta2, eps, weight_decay, step)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"fused_adamw_: backend must be one of {BACKENDS}, got {backend!r}")
    lib = None if backend == "torch" else load_adamw_lib()
    if lib is None:
        if src is not None:
            for d, s_ in zip((param, exp_avg, exp_avg_sq), src):
                d.copy_(s_)
        _torch_adamw_(param, grad, exp_avg, exp_avg_sq, out_lowp, sc, float(grad_scale), torch_tail)
        return "torch"
    if param.numel() == 0:
        return _ISA_NAME[lib.fuyou_adamw_best_isa()]
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    lowp_ptr = None if out_lowp is None else out_lowp.data_ptr()
    ltype = 0 if out_lowp is None else _LTYPE[out_lowp.dtype]
    if torch_tail:
        used = lib.fuyou_adamw_tail_step(
            param.data_ptr(), grad.data_ptr(), _GTYPE[grad.dtype], exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
            lowp_ptr, ltype, param.numel(), *sc, float(grad_scale),
            *((None,) * 3 if src is None else (t.data_ptr() for t in src)))
        return _ISA_NAME[used]
    isa = _ISA.get(backend, -1) if backend is not None else -1
    # ctypes releases the GIL here; the tensors stay alive (the caller holds them) for the call.
    used = lib.fuyou_adamw_step(
        param.data_ptr(), grad.data_ptr(), _GTYPE[grad.dtype], exp_avg.data_ptr(),
        exp_avg_sq.data_ptr(), lowp_ptr, ltype, param.numel(), *sc, float(grad_scale),
        max(1, threads), isa, *((None,) * 3 if src is None else (t.data_ptr() for t in src)))
    return _ISA_NAME[used]


def _check_src(src, dst, who: str) -> None:
    """An out-of-place step's source tensors: like their destinations, and apart from them."""
    if len(src) != len(dst):
        raise ValueError(f"{who}: src holds {len(src)} tensors, the state {len(dst)}")
    for s, d in zip(src, dst):
        if s.dtype != d.dtype or s.device.type != "cpu" or not s.is_contiguous() or s.numel() != d.numel():
            raise ValueError(f"{who}: a source tensor must be a contiguous CPU tensor like its destination "
                             f"({d.dtype}, {d.numel()} elements); got {s.dtype}, {s.numel()} elements")
        a, b = s.data_ptr(), d.data_ptr()
        n = s.numel() * s.element_size()
        if n and a < b + n and b < a + n:
            raise ValueError(f"{who}: a source tensor overlaps its destination (pass src=None for in place)")


def grad_norm(t: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
    """The 2-norm of a CPU gradient as a 0-d fp32 tensor. bf16 and fp16: the kernel's sum of squares in one
    read (adamw.cpp, Note: [Gradient norm on the CPU]), not torch's fp32 copy first; fp32, a tensor on
    another device, or no kernel: torch's ``vector_norm`` of ``t.float()`` (fp32: the reference's bits)."""
    lib = None
    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16) and t.is_contiguous():
        lib = load_adamw_lib()
    if lib is None:
        return torch.linalg.vector_norm(t.float().contiguous(), 2)
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    total = lib.fuyou_sumsq(t.data_ptr(), _GTYPE[t.dtype], t.numel(), max(1, threads))
    return torch.tensor(total ** 0.5, dtype=torch.float32)


_TAIL_WIDTH: int | None = None


def torch_tail_width() -> int:
    """W such that torch's fused CPU AdamW updates each tensor's last ``numel % W`` elements with v rounded as
    ``fused_adamw_(torch_tail=True)`` does (adamw.cpp, Note: [Bit-exact with torch]); 0 when its tail is
    like its body. Measured once a process against the torch it runs with: 32 tensors of 1087 elements
    (a remainder of 63, 31, 15, 7 and 3 for W = 64 ... 4), tens of milliseconds. Should torch's tail match
    neither form, or torch have no fused CPU AdamW, 0: the equivalence with torch is then within an ulp of v
    at tensors' ends."""
    global _TAIL_WIDTH
    if _TAIL_WIDTH is None:
        try:
            _TAIL_WIDTH = _measure_tail_width()
        except (RuntimeError, AttributeError, NotImplementedError):  # (a torch without the op: nothing to match)
            _TAIL_WIDTH = 0
    return _TAIL_WIDTH


def _measure_tail_width(n: int = 1087, k: int = 32) -> int:
    gen = torch.Generator().manual_seed(0)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    start = [(torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.1,
              torch.rand(n, generator=gen) * 0.1) for _ in range(k)]  # (p, g, m, v)
    theirs = [(p.clone(), m.clone(), v.clone()) for p, _, m, v in start]
    # what torch.optim.AdamW(fused=True) calls (its step count already advanced); torch.optim itself would
    # cost a second to import
    torch._fused_adamw_([t[0] for t in theirs], [g for _, g, _, _ in start], [t[1] for t in theirs],
                        [t[2] for t in theirs], [], [torch.tensor(3.0) for _ in start], amsgrad=False,
                        maximize=False, **hp)
    body_ok, tail_ok = [], []
    for (p, g, m, v), ref in zip(start, theirs):
        for ok, tail in ((body_ok, False), (tail_ok, True)):
            mine = (p.clone(), m.clone(), v.clone())
            fused_adamw_(mine[0], g, mine[1], mine[2], step=3, torch_tail=tail, **hp)
            ok.append(torch.stack([a == b for a, b in zip(mine, ref)]).all(0))
    body, tail = torch.stack(body_ok), torch.stack(tail_ok)
    if bool(body.all()):
        return 0
    for w in (64, 32, 16, 8, 4, 2):
        cut = n - n % w
        if bool(body[:, :cut].all()) and bool(tail[:, cut:].all()):
            return w
    return 0
