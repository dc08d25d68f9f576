"""Stage-wise forward/backward (the engine's execution model) equals whole-model autograd."""

import pytest
import torch

from fuyou.models import ModelConfig, StageModel, preset


def stagewise_loss_and_grads(model: StageModel, params, x, y):
    """Run stages one at a time on detached inputs, then feed gradients back by hand."""
    inputs, outputs = [], []
    h = x
    for s in model.stages:
        local = {k: v.detach().requires_grad_(True) for k, v in s.bind(params).items()}
        inp = h if h.dtype == torch.long else h.detach().requires_grad_(True)
        out = s.forward(local, inp, y if s is model.stages[-1] else None)
        inputs.append((inp, local))
        outputs.append(out)
        h = out
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    grad_out = None
    for s, (inp, local), out in zip(reversed(model.stages), reversed(inputs), reversed(outputs)):
        torch.autograd.backward(out, grad_out)
        for name, t in local.items():
            key = s.shared.get(name, s.key(name))
            grads[key] += t.grad
        grad_out = inp.grad if inp.dtype != torch.long else None
    return outputs[-1].detach(), grads


@pytest.mark.parametrize("name,tie", [("gpt-test", True), ("gpt-test", False), ("llama-test", False), ("llama-test", True)])
def test_stagewise_equals_whole_model(name, tie):
    cfg = ModelConfig(**{**preset(name), "tie_embeddings": tie})
    model = StageModel(cfg)
    params = {k: v.requires_grad_(True) for k, v in model.init_params(seed=3).items()}
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    y = torch.randint(0, cfg.vocab_size, (2, 16))

    loss = model.forward_loss(params, x, y)
    loss.backward()
    ref = {k: p.grad.clone() for k, p in params.items()}

    stage_loss, grads = stagewise_loss_and_grads(model, params, x, y)
    assert torch.allclose(stage_loss, loss.detach(), rtol=0, atol=1e-6)
    assert grads.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
    if tie:
        assert "lm_head.weight" in model.stages[-1].shared and "head.lm_head.weight" not in params


def test_stage_init_is_independent_of_other_stages():
    model = StageModel(ModelConfig(**preset("gpt-test")))
    whole = model.init_params(seed=7)
    alone = model.stages[2].init_params(seed=7)
    for k, v in alone.items():
        assert torch.equal(v, whole[k])


def test_loss_starts_near_uniform():
    cfg = ModelConfig(**preset("gpt-test"))
    model = StageModel(cfg)
    params = model.init_params(seed=0)
    x = torch.randint(0, cfg.vocab_size, (4, 32))
    y = torch.randint(0, cfg.vocab_size, (4, 32))
    loss = model.forward_loss(params, x, y)
    assert abs(float(loss) - torch.log(torch.tensor(float(cfg.vocab_size)))) < 0.2


def test_blocks_start_from_different_weights():
    """A mutation audit: a stage generator seeded from the seed alone (not the stage index) would start every
    block with the same weights."""
    model = StageModel(ModelConfig(**preset("gpt-test")))
    params = model.init_params(seed=7)
    assert not torch.equal(params["block.0.qkv.weight"], params["block.1.qkv.weight"])
    assert not torch.equal(params["block.0.fc1.weight"], params["block.1.fc1.weight"])


@pytest.mark.parametrize("name,resid", [("gpt-test", ("proj", "fc2")), ("llama-test", ("o", "down"))])
def test_residual_projections_start_at_the_scaled_std(name, resid):
    """GPT-2's init (a mutation audit left it untested): the matmuls that write into the residual stream start
    at init_std / sqrt(2 n_layer), the others at init_std, biases at zero."""
    import math

    cfg = ModelConfig(**{**preset(name), "n_layer": 8, "d_model": 256, "n_head": 4, **(
        {"n_kv_head": 4} if name == "llama-test" else {})})
    params = StageModel(cfg).init_params(seed=3)
    scaled = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    for key, t in params.items():
        if not key.startswith("block.") or not key.endswith(".weight") or t.dim() != 2:
            continue
        want = scaled if key.split(".")[2] in resid else cfg.init_std
        assert abs(float(t.std()) - want) < 0.05 * want, (key, float(t.std()), want)
    assert all(float(t.abs().max()) == 0 for k, t in params.items() if k.startswith("block.") and k.endswith(".bias"))


def _reference_attention(q, k, v, allowed):
    """Plain softmax attention, each k/v head shared by ``groups`` consecutive query heads (GQA)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("with_mask", [False, True])
def test_grouped_query_attention_without_the_kernel_shares_each_kv_head_with_consecutive_query_heads(
        monkeypatch, with_mask):
    """A mutation audit: the fallback that expands k/v per query head (taken on CUDA with a mask or fp32) must
    interleave the heads (query heads 0,1 -> kv head 0), not tile them (query heads 0,2 -> kv head 0)."""
    from fuyou.models import layers
    monkeypatch.setattr(layers, "kernel_gqa", lambda *a: False)
    gen = torch.Generator().manual_seed(0)
    B, T, D = 2, 6, 8
    q = torch.randn(B, 4, T, D, generator=gen)
    k, v = torch.randn(B, 2, T, D, generator=gen), torch.randn(B, 2, T, D, generator=gen)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T).clone()
    if with_mask:
        allowed[:, :, 4:, :2] = False
    out = layers.causal_attention(q, k, v, allowed if with_mask else None)
    torch.testing.assert_close(out, _reference_attention(q, k, v, allowed), rtol=1e-5, atol=1e-6)


def test_a_sliding_window_one_shorter_than_the_sequence_masks_the_first_key():
    """A mutation audit: a window one token shorter than the sequence still hides the first token from the
    last; treating it as no window (plain causal) would let the last query see it."""
    from fuyou.models.layers import attention_mask
    T = 8
    mask = attention_mask(None, T, T - 1, torch.device("cpu"))
    assert mask is not None
    idx = torch.arange(T)
    expected = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - (T - 1))
    assert torch.equal(mask[0, 0], expected) and not bool(mask[0, 0, T - 1, 0])
