"""Model configuration: the shape of a GPT- or Llama-family transformer.

A model is described by numbers alone, so a 175B model can be listed, counted and planned without
allocating a byte (see ``fuyou.models.stages``). The presets (``preset``) are here too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fuyou.errors import ConfigError


class RopeScaling(BaseModel):
    """RoPE frequency scaling for long contexts, as transformers defines it: 'linear' divides every
    frequency by ``factor``; 'llama3' (Llama 3.1 and later) divides the low frequencies by ``factor``,
    keeps the high ones and interpolates between ``low_freq_factor`` and ``high_freq_factor``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["linear", "llama3"] = Field(..., description="'linear' or 'llama3' (Llama 3.1/3.2/3.3).")
    factor: float = Field(..., gt=0, description="How much longer than pretraining the context is.")
    low_freq_factor: float = Field(1.0, gt=0, description="llama3: wavelengths above original/low are scaled.")
    high_freq_factor: float = Field(4.0, gt=0, description="llama3: wavelengths below original/high are kept.")
    original_max_position_embeddings: int = Field(8192, ge=1, description="llama3: the pretraining context.")

    @model_validator(mode="after")
    def _check(self) -> "RopeScaling":
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("rope_scaling: high_freq_factor must exceed low_freq_factor")
        return self


class ModelConfig(BaseModel):
    """Shape of a decoder-only transformer. Start from ``preset`` and override single fields."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = Field(
        None, description="Name of a preset (see `fuyou models`) whose values fill the fields not given here."
    )
    family: Literal["gpt", "llama"] = Field(
        "gpt",
        description="Block family: 'gpt' (learned positions, LayerNorm, GELU MLP, biases) or "
        "'llama' (RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases).",
    )
    n_layer: int = Field(4, ge=1, description="Number of transformer blocks.")
    d_model: int = Field(256, ge=8, description="Hidden width.")
    n_head: int = Field(4, ge=1, description="Attention heads; must divide d_model.")
    n_kv_head: int | None = Field(
        None, ge=1, description="Key/value heads for grouped-query attention (llama); defaults to n_head."
    )
    d_ff: int | None = Field(
        None, ge=1, description="MLP hidden width; defaults to 4*d_model (gpt) or the Llama rule (llama)."
    )
    vocab_size: int = Field(320, ge=2, description="Vocabulary size (rows of the embedding and LM head).")
    max_seq_len: int = Field(256, ge=1, description="Longest sequence; the size of GPT's position table.")
    tie_embeddings: bool = Field(
        True, description="Share the token embedding with the LM head (GPT-2/3 do; Llama does not)."
    )
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of LayerNorm/RMSNorm.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency (llama).")
    attn_bias: bool = Field(
        False,
        description="Biases on the Q/K/V projections (llama family; Qwen2 has them). GPT blocks always have biases.",
    )
    d_head: int | None = Field(
        None, ge=2, description="Width of one attention head (llama family); defaults to d_model / n_head. "
        "Qwen3 sets it apart from the width (queries of n_head * d_head features, projected back to d_model).",
    )
    qk_norm: bool = Field(
        False, description="RMSNorm over each query and key head before RoPE (llama family; Qwen3 has it).")
    rope_scaling: RopeScaling | None = Field(
        None, description="RoPE frequency scaling (llama family): {type = 'llama3' | 'linear', factor, ...}.")
    sliding_window: int | None = Field(
        None, ge=1, description="Attend to the last N tokens only (llama family; Mistral v0.1's 4096); "
        "unset: full causal attention.")
    init_std: float = Field(0.02, gt=0, description="Standard deviation of the normal weight init.")
    init_from: str | None = Field(
        None,
        description="Start from these weights instead of a random init: a local Hugging Face model directory "
        "(config.json, *.safetensors, tokenizer files; Llama/Mistral/Qwen2/Qwen3/GPT-2) or a fuyou run directory "
        "(config.toml, model.safetensors; e.g. one written by `fuyou import`). Its shape fields win over the "
        "preset and the fields given here (a note lists what changed).",
    )

    @model_validator(mode="after")
    def _check_shape(self) -> "ModelConfig":
        if self.family != "llama":
            extra = [f for f in ("d_head", "rope_scaling", "sliding_window") if getattr(self, f) is not None]
            if self.qk_norm:
                extra.append("qk_norm")
            if self.n_kv_head is not None and self.n_kv_head != self.n_head:  # GPT blocks have one qkv of 3 d
                extra.append("n_kv_head (grouped-query attention)")
            if extra:
                raise ValueError(f"{', '.join(extra)} apply to the llama family only; unset them for a gpt model")
        if self.d_head is None and self.d_model % self.n_head:
            raise ValueError(
                f"n_head={self.n_head} does not divide d_model={self.d_model}; choose a head count "
                f"that divides the width (e.g. {_divisors_hint(self.d_model)})"
            )
        kv = self.kv_heads
        if self.n_head % kv:
            raise ValueError(
                f"n_kv_head={kv} does not divide n_head={self.n_head}; grouped-query attention needs "
                f"each key/value head to serve a whole number of query heads"
            )
        if self.attn_bias and self.family != "llama":
            raise ValueError("attn_bias applies to the llama family (GPT blocks always have biases); unset it")
        if self.head_dim % 2 and self.family == "llama":
            which = "d_head" if self.d_head is not None else "d_model/n_head"  # (the one set: a pass)
            raise ValueError(f"RoPE needs an even head dimension, got {which} = {self.head_dim}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_head

    @property
    def q_width(self) -> int:
        """Features of the queries (and of the attention output): n_head * head_dim, d_model unless
        ``d_head`` sets the head width apart."""
        return self.n_head * self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.family == "gpt":
            return 4 * self.d_model
        # Llama's rule: 2/3 of 4d, rounded up to a multiple of 256.
        return ((8 * self.d_model // 3 + 255) // 256) * 256


def _divisors_hint(n: int) -> str:
    return ", ".join(str(d) for d in (1, 2, 4, 8, 12, 16, 32, 64) if n % d == 0)


# -- presets ----------------------------------------------------------------------------------------
# Model presets: the GPT-3 family, LoHan's 70B, Llama-shaped models and tiny test models.
# 
# GPT-3 shapes follow the GPT-3 paper (Brown et al. 2020, table 2.1) with the corrections noted in
# DESIGN.md (1.3B has 16 heads of 128; 13B has width 5120). LoHan (Fuyou) fine-tunes GPT-3 13B and
# 175B and a 70B of 80 layers, width 8192, 64 heads. Llama shapes follow the Llama 2 paper / released
# configs (7B 32x4096, 13B 40x5120, 70B 80x8192 with 8 KV heads); Llama 3 follows Meta's released
# configs (8B, 70B, 405B). Today's families (Llama 3.1-3.3, Qwen2.5, Qwen3, Mistral 7B) copy the
# config.json of the released Hugging Face models named in each group's comment; tests/models/
# test_presets.py checks each against the parameter count its model card gives.

_GPT3 = dict(family="gpt", vocab_size=50257, max_seq_len=2048, tie_embeddings=True)
_LLAMA = dict(family="llama", vocab_size=32000, max_seq_len=4096, tie_embeddings=False, norm_eps=1e-5)
_LLAMA3 = dict(family="llama", vocab_size=128256, max_seq_len=8192, tie_embeddings=False, norm_eps=1e-5,
               rope_theta=500000.0)
_LLAMA31 = dict(_LLAMA3, max_seq_len=131072, rope_scaling=dict(
    type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192))
_QWEN25 = dict(family="llama", vocab_size=152064, max_seq_len=131072, tie_embeddings=False, norm_eps=1e-6,
               rope_theta=1e6, attn_bias=True)
_QWEN3 = dict(family="llama", vocab_size=151936, max_seq_len=40960, tie_embeddings=False, norm_eps=1e-6,
              rope_theta=1e6, d_head=128, qk_norm=True)
_MISTRAL = dict(family="llama", n_layer=32, d_model=4096, n_head=32, n_kv_head=8, d_ff=14336, max_seq_len=32768,
                tie_embeddings=False, norm_eps=1e-5)

PRESETS: dict[str, dict] = {
    # Tiny models: the CPU default run and the test suite. Byte-level vocabulary (256 bytes + EOS,
    # padded to a multiple of 64).
    "gpt-tiny": dict(family="gpt", n_layer=4, d_model=256, n_head=4, vocab_size=320, max_seq_len=256),
    "gpt-test": dict(family="gpt", n_layer=2, d_model=64, n_head=4, vocab_size=320, max_seq_len=64),
    "llama-test": dict(
        family="llama", n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=160, vocab_size=320,
        max_seq_len=64, tie_embeddings=False,
    ),
    # GPT-3 family.
    "gpt3-125m": dict(_GPT3, n_layer=12, d_model=768, n_head=12),
    "gpt3-350m": dict(_GPT3, n_layer=24, d_model=1024, n_head=16),
    "gpt3-760m": dict(_GPT3, n_layer=24, d_model=1536, n_head=16),
    "gpt3-1.3b": dict(_GPT3, n_layer=24, d_model=2048, n_head=16),
    "gpt3-2.7b": dict(_GPT3, n_layer=32, d_model=2560, n_head=32),
    "gpt3-6.7b": dict(_GPT3, n_layer=32, d_model=4096, n_head=32),
    "gpt3-13b": dict(_GPT3, n_layer=40, d_model=5120, n_head=40),
    "gpt3-175b": dict(_GPT3, n_layer=96, d_model=12288, n_head=96),
    # LoHan's models (the Fuyou paper's 13B is GPT-3 13B; its 70B is GPT-shaped).
    "lohan-13b": dict(_GPT3, n_layer=40, d_model=5120, n_head=40),
    "lohan-70b": dict(_GPT3, n_layer=80, d_model=8192, n_head=64),
    # Llama-shaped.
    "llama-7b": dict(_LLAMA, n_layer=32, d_model=4096, n_head=32, d_ff=11008),
    "llama-13b": dict(_LLAMA, n_layer=40, d_model=5120, n_head=40, d_ff=13824),
    "llama-70b": dict(_LLAMA, n_layer=80, d_model=8192, n_head=64, n_kv_head=8, d_ff=28672),
    # Llama 3 / 3.1 shapes (the released configs): a 128,256-token vocabulary, 8 KV heads, RoPE base 500,000.
    "llama3-8b": dict(_LLAMA3, n_layer=32, d_model=4096, n_head=32, n_kv_head=8, d_ff=14336),
    "llama3-70b": dict(_LLAMA3, n_layer=80, d_model=8192, n_head=64, n_kv_head=8, d_ff=28672),
    "llama3-405b": dict(_LLAMA3, n_layer=126, d_model=16384, n_head=128, n_kv_head=8, d_ff=53248),
    # meta-llama/Llama-3.1-8B, Llama-3.2-1B, Llama-3.2-3B, Llama-3.3-70B-Instruct: llama3 RoPE scaling
    # (factor 8; 3.2: 32) of an 8192-token original context to 131,072; 3.2 ties its embeddings.
    "llama3.1-8b": dict(_LLAMA31, n_layer=32, d_model=4096, n_head=32, n_kv_head=8, d_ff=14336),
    "llama3.2-1b": dict(_LLAMA31, n_layer=16, d_model=2048, n_head=32, n_kv_head=8, d_ff=8192, tie_embeddings=True,
                        rope_scaling=dict(_LLAMA31["rope_scaling"], factor=32.0)),
    "llama3.2-3b": dict(_LLAMA31, n_layer=28, d_model=3072, n_head=24, n_kv_head=8, d_ff=8192, tie_embeddings=True,
                        rope_scaling=dict(_LLAMA31["rope_scaling"], factor=32.0)),
    "llama3.3-70b": dict(_LLAMA31, n_layer=80, d_model=8192, n_head=64, n_kv_head=8, d_ff=28672),
    # Qwen/Qwen2.5-0.5B, Qwen2.5-7B, Qwen2.5-72B: Q/K/V biases; 0.5B ties its embeddings and has the
    # smaller vocabulary and context.
    "qwen2.5-0.5b": dict(_QWEN25, n_layer=24, d_model=896, n_head=14, n_kv_head=2, d_ff=4864, vocab_size=151936,
                         max_seq_len=32768, tie_embeddings=True),
    "qwen2.5-7b": dict(_QWEN25, n_layer=28, d_model=3584, n_head=28, n_kv_head=4, d_ff=18944),
    "qwen2.5-72b": dict(_QWEN25, n_layer=80, d_model=8192, n_head=64, n_kv_head=8, d_ff=29568),
    # Qwen/Qwen3-0.6B, Qwen3-8B, Qwen3-32B: q/k norms, heads of 128 whatever the width (0.6B: 16 x 128
    # = 2048 query features on a width of 1024; 32B: 64 x 128 = 8192 on 5120); 0.6B ties its embeddings.
    "qwen3-0.6b": dict(_QWEN3, n_layer=28, d_model=1024, n_head=16, n_kv_head=8, d_ff=3072, tie_embeddings=True),
    "qwen3-8b": dict(_QWEN3, n_layer=36, d_model=4096, n_head=32, n_kv_head=8, d_ff=12288),
    "qwen3-32b": dict(_QWEN3, n_layer=64, d_model=5120, n_head=64, n_kv_head=8, d_ff=25600),
    # mistralai/Mistral-7B-v0.1 (a 4096-token sliding window) and Mistral-7B-v0.3 (no window, a
    # 32,768-token vocabulary, RoPE base 1e6).
    "mistral-7b-v0.1": dict(_MISTRAL, vocab_size=32000, rope_theta=10000.0, sliding_window=4096),
    "mistral-7b-v0.3": dict(_MISTRAL, vocab_size=32768, rope_theta=1e6),
}


def preset(name: str) -> dict:
    """The field values of preset ``name`` (a copy), or a ConfigError listing the presets."""
    key = name if name in PRESETS else name.strip().lower().replace("_", "-")  # GPT3-13B, gpt3_125m
    if key in PRESETS:
        return dict(PRESETS[key], preset=key)
    import difflib

    from pathlib import Path

    near = difflib.get_close_matches(key, list(PRESETS), n=1)
    if Path(name).expanduser().is_dir():  # (a model directory given as a preset: fuyou plan takes one there, a pass)
        raise ConfigError(f"{name!r} is a directory, not a model preset: to start from a model's weights give "
                          f"--init-from {name} (model.init_from); presets are: {', '.join(PRESETS)}")
    raise ConfigError(f"unknown model preset {name!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                      + f"; choose one of: {', '.join(PRESETS)}")
