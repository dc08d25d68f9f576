"""The compressed-state AdamW kernel (issue 19; fuyou/optim/compressed.py, Note: [Compressed state]):
bit-identical to the plain-PyTorch reference for every format, gradient dtype, compute copy and backend,
however the state is split into chunks; the codes and the stochastic rounding behave as documented."""

import itertools

import pytest
import torch

from fuyou.optim.adamw import _ISA, adamw_backend
from fuyou.optim.compressed import (QBLOCK, StateFormat, decode_m, decode_v, encode_m, encode_v, fused_adamw_q_,
                                    new_state, reference_adamw_, sr_key, stochastic_bf16)

FORMATS = [StateFormat(m, o) for m, o in itertools.product(("fp32", "bf16"), ("fp32", "bf16", "int8"))
           if (m, o) != ("fp32", "fp32")]
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8)
needs_ext = pytest.mark.skipif(adamw_backend() == "torch", reason="the C++ AdamW library is not built here")


def _backends():
    """The kernel's paths this CPU can run (a path it lacks would silently run a lower one)."""
    best = _ISA.get(adamw_backend(), 0)
    return [b for b in ("avx512", "avx2", "scalar") if _ISA[b] <= best]


def _state(fmt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    st = new_state(fmt, torch.randn(n, generator=g) * 0.02)
    return st


def _clone(st):
    return {k: v.clone() for k, v in st.items()}


def _equal(a, b):
    return all(torch.equal(a[k].view(torch.uint8) if a[k].dtype != torch.uint8 else a[k],
                           b[k].view(torch.uint8) if b[k].dtype != torch.uint8 else b[k]) for k in a)


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.master}-{f.moments}")
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lowp", [None, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tail", [77, 80])
def test_kernel_equals_reference(fmt, gdtype, lowp, tail):
    # a partial last block: 77 elements take the per-element path, 80 the vector path's shorter loops
    n = 5 * QBLOCK + tail
    segs = [(0, 300, 0.1), (300, 301, 0.0), (301, n, 0.1)]  # a segment boundary inside a block
    ref, ker = _state(fmt, n), _state(fmt, n)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        grad = (torch.randn(n, generator=gen) * (10.0 ** -step)).to(gdtype)
        grad[:QBLOCK] = 0 if step == 1 else grad[:QBLOCK]  # a block of zero moments
        key = sr_key(7, step, 3)
        lr_ref = None if lowp is None else torch.empty(n, dtype=lowp)
        reference_adamw_(fmt, ref, grad, segments=segs, step=step, grad_scale=0.5, key=key, index0=QBLOCK * 8,
                         out_lowp=lr_ref, **HYPER)
        for backend in _backends():
            k = _clone(ker)
            out = None if lowp is None else torch.empty(n, dtype=lowp)
            used = fused_adamw_q_(fmt, k, grad, segments=segs, step=step, grad_scale=0.5, key=key,
                                  index0=QBLOCK * 8, out_lowp=out, backend=backend, num_threads=2, **HYPER)
            assert used == backend
            assert _equal(k, ref), (backend, step)
            if lowp is not None:
                assert torch.equal(out, lr_ref)
        ker = k


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.master}-{f.moments}")
def test_chunked_calls_equal_one_call(fmt):
    n = 300_000  # several of the kernel's 64K work blocks and threads
    segs = [(0, 1000, 0.0), (1000, n, 0.1)]
    whole, parts = _state(fmt, n), _state(fmt, n)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    fused_adamw_q_(fmt, whole, grad, segments=segs, step=1, key=11, num_threads=2, **HYPER)
    cut = 128 * QBLOCK
    for s, e in ((0, cut), (cut, n)):
        view = {r: (t[s // QBLOCK:-(-e // QBLOCK)] if r.endswith("_scale") else t[s:e]) for r, t in parts.items()}
        cs = [(max(a, s) - s, min(b, e) - s, wd) for a, b, wd in segs if max(a, s) < min(b, e)]
        fused_adamw_q_(fmt, view, grad[s:e], segments=cs, step=1, key=11, index0=s, num_threads=1, **HYPER)
    assert _equal(whole, parts)


@needs_ext
@pytest.mark.parametrize("fmt", [StateFormat("bf16", "int8"), StateFormat("fp32", "int8")],
                         ids=lambda f: f"{f.master}-{f.moments}")
def test_weight_decay_segments_anywhere_in_a_block(fmt):
    """The fused paths resolve the weight decay block by block: a boundary at every kind of place in a
    block (an element, a vector of 8 or 16, a pack of 64), several boundaries in one block, one-element
    segments, and a chunk that starts past 2^32 elements of stochastic-rounding index."""
    n = 6 * QBLOCK + 48
    cuts = sorted({1, 7, 8, 16, 63, 64, 65, 128, 200, QBLOCK, QBLOCK + 1, 2 * QBLOCK + 16, 2 * QBLOCK + 17,
                   2 * QBLOCK + 18, 3 * QBLOCK + 64, 4 * QBLOCK + 255, 5 * QBLOCK + 8, n - 1})
    bounds = [0] + cuts + [n]
    segs = [(a, b, 0.1 * (i % 3)) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    grad = (torch.randn(n, generator=torch.Generator().manual_seed(4)) * 1e-3).to(torch.bfloat16)
    ref = _state(fmt, n)
    index0 = (1 << 32) + QBLOCK * 3
    for step in (1, 2):
        reference_adamw_(fmt, ref, grad, segments=segs, step=step, key=99, index0=index0, **HYPER)
    for backend in _backends():
        k = _state(fmt, n)
        for step in (1, 2):
            fused_adamw_q_(fmt, k, grad, segments=segs, step=step, key=99, index0=index0, backend=backend,
                           num_threads=2, **HYPER)
        assert _equal(k, ref), backend


def test_int8_codes():
    """The minifloat codes: every value within 1/16 of itself (3 mantissa bits) above the smallest
    code, no v code decodes to zero, a zero block stays zero, the block's largest value is exact."""
    x = torch.randn(4 * QBLOCK, generator=torch.Generator().manual_seed(3)) * torch.logspace(0, -6, 4 * QBLOCK)
    x[QBLOCK:2 * QBLOCK] = 0
    q, a = encode_m(x)
    y = decode_m(q, a)
    ea = a.repeat_interleave(QBLOCK)
    assert torch.equal(y[QBLOCK:2 * QBLOCK], torch.zeros(QBLOCK))
    assert bool(((y - x).abs() <= x.abs() / 16 + ea * 2.0**-15).all())
    assert bool((torch.sign(y) * torch.sign(x) >= 0).all())
    assert torch.equal(y.abs().view(4, QBLOCK).amax(1), a)
    v = x.square()
    qv, av = encode_v(v)
    w = decode_v(qv, av)
    nz = av.repeat_interleave(QBLOCK) > 0
    assert bool((w[nz] > 0).all()) and torch.equal(w[~nz], torch.zeros(int((~nz).sum())))
    big = v > av.repeat_interleave(QBLOCK) * 2.0**-30
    assert float(((w[big] - v[big]).abs() / v[big]).max()) <= 1 / 16


def test_the_rounding_key_is_drawn_from_seed_step_and_stage():
    """Each stage's rounding noise is its own, and each seed's: the engine and the reference share sr_key, so a
    key blind to the stage (every stage rounding alike) passed every equivalence test (a mutation audit)."""
    keys = {(seed, step, stage): sr_key(seed, step, stage) for seed in (0, 1, 2**31 + 5) for step in (1, 2, 1000)
            for stage in (0, 1, 2, 97)}
    assert len(set(keys.values())) == len(keys)
    assert all(0 <= k < 2**32 for k in keys.values())
    p = torch.full((4096,), 1.0 + 2.0**-9)
    rounded = [stochastic_bf16(p, sr_key(1, 5, stage), 0) for stage in (0, 1)]
    assert not torch.equal(rounded[0], rounded[1])


def test_stochastic_rounding_is_unbiased_and_deterministic():
    p = torch.full((200_000,), 1.0 + 2.0**-9)  # a quarter of the way between two bf16 neighbours
    r1 = stochastic_bf16(p, sr_key(1, 5, 2), 0).float()
    assert torch.equal(r1, stochastic_bf16(p, sr_key(1, 5, 2), 0).float())           # same (seed, step, stage)
    assert not torch.equal(r1, stochastic_bf16(p, sr_key(1, 6, 2), 0).float())       # another step
    up = float((r1 > 1.0).float().mean())
    assert abs(up - 0.25) < 0.01 and set(r1.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert abs(float(r1.double().mean()) - (1.0 + 2.0**-9)) < 4e-5  # 5 sigma
    nan = stochastic_bf16(torch.tensor([float("nan"), float("inf"), -0.0]), 3, 0)
    assert torch.isnan(nan[0]) and nan[1] == float("inf")


def test_format_sizes():
    f = StateFormat("bf16", "int8")
    assert f.bytes_per_param() == pytest.approx(4 + 8 / QBLOCK)
    assert StateFormat().bytes_per_param() == 12
    assert f.state_bytes(1000) == 2 * 1000 + 2 * 1000 + 2 * 4 * 4
    assert f.align(4096) % QBLOCK == 0 and f.align(4096) >= 4096
    with pytest.raises(ValueError):
        StateFormat("int8", "fp32")


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.master}-{f.moments}")
def test_non_finite_values_encode_alike(fmt):
    """A gradient that overflows v, an inf and a NaN: every path writes the same bits (the reference
    reads a code's rounded bits as a signed 32-bit integer, so a NaN with its sign bit set encodes to code
    0, and writes NaN as 0x7FC0, like the kernel)."""
    n = 4 * QBLOCK
    grad = torch.randn(n, generator=torch.Generator().manual_seed(5)) * 1e-3
    grad[3], grad[QBLOCK + 7], grad[2 * QBLOCK + 1] = 1e20, float("inf"), float("nan")
    ref = _state(fmt, n)
    kers = {b: _state(fmt, n) for b in _backends()}
    for step in (1, 2, 3):  # the non-finite moments and scales of one step are read by the next
        reference_adamw_(fmt, ref, grad, segments=[(0, n, 0.1)], step=step, key=3, **HYPER)
        for backend, k in kers.items():
            fused_adamw_q_(fmt, k, grad, segments=[(0, n, 0.1)], step=step, key=3, backend=backend, **HYPER)
            assert _equal(k, ref), (backend, step)
    # bf16 gradients: a NaN's payload may come out of torch's ops differently, so the same values, NaN
    # where the reference has NaN, rather than the same bits
    g16 = grad.to(torch.bfloat16)
    ref = _state(fmt, n)
    kers = {b: _state(fmt, n) for b in _backends()}
    for step in (1, 2):
        reference_adamw_(fmt, ref, g16, segments=[(0, n, 0.1)], step=step, key=3, **HYPER)
        for backend, k in kers.items():
            fused_adamw_q_(fmt, k, g16, segments=[(0, n, 0.1)], step=step, key=3, backend=backend, **HYPER)
            for r in ref:
                a, b = k[r].float(), ref[r].float()
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), (backend, r)


def test_bad_calls_are_refused():
    fmt = StateFormat("bf16", "int8")
    st = _state(fmt, 2 * QBLOCK)
    g = torch.zeros(2 * QBLOCK)
    for backend in ("torch", None):
        with pytest.raises(ValueError, match="segments must cover"):
            fused_adamw_q_(fmt, st, g, segments=[], step=1, backend=backend, **HYPER)
        with pytest.raises(ValueError, match="segments must cover"):
            fused_adamw_q_(fmt, st, g, segments=[(0, 10, 0.0), (11, 2 * QBLOCK, 0.0)], step=1, backend=backend,
                           **HYPER)
    with pytest.raises(TypeError, match="out_lowp"):
        fused_adamw_q_(fmt, st, g, segments=[(0, 2 * QBLOCK, 0.0)], step=1, out_lowp=torch.empty(2 * QBLOCK,
                       dtype=torch.float16), **HYPER)
    short = dict(st, exp_avg_scale=st["exp_avg_scale"][:1])
    with pytest.raises(ValueError, match="exp_avg_scale"):
        fused_adamw_q_(fmt, short, g, segments=[(0, 2 * QBLOCK, 0.0)], step=1, **HYPER)
    with pytest.raises(ValueError, match="index0"):
        fused_adamw_q_(fmt, st, g, segments=[(0, 2 * QBLOCK, 0.0)], step=1, index0=5, **HYPER)


def test_an_int8_tie_rounds_up():
    """Halfway between two codes (0.53125: 0.5 and 0.5625 in a block whose largest value is 1), the code
    rounds up, as the kernel does it (one add; nearest-even cost it three operations a vector more)."""
    x = torch.zeros(QBLOCK)
    x[0], x[1], x[2], x[3] = 1.0, 0.53125, -0.53125, 0.53124
    y = decode_m(*encode_m(x))
    assert y[1].item() == 0.5625 and y[2].item() == -0.5625 and y[3].item() == 0.5
    w = decode_v(*encode_v(x.abs()))
    assert w[1].item() == 0.5625 and w[3].item() == 0.5


@pytest.mark.parametrize("fmt", [StateFormat("bf16", "int8"), StateFormat("bf16", "bf16")],
                         ids=lambda f: f"{f.master}-{f.moments}")
def test_an_out_of_core_update_in_chunks_equals_one_update_of_the_whole_tensor(tmp_path, fmt):
    """A mutation audit: the out-of-core optimizer gives each chunk the stage index of its first element, so a bf16
    master's stochastic rounding noise runs on across chunks (index 0 for every chunk repeated the first's noise)."""
    from fuyou.optim.config import AdamWConfig
    from fuyou.optim.out_of_core import OutOfCoreAdamW, Segment, StateKeys
    from fuyou.store import PinnedPool, TensorStore
    from fuyou.store.config import StoreConfig

    cfg = AdamWConfig(lr=3e-3, beta1=0.9, beta2=0.95, weight_decay=0.1, master=fmt.master, moments=fmt.moments)
    n = 5 * 16384 + 1000
    init = _state(fmt, n, seed=4)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(5))
    keys = StateKeys("l/master", "l/m", "l/v", None, *(("l/ms", "l/vs") if fmt.moments == "int8" else ()))
    store_cfg = StoreConfig(block_size="16KiB", checksum_block="16KiB", stripe_unit="64KiB", queue_depth=4)
    with TensorStore.create([tmp_path / "s"], store_cfg) as store:
        for k, t in zip(keys.state, fmt.tensors):
            store.allocate(k, (t.numel(n),), t.dtype)
            store.write_from(k, init[t.role]).result()
        opt = OutOfCoreAdamW(store, PinnedPool(64 * 2**20), cfg, chunk_numel=16384, depth=2, seed=9)
        assert opt.chunk < n // 4
        lowp = torch.empty(n, dtype=torch.bfloat16)
        opt.update(keys, grad, numel=n, segments=[Segment(0, n, 0.1)], lr=cfg.lr, step=2, lowp_out=lowp, stage=3)
        got = {t.role: torch.empty(t.numel(n), dtype=t.dtype) for t in fmt.tensors}
        for k, t in zip(keys.state, fmt.tensors):
            store.read_into(k, got[t.role]).result()
    ref, ref_lowp = _clone(init), torch.empty(n, dtype=torch.bfloat16)
    reference_adamw_(fmt, ref, grad, segments=[(0, n, 0.1)], lr=cfg.lr, beta1=0.9, beta2=0.95, eps=cfg.eps, step=2,
                     key=sr_key(9, 2, 3), out_lowp=ref_lowp)
    assert _equal(got, ref) and torch.equal(lowp, ref_lowp)
