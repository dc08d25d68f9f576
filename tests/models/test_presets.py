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
        # a frozen base (LoRA): no weight gradients, 4 N (its model TFLOPS read above the GPU's rate: a pass)
        assert m.flops_per_token(1024) - m.flops_per_token(1024, frozen=True) == 2 * m.matmul_params


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'gpt5'.*gpt3-175b"):
        preset("gpt5")


@pytest.mark.parametrize("name,params", [("llama3-8b", 8.030e9), ("llama3-70b", 70.554e9), ("llama3-405b", 405.853e9)])
def test_llama3_presets_have_the_released_parameter_counts(name, params):
    from fuyou.models import ModelConfig, StageModel, preset

    cfg = ModelConfig(**preset(name))
    assert cfg.vocab_size == 128256 and cfg.kv_heads == 8 and cfg.rope_theta == 500000.0
    assert abs(StageModel(cfg).num_params - params) <= 1e-3 * params


@pytest.mark.parametrize("name,params", [
    # The released checkpoints' parameter counts.
    ("llama3.1-8b", 8_030_261_248), ("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824),
    ("llama3.3-70b", 70_553_706_496), ("qwen2.5-0.5b", 494_032_768), ("qwen2.5-7b", 7_615_616_512),
    ("qwen2.5-72b", 72_706_203_648), ("qwen3-0.6b", 596_049_920), ("qwen3-8b", 8_190_735_360),
    ("qwen3-32b", 32_762_123_264), ("mistral-7b-v0.1", 7_241_732_096), ("mistral-7b-v0.3", 7_248_023_552),
])
def test_todays_families_have_the_released_parameter_counts(name, params):
    assert StageModel(ModelConfig(**preset(name))).num_params == params


def test_todays_families_features():
    qwen3 = ModelConfig(**preset("qwen3-0.6b"))
    assert qwen3.qk_norm and qwen3.head_dim == 128 and qwen3.q_width == 2048 != qwen3.d_model
    assert ModelConfig(**preset("llama3.2-1b")).rope_scaling.factor == 32.0
    assert ModelConfig(**preset("llama3.3-70b")).rope_scaling.type == "llama3"
    assert ModelConfig(**preset("mistral-7b-v0.1")).sliding_window == 4096
    assert ModelConfig(**preset("mistral-7b-v0.3")).sliding_window is None
    assert ModelConfig(**preset("qwen2.5-7b")).attn_bias


@pytest.mark.parametrize("family,extra", [("gpt-test", {}), ("gpt-test", {"tie_embeddings": False}),
                                          ("llama-test", {"attn_bias": True, "qk_norm": True}),
                                          ("llama-test", {"tie_embeddings": True})])
def test_weight_decay_applies_to_the_matmul_weights_only(family, extra):
    """AdamW's decay: every matmul's weight (an untied LM head's too), never an embedding, a norm or a bias.
    The engine and the reference trainer read the same flags, so only this pins them (a mutation audit: a norm's
    bias set to decay passed every equivalence test)."""
    model = StageModel(ModelConfig(**{**preset(family), **extra}))
    seen = set()
    for st in model.stages:
        for name, spec in st.params.items():
            matmul = len(spec.shape) == 2 and name not in ("wte", "wpe")
            assert spec.decay == matmul, (st.name, name)
            seen.add(name.rsplit(".", 1)[-1] if "." in name else name)
    assert {"weight", "wte"} <= seen and ("bias" in seen) == (family == "gpt-test" or bool(extra.get("attn_bias")))


def test_llama_widths_odd_head_dims_and_rope_factors():
    """A mutation audit: Llama's feed-forward width is 8d/3 rounded up to a multiple of 256 (d=384 gives exactly
    1024, not 1280); an odd head dimension (RoPE rotates pairs) and equal llama3 rope frequency factors (its
    interpolation divides by their difference) are refused."""
    from pydantic import ValidationError

    from fuyou.models.config import RopeScaling

    assert ModelConfig(family="llama", d_model=384, n_head=6).ff_dim == 1024
    assert ModelConfig(family="llama", d_model=400, n_head=8).ff_dim == 1280  # (8*400//3 = 1066: rounded up)
    with pytest.raises(ValidationError, match="RoPE needs an even head dimension, got d_model/n_head = 15"):
        ModelConfig(family="llama", d_model=60, n_head=4)
    with pytest.raises(ValidationError, match="high_freq_factor must exceed low_freq_factor"):
        RopeScaling(type="llama3", factor=8.0, low_freq_factor=2.0, high_freq_factor=2.0)
    RopeScaling(type="llama3", factor=8.0, low_freq_factor=2.0, high_freq_factor=2.5)
