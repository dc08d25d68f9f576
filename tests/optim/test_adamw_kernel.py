"""The fused AdamW kernel against torch.optim.AdamW, across backends, dtypes, chunks and threads."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest
import torch
from pydantic import ValidationError

from fuyou.errors import ConfigError
from fuyou.kernels import build
from fuyou.optim import BACKENDS, AdamWConfig, adamw_backend, fused_adamw_

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
SIMD_RANK = {"scalar": 0, "avx2": 1, "avx512": 2}


@pytest.fixture(scope="session")
def backends() -> list[str]:
    """Backends this machine can run; builds the extension once (seconds) for the whole session."""
    best = adamw_backend()
    if best == "torch":
        return ["torch"]
    return [b for b in BACKENDS if b == "torch" or SIMD_RANK[b] <= SIMD_RANK[best]]


def _need(backend: str, backends: list[str]) -> None:
    if backend not in backends:
        pytest.skip(f"backend {backend} not available here (have {backends})")


def _state(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n)


def _grads(n: int, steps: int, dtype: torch.dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(dtype) for _ in range(steps)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("grad_scale", [1.0, 0.25])
def test_matches_torch_adamw(backends, backend, gdtype, wd, grad_scale):
    """10 steps vs torch.optim.AdamW(foreach=False), checked after every step (step 1 included).

    Odd size (1003 = 62*16 + 11): exercises the SIMD body and the scalar tail.
    """
    _need(backend, backends)
    n, steps = 1003, 10
    p, m, v = _state(n)
    lowp = torch.empty(n, dtype=torch.bfloat16 if gdtype != torch.float16 else torch.float16)
    ref = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([ref], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=wd, foreach=False)
    for step, g in enumerate(_grads(n, steps, gdtype), start=1):
        ref.grad = g.float() * grad_scale
        opt.step()
        used = fused_adamw_(p, g, m, v, weight_decay=wd, step=step, grad_scale=grad_scale,
                            out_lowp=lowp, backend=backend, **HYPER)
        assert used == backend
        st = opt.state[ref]
        torch.testing.assert_close(p, ref.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(m, st["exp_avg"], rtol=0, atol=1e-6)
        torch.testing.assert_close(v, st["exp_avg_sq"], rtol=0, atol=1e-6)
        assert torch.equal(lowp, p.to(lowp.dtype))


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_bit_exact_vs_torch_fused(backends, wd):
    """Bit-exact with torch's fused CPU AdamW (whose sqrt, like ours, is correctly rounded)."""
    n = 4096
    p, m, v = _state(n)
    ref = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([ref], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=wd, fused=True)
    for step, g in enumerate(_grads(n, 10, torch.float32), start=1):
        ref.grad = g.clone()
        opt.step()
        fused_adamw_(p, g, m, v, weight_decay=wd, step=step, **HYPER)
    assert torch.equal(p, ref.detach())
    assert torch.equal(m, opt.state[ref]["exp_avg"])
    assert torch.equal(v, opt.state[ref]["exp_avg_sq"])


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("n", [1, 7, 36, 1003, 4109])
def test_bit_exact_vs_torch_fused_at_a_tensors_end(backends, n, backend):
    """torch's fused AdamW updates a tensor's last numel % W elements in a scalar loop that rounds v otherwise
    than its vector body (adamw.cpp, Note: [Bit-exact with torch]): with ``torch_tail`` there, bit-exact at any
    size, out of place too (a pass found widths not a multiple of 8 an ulp off in v, then in the weights)."""
    from fuyou.optim.adamw import torch_tail_width

    w = torch_tail_width()
    cut = n - (n % w if w else 0)
    p, m, v = _state(n)
    ref = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([ref], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=0.1, fused=True)
    for step, g in enumerate(_grads(n, 6, torch.float32), start=1):
        ref.grad = g.clone()
        opt.step()
        src = (p.clone(), m.clone(), v.clone()) if step % 2 else None
        for a, b, tail in ((0, cut, False), (cut, n, True)):
            if a < b:
                fused_adamw_(p[a:b], g[a:b], m[a:b], v[a:b], weight_decay=0.1, step=step, torch_tail=tail,
                             src=None if src is None else tuple(t[a:b] for t in src), backend=backend, **HYPER)
    assert torch.equal(p, ref.detach())
    assert torch.equal(m, opt.state[ref]["exp_avg"])
    assert torch.equal(v, opt.state[ref]["exp_avg_sq"])


