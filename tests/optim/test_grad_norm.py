"""The gradient norm on a CPU device (adamw.cpp, Note: [Gradient norm on the CPU]): bf16 and fp16 read
once, the sum in fp32 lanes over runs of 1024 and in double beyond, the same for any thread count; fp32
is torch's (the reference trainer's bits)."""

import pytest
import torch

from fuyou.optim.adamw import grad_norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 1023, 1025, 3 * 65536 + 17])
def test_low_precision_norm_is_the_exact_norm_to_fp32_rounding(dtype, n):
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
    want = torch.linalg.vector_norm(x.double())
    got = grad_norm(x)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(float(got) - float(want)) <= 2e-7 * float(want) + 1e-30
    assert torch.equal(grad_norm(x, num_threads=1), grad_norm(x, num_threads=2))


def test_fp32_and_strided_gradients_are_torchs():
    x = torch.randn(1000)
    assert torch.equal(grad_norm(x), torch.linalg.vector_norm(x))
    y = torch.randn(64, 32).bfloat16().t()  # not contiguous
    assert torch.equal(grad_norm(y), torch.linalg.vector_norm(y.float().contiguous()))


def test_torchs_fp32_norm_of_many_elements_is_what_this_replaces():
    """Why: torch's CPU norm of 50M fp32 values was 0.4 % off the exact one (and needs an fp32 copy of a
    bf16 gradient); this one is within fp32 rounding. (A fact about torch 2.13, kept as a record.)"""
    x = torch.randn(5_000_000, generator=torch.Generator().manual_seed(0)).bfloat16()
    exact = float(torch.linalg.vector_norm(x.double()))
    assert abs(float(grad_norm(x)) - exact) <= 1e-6 * exact
