"""Model presets: the GPT-3 family, LoHan's 70B, Llama-shaped models and tiny test models.

GPT-3 shapes follow the GPT-3 paper (Brown et al. 2020, table 2.1) with the corrections noted in
DESIGN.md (1.3B has 16 heads of 128; 13B has width 5120). LoHan (Fuyou) fine-tunes GPT-3 13B and
175B and a 70B of 80 layers, width 8192, 64 heads. Llama shapes follow the Llama 2 paper / released
configs (7B 32x4096, 13B 40x5120, 70B 80x8192 with 8 KV heads).
"""

from __future__ import annotations

from fuyou.errors import ConfigError

_GPT3 = dict(family="gpt", vocab_size=50257, max_seq_len=2048, tie_embeddings=True)
_LLAMA = dict(family="llama", vocab_size=32000, max_seq_len=4096, tie_embeddings=False, norm_eps=1e-5)

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
}


def preset(name: str) -> dict:
    """The field values of preset ``name`` (a copy), or a ConfigError listing the presets."""
    try:
        return dict(PRESETS[name], preset=name)
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None
