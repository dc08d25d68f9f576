"""The kernels' out-of-place step (adamw.cpp, Note: [Out of place]): reading one copy of the state and
writing another gives the bits of copying it over and stepping in place, for every state format,
backend, thread count and a size that ends inside a block; the source is left untouched."""

import pytest
import torch

from fuyou.optim.adamw import fused_adamw_
from fuyou.optim.compressed import StateFormat, fused_adamw_q_, new_state

N = 3 * 16384 + 70000 + 37  # several sub-blocks, two work blocks, a ragged tail
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=3, grad_scale=0.5)


def _filled(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g).abs() * 1e-3


@pytest.mark.parametrize("backend", ["avx2", "scalar", "torch", None])
@pytest.mark.parametrize("threads", [1, 2])
def test_fp32_out_of_place_equals_copy_then_in_place(backend, threads):
    p, v = _filled(N, 0)
    m = torch.randn(N, generator=torch.Generator().manual_seed(1)) * 1e-2
    grad = torch.randn(N, generator=torch.Generator().manual_seed(2)).bfloat16()
    src = tuple(t.clone() for t in (p, m, v))
    want = tuple(t.clone() for t in (p, m, v))
    lowp_want, lowp = torch.empty(N, dtype=torch.bfloat16), torch.empty(N, dtype=torch.bfloat16)
    fused_adamw_(*want[:1], grad, *want[1:], weight_decay=0.1, out_lowp=lowp_want, num_threads=threads,
                 backend=backend, **HP)
    dst = tuple(torch.full((N,), float("nan")) for _ in range(3))
    fused_adamw_(dst[0], grad, dst[1], dst[2], weight_decay=0.1, out_lowp=lowp, num_threads=threads,
                 backend=backend, src=src, **HP)
    for a, b in zip(dst, want):
        assert torch.equal(a, b)
    assert torch.equal(lowp, lowp_want)
    for a, b in zip(src, (p, m, v)):
        assert torch.equal(a, b)  # the source is read only


@pytest.mark.parametrize("master,moments", [("fp32", "int8"), ("bf16", "int8"), ("bf16", "bf16"), ("bf16", "fp32")])
@pytest.mark.parametrize("backend", [None, "torch"])
def test_compressed_out_of_place_equals_copy_then_in_place(master, moments, backend):
    fmt = StateFormat(master, moments)
    p, _ = _filled(N, 3)
    start = new_state(fmt, p)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(4))
    segs = [(0, N // 3, 0.1), (N // 3, N, 0.0)]
    kw = dict(segments=segs, key=7, index0=0, num_threads=2, backend=backend, **HP)
    fused_adamw_q_(fmt, start, grad, **kw)  # moments that are not zero
    src = {r: t.clone() for r, t in start.items()}
    want = {r: t.clone() for r, t in start.items()}
    fused_adamw_q_(fmt, want, grad * 0.3, **kw)
    dst = {r: torch.zeros_like(t) for r, t in start.items()}
    fused_adamw_q_(fmt, dst, grad * 0.3, src=src, **kw)
    for r in fmt.roles:
        assert torch.equal(dst[r], want[r]), r
        assert torch.equal(src[r], start[r]), r


def test_out_of_place_refuses_an_overlapping_or_unlike_source():
    p, v = _filled(1024, 5)
    m, g = torch.zeros(1024), torch.zeros(1024)
    with pytest.raises(ValueError, match="overlaps"):
        fused_adamw_(p, g, m, v, weight_decay=0.0, src=(p, m.clone(), v.clone()), **HP)
    with pytest.raises(ValueError, match="like its destination"):
        fused_adamw_(p, g, m, v, weight_decay=0.0, src=(p.clone(), m.double(), v.clone()), **HP)


@pytest.mark.parametrize("shift", [1, -1])
def test_a_source_one_element_off_its_destination_is_refused_as_overlapping(shift):
    """A mutation audit: a source that shares all but one element's bytes with its destination (the two views of one
    buffer one element apart) overlaps it, though their first elements differ; only a source that starts where the
    destination ends is apart."""
    buf = torch.zeros(1025)
    p, src_p = (buf[1:], buf[:1024]) if shift == 1 else (buf[:1024], buf[1:])
    m, v, g = torch.zeros(1024), torch.ones(1024), torch.zeros(1024)
    with pytest.raises(ValueError, match="overlaps"):
        fused_adamw_(p, g, m, v, weight_decay=0.0, src=(src_p, m.clone(), v.clone()), **HP)
    apart = torch.zeros(2048)
    fused_adamw_(apart[1024:], g, m, v, weight_decay=0.0, src=(apart[:1024], m.clone(), v.clone()), **HP)
