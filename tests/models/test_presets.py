import math

import pytest

from fuyou.models import PRESETS, ModelConfig, StageModel, preset
from fuyou.errors import ConfigError


@pytest.mark.parametrize("name,expected", [
    ("gpt3-125m", 125.2e6), ("gpt3-350m", 355.9e6), ("gpt3-1.3b", 1.3157e9), ("gpt3-2.7b", 2.65e9),
    ("gpt3-13b", 12.853e9), ("gpt3-175b", 174.604e9), ("llama-7b", 6.738e9), ("llama-13b", 13.016e9),
    ("llama-70b", 68.977e9),
])
def test_parameter_counts_match_names(name, expected):
    n = StageModel(ModelConfig(**preset(name))).num_params
    assert math.isclose(n, expected, rel_tol=2e-3), (name, n)


def test_175b_exact_count_without_allocating():
    # 96 * (12 d^2 + 13 d) + vocab*d + 2048*d + 2d, d = 12288
    d = 12288
    expect = 96 * (12 * d * d + 13 * d) + 50257 * d + 2048 * d + 2 * d
    model = StageModel(ModelConfig(**preset("gpt3-175b")))
    assert model.num_params == expect == 174_604_259_328
    assert len(model.stages) == 98


def test_every_preset_builds():
    for name in PRESETS:
        m = StageModel(ModelConfig(**preset(name)))
        assert m.num_params > 0
        assert m.flops_per_token(1024) > 6 * m.matmul_params


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'gpt5'.*gpt3-175b"):
        preset("gpt5")


@pytest.mark.parametrize("name,params", [("llama3-8b", 8.030e9), ("llama3-70b", 70.554e9), ("llama3-405b", 405.853e9)])
def test_llama3_presets_have_the_released_parameter_counts(name, params):
    from fuyou.models import ModelConfig, StageModel, preset

    cfg = ModelConfig(**preset(name))
    assert cfg.vocab_size == 128256 and cfg.kv_heads == 8 and cfg.rope_theta == 500000.0
    assert abs(StageModel(cfg).num_params - params) <= 1e-3 * params