def _run(backend, gdtype, ldtype, chunks=None, n=300_007, steps=3, num_threads=None):
    p, m, v = _state(n)
    lowp = torch.empty(n, dtype=ldtype)
    bounds = chunks or [0, n]
    for step, g in enumerate(_grads(n, steps, gdtype), start=1):
        for a, b in zip(bounds[:-1], bounds[1:]):
            fused_adamw_(p[a:b], g[a:b], m[a:b], v[a:b], weight_decay=0.05, step=step,
                         grad_scale=0.37, out_lowp=lowp[a:b], backend=backend,
                         num_threads=num_threads, **HYPER)
    return p, m, v, lowp


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ldtype", [torch.bfloat16, torch.float16])
def test_backends_bit_identical(backends, gdtype, ldtype):
    """All backends give the same bits (300007 elements: several 64K blocks, ragged end)."""
    results = {b: _run(b, gdtype, ldtype) for b in backends}
    first = results[backends[0]]
    for b, r in results.items():
        for x, y in zip(first, r):
            assert torch.equal(x, y), f"{b} differs from {backends[0]}"


def test_chunked_equals_whole(backends):
    """The out-of-core contract: updating a tensor chunk by chunk gives identical bits."""
    whole = _run(None, torch.bfloat16, torch.bfloat16)
    chunked = _run(None, torch.bfloat16, torch.bfloat16,
                   chunks=[0, 7, 65_543, 65_600, 200_001, 300_007])
    single = _run(None, torch.bfloat16, torch.bfloat16, num_threads=1)
    for x, y, z in zip(whole, chunked, single):
        assert torch.equal(x, y) and torch.equal(x, z)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conversions_exhaustive(backends, backend):
    """Every fp16/bf16 gradient value converts exactly; the low-precision copy equals torch's cast,
    including fp16 overflow, subnormals, infinities and NaN (lr=0 leaves the weight unchanged)."""
    _need(backend, backends)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for dt in (torch.float16, torch.bfloat16):
        g = bits.view(dt)
        g = g[torch.isfinite(g)].contiguous()  # fma(0, inf - m, inf) is NaN
        n = g.numel()
        p, m, v = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        # beta1 = 0 makes m = fma(0, g - m, g) = g exactly.
        fused_adamw_(p, g, m, v, lr=0.0, beta1=0.0, beta2=0.9, eps=1e-8, weight_decay=0.0,
                     step=1, backend=backend)
        assert torch.equal(m, g.float())
    gen = torch.Generator().manual_seed(3)
    scales = torch.tensor([1e-9, 1e-7, 6e-5, 1e-3, 1.0, 3e4, 6.55e4, 7e4, 1e38])
    p = (torch.randn(len(scales), 4096, generator=gen) * scales[:, None]).flatten()
    p = torch.cat([p, torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0,
                                    65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26])])
    for dt in (torch.float16, torch.bfloat16):
        lowp = torch.empty(p.numel(), dtype=dt)
        q = p.clone()
        fused_adamw_(q, torch.zeros_like(q), torch.zeros_like(q), torch.zeros_like(q), lr=0.0,
                     weight_decay=0.0, step=1, out_lowp=lowp, backend=backend,
                     beta1=0.9, beta2=0.999, eps=1e-8)
        expect = p.to(dt)
        nan = torch.isnan(expect)
        assert torch.equal(torch.isnan(lowp), nan)
        assert torch.equal(lowp[~nan].view(torch.int16), expect[~nan].view(torch.int16))


