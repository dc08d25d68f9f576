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
