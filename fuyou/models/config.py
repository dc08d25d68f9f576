"""Model configuration: the shape of a GPT- or Llama-family transformer.

A model is described by numbers alone, so a 175B model can be listed, counted and planned without
allocating a byte (see ``fuyou.models.stages``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    init_std: float = Field(0.02, gt=0, description="Standard deviation of the normal weight init.")
    init_from: str | None = Field(
        None,
        description="Start from these weights instead of a random init: a local Hugging Face model directory "
        "(config.json, *.safetensors, tokenizer files; Llama/Mistral/Qwen2/GPT-2) or a fuyou run directory "
        "(config.toml, model.safetensors; e.g. one written by `fuyou import`). Its shape fields win over the "
        "preset and the fields given here (a note lists what changed).",
    )

    @model_validator(mode="before")
    @classmethod
    def _shape_from_checkpoint(cls, data):
        if isinstance(data, dict) and data.get("init_from"):
            from fuyou.hf.source import checkpoint_model_fields  # lazy: fuyou.hf builds on the models

            data = checkpoint_model_fields(data)
        return data

    @model_validator(mode="after")
    def _check_shape(self) -> "ModelConfig":
        if self.d_model % self.n_head:
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
            raise ValueError(f"RoPE needs an even head dimension, got d_model/n_head = {self.head_dim}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

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