def test_threads_concurrent_equal_sequential(backends):
    """Several Python threads updating different layers at once match a sequential run."""
    n, layers = 200_003, 4

    def make():
        out = []
        for i in range(layers):
            p, m, v = _state(n, seed=10 + i)
            out.append((p, _grads(n, 1, torch.bfloat16, seed=20 + i)[0], m, v,
                        torch.empty(n, dtype=torch.bfloat16)))
        return out

    def work(layer, threads):
        p, g, m, v, lo = layer
        for step in range(1, 4):
            fused_adamw_(p, g, m, v, weight_decay=0.1, step=step, out_lowp=lo,
                         num_threads=threads, **HYPER)

    seq = make()
    for layer in seq:
        work(layer, 1)
    conc = make()
    errors: list[BaseException] = []

    def guarded(layer, threads):
        try:
            work(layer, threads)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    ts = [threading.Thread(target=guarded, args=(layer, 1 + i % 2)) for i, layer in enumerate(conc)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for a, b in zip(seq, conc):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_helper_threads_shared_by_every_caller(backends):
    """The kernel's helpers are one pool for every calling thread (adamw.cpp, note [Own threads, not
    OpenMP]): an OpenMP kernel would start a team per calling thread, and with more libgomp threads
    than cores torch's own team stops spinning between ops (a measured 1.8x on a small forward).
    Calls from a second and a third live thread add no OS thread after the first call's helpers."""
    if adamw_backend() == "torch":
        pytest.skip("the compiled kernel is not available here")
    n = 1 << 20  # 16 blocks: every helper gets work
    p, m, v = _state(n)
    g = torch.randn(n, dtype=torch.bfloat16)

    def os_threads() -> int:
        return len(os.listdir("/proc/self/task"))

    def call():
        fused_adamw_(p, g, m, v, weight_decay=0.0, step=1, num_threads=4, **HYPER)

    counts, go, stop = [], threading.Event(), threading.Event()

    def caller():
        call()
        counts.append(os_threads())
        go.set()
        stop.wait()  # stays alive, as the engine's optimizer thread does

    alive = []
    for _ in range(3):
        go.clear()
        t = threading.Thread(target=caller)
        t.start()
        alive.append(t)
        go.wait()
    stop.set()
    for t in alive:
        t.join()
    # each new caller adds exactly itself (the counts are taken while every earlier caller lives)
    assert counts[1] - counts[0] == 1 and counts[2] - counts[1] == 1, counts


def test_env_forces_fallback():
    code = ("import torch; from fuyou.optim import adamw_backend, fused_adamw_;"
            "p=torch.ones(10); g=torch.ones(10); m=torch.zeros(10); v=torch.zeros(10);"
            "r=fused_adamw_(p,g,m,v,lr=0.1,beta1=0.9,beta2=0.999,eps=1e-8,weight_decay=0.0,step=1);"
            "print(adamw_backend(), r, round(p[0].item(), 4))")
    env = dict(os.environ, FUYOU_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split() == ["torch", "torch", "0.9"]


def test_build_failure_warns_once_and_falls_back(broken_kernel_build, caplog):
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert build.load_adamw_lib() is None
        assert build.load_adamw_lib() is None
        p, m, v = _state(100)
        assert fused_adamw_(p, torch.ones(100), m, v, weight_decay=0.0, step=1, **HYPER) == "torch"
        assert adamw_backend() == "torch"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "\n" not in warnings[0].getMessage() and "fallback" in warnings[0].getMessage()


def test_bad_arguments_raise_typed_errors():
    p, m, v = _state(8)
    g = torch.ones(8)
    with pytest.raises(TypeError):
        fused_adamw_(p.double(), g, m, v, weight_decay=0.0, step=1, **HYPER)
    with pytest.raises(ValueError):
        fused_adamw_(p, torch.ones(9), m, v, weight_decay=0.0, step=1, **HYPER)
    with pytest.raises(ValueError):
        fused_adamw_(torch.zeros(4, 4).t()[0], torch.ones(4), m[:4], v[:4], weight_decay=0.0,
                     step=1, **HYPER)
    with pytest.raises(ConfigError):
        fused_adamw_(p, g, m, v, weight_decay=0.0, step=0, **HYPER)
    with pytest.raises(ConfigError):
        fused_adamw_(p, g, m, v, weight_decay=-1.0, step=1, **HYPER)
    with pytest.raises(TypeError):
        fused_adamw_(p, g, m, v, weight_decay=0.0, step=1, out_lowp=torch.empty(8), **HYPER)


def test_config_model():
    cfg = AdamWConfig(lr=3e-4, beta1=0.9, beta2=0.95, weight_decay=0.1)
    assert cfg.eps == 1e-8
    with pytest.raises(ValidationError, match="beta2"):
        AdamWConfig(beta2=1.0)
    with pytest.raises(ValidationError):
        AdamWConfig(lr=-1.0)
    with pytest.raises(ValidationError):
        AdamWConfig(eps=0.0)
    with pytest.raises(ValidationError):
        AdamWConfig(momentum=0.9)
    assert all(f.description for f in AdamWConfig.model_fields.values())


@pytest.mark.parametrize("bad", [dict(beta1=1.0), dict(beta2=1.0), dict(beta1=-0.1), dict(eps=0.0), dict(lr=-1e-3),
                                 dict(weight_decay=-0.1), dict(step=0)])
def test_the_kernel_refuses_hyperparameters_out_of_range_and_leaves_the_state(bad):
    """A mutation audit: beta1 = 1 passed the kernel's own check (the config refuses it, the kernel is called by
    others too); it divides by a zero bias correction. Nothing is updated."""
    p, m, v = _state(1000)
    before = [t.clone() for t in (p, m, v)]
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1)
    hp.update(bad)
    with pytest.raises(ConfigError):
        fused_adamw_(p, torch.ones_like(p), m, v, **hp)
    assert all(torch.equal(a, b) for a, b in zip((p, m, v), before))
