"""The chunked LM-head loss (``layers.linear_cross_entropy``) against plain cross-entropy on full logits.

Stated tolerance: in fp32 the loss within 1e-6 relative and both gradients within 1e-5 relative of
their largest magnitude; under bf16 autocast within 2e-2 (bf16 matmuls in a different order).
"""

import pytest
import torch
import torch.nn.functional as F

from fuyou.models.layers import linear_cross_entropy, loss_chunk_tokens


def _full(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t)


def _grads(fn, h, w, t):
    h, w = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
    loss = fn(h, w, t)
    gh, gw = torch.autograd.grad(loss, [h, w])
    return loss.detach(), gh, gw


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_match_full_logits_fp32(chunk):
    torch.manual_seed(0)
    h, w = torch.randn(64, 32), torch.randn(50, 32) * 0.3
    t = torch.randint(0, 50, (64,))
    ref = _grads(_full, h, w, t)
    got = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk), h, w, t)
    assert abs(float(got[0]) - float(ref[0])) <= 1e-6 * abs(float(ref[0]))
    assert _rel(got[1], ref[1]) <= 1e-5 and _rel(got[2], ref[2]) <= 1e-5


def test_ignored_targets_count_for_nothing():
    torch.manual_seed(1)
    h, w = torch.randn(20, 16), torch.randn(30, 16)
    t = torch.randint(0, 30, (20,))
    t[::3] = -100
    ref = _grads(_full, h, w, t)
    got = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, 4), h, w, t)
    assert abs(float(got[0]) - float(ref[0])) <= 1e-6 * abs(float(ref[0]))
    assert _rel(got[1], ref[1]) <= 1e-5 and _rel(got[2], ref[2]) <= 1e-5
    assert got[1][::3].abs().max() == 0


def test_chunked_loss_under_bf16_autocast_with_bf16_weights():
    torch.manual_seed(2)
    h, w = torch.randn(48, 32), (torch.randn(40, 32) * 0.3).bfloat16()
    t = torch.randint(0, 40, (48,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(_full, h, w, t)
        got = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, 5), h, w, t)
    assert got[1].dtype == h.dtype and got[2].dtype == w.dtype
    assert abs(float(got[0]) - float(ref[0])) <= 2e-2 * abs(float(ref[0]))
    assert _rel(got[1], ref[1]) <= 2e-2 and _rel(got[2], ref[2]) <= 2e-2


def test_the_default_slice_bounds_the_logits_held():
    assert loss_chunk_tokens(50257) * 4 * 50257 <= 64 * 1024**2
    assert loss_chunk_tokens(128256) >= 1 and loss_chunk_tokens(10**12) == 1


def test_without_autograd_the_loss_alone_is_computed_and_is_the_same():
    """Evaluation (no autograd) computed the gradients too, and held them: its head was a LoRA run's peak
    memory. Without autograd the loss is the same, bit for bit, with nothing kept for a backward."""
    torch.manual_seed(0)
    h, w = torch.randn(100, 16, requires_grad=True), torch.randn(37, 16)
    t = torch.randint(0, 37, (100,))
    t[::7] = -100
    with_grads = linear_cross_entropy(h, w, t, chunk_tokens=13)
    with torch.no_grad():
        alone = linear_cross_entropy(h, w, t, chunk_tokens=13)
    assert torch.equal(with_grads.detach(), alone) and alone.grad_fn is None
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t)
    assert torch.allclose(alone, ref, rtol=1e-6)


def test_the_head_gradient_summed_over_several_blocks_of_the_vocabulary(monkeypatch):
    """The weight's gradient is summed a block of the vocabulary's rows at a time (16M/d rows: 32 blocks for an
    8B Llama's head); every test vocabulary fitted one block, and a loop that wrote each block's sum into the
    first passed (a mutation audit). Blocks of 7 rows here, the last one short."""
    from fuyou.models import layers

    monkeypatch.setattr(layers, "LOSS_CHUNK_BYTES", 4 * 16 * 7)  # 7 fp32 rows of d=16
    torch.manual_seed(0)
    h, w, t = torch.randn(18, 16), torch.randn(50, 16) * 0.1, torch.randint(0, 50, (18,))
    la, gha, gwa = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_tokens=5), h, w, t)
    lb, ghb, gwb = _grads(_full, h, w, t)
    assert _rel(la, lb) < 1e-6 and _rel(gha, ghb) < 1e-5 and _rel(gwa, gwb) < 1e-5
