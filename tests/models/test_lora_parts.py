"""LoRA's own pieces (fuyou/models/lora.py) where the engine and the reference trainer share them, so their
equivalence tests cannot see a fault in them: the adapters' initialisation and the dropout masks' keys
(a mutation audit: a 4x too wide init and one mask for every micro-batch passed every test)."""

from __future__ import annotations

import math

import pytest
import torch

from fuyou.models import ModelConfig, StageModel, preset
from fuyou.models.lora import LoRAConfig, attach, dropout_key, init_adapters


def _model(family: str, **lora):
    model = StageModel(ModelConfig(**{**preset(family), "d_model": 256, "n_head": 4, "n_layer": 2}))
    cfg = LoRAConfig(rank=4, targets=["all-linear"], **lora)
    attach(model, cfg)
    return model, cfg


@pytest.mark.parametrize("family", ["gpt-test", "llama-test"])
def test_default_init_is_peft_kaiming_uniform_over_the_input_width(family):
    """PEFT's default: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0; each adapter drawn
    from (seed, stage, name)."""
    model, cfg = _model(family)
    values = {}
    for st in model.stages[1:-1]:
        values.update(init_adapters(st, cfg, seed=7))
        for local, spec in st.adapters.items():
            t = values[st.key(local)]
            if local.endswith("lora_B"):
                assert not t.any(), local
                continue
            rank, fan_in = spec.shape
            assert rank == 4 and fan_in == st.params[local.replace("lora_A", "weight")].shape[1]
            bound = 1 / math.sqrt(fan_in)
            assert float(t.abs().max()) <= bound and float(t.abs().max()) > 0.9 * bound, local
            assert float(t.std()) == pytest.approx(bound / math.sqrt(3), rel=0.15), local  # uniform's std
    a = [v for k, v in values.items() if k.endswith("lora_A")]
    assert all(not torch.equal(x, y) for i, x in enumerate(a) for y in a[i + 1:] if x.shape == y.shape)
    again = {k: v for st in model.stages[1:-1] for k, v in init_adapters(st, cfg, seed=7).items()}
    other = {k: v for st in model.stages[1:-1] for k, v in init_adapters(st, cfg, seed=8).items()}
    assert all(torch.equal(values[k], again[k]) for k in values)
    assert not any(torch.equal(values[k], other[k]) for k in values if k.endswith("lora_A"))


def test_gaussian_init_has_std_one_over_rank():
    model, cfg = _model("llama-test", init="gaussian")
    st = model.stages[1]
    for k, t in init_adapters(st, cfg, seed=0).items():
        if k.endswith("lora_A"):
            assert float(t.std()) == pytest.approx(1 / cfg.rank, rel=0.15), k


def test_dropout_masks_differ_by_micro_batch_step_and_seed():
    """One mask a (seed, step, micro-batch), the same when drawn again (backward's recomputation, a resume)."""
    model, cfg = _model("gpt-test", dropout=0.5)
    st = model.stages[1]
    lora = st.lora
    x = torch.ones(2, 8, 256)
    a = b = torch.eye(256)  # delta = scale * dropout(x): its zeros are the mask's

    def mask(key):
        return lora.delta(st.index, "fc1", x, a, b, key) != 0
    keys = [dropout_key(s, step, j) for s in (0, 1) for step in (0, 1, 2) for j in (0, 1, 3)]
    assert len(set(keys)) == len(keys)
    masks = [mask(k) for k in keys]
    assert all(not torch.equal(m, n) for i, m in enumerate(masks) for n in masks[i + 1:])
    assert torch.equal(masks[0], mask(keys[0]))
    assert float(mask(keys[1]).float().mean()) == pytest.approx(0.5, abs=0.15)
    assert torch.equal(lora.delta(st.index, "fc1", x, a, b, None), x * lora.scale)  # evaluation: no dropout
