"""Hugging Face ``config.json`` <-> fuyou's ``ModelConfig`` fields, for the architectures fuyou runs.

fuyou's blocks compute what transformers computes for these architectures (RoPE in the half-split
layout, RMSNorm in fp32 then scaled, GELU-tanh for GPT-2), so a supported config maps field by field.
Anything that would change the arithmetic (RoPE scaling, sliding-window attention, an O-projection
bias, a head dimension other than width/heads, quantisation) is refused, not approximated.

Both spellings of transformers' config are read: v4's ``rope_theta``/``rope_scaling``/``torch_dtype``
and v5's ``rope_parameters``/``dtype``. Written configs keep the template's spelling, or use v4's
(which v5 reads) when there is no template.
"""

from __future__ import annotations

from typing import Any

from fuyou.errors import ConfigError

# architecture -> (model_type, fuyou family)
SUPPORTED: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("mistral", "llama"),
    "Qwen2ForCausalLM": ("qwen2", "llama"),
    "GPT2LMHeadModel": ("gpt2", "gpt"),
}
SUPPORTED_TEXT = ("LlamaForCausalLM (Llama 2/3), MistralForCausalLM (without sliding window), "
                  "Qwen2ForCausalLM, GPT2LMHeadModel")
# The ModelConfig fields a checkpoint determines (everything else, e.g. init_std, stays the user's).
SHAPE_FIELDS = ("family", "n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "vocab_size", "max_seq_len",
                "tie_embeddings", "norm_eps", "rope_theta", "attn_bias")
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def architecture(hf: dict[str, Any], where: str = "config.json") -> str:
    """The supported architecture ``hf`` describes, or a ConfigError listing the supported ones."""
    archs = hf.get("architectures") or []
    if not archs:  # old configs: infer from model_type
        by_type = {mt: a for a, (mt, _) in SUPPORTED.items()}
        if hf.get("model_type") in by_type:
            return by_type[hf["model_type"]]
    if len(archs) == 1 and archs[0] in SUPPORTED:
        return archs[0]
    got = ", ".join(archs) or f"model_type {hf.get('model_type')!r}"
    raise ConfigError(f"{where}: architecture {got} is not supported; fuyou imports {SUPPORTED_TEXT}")


def to_fuyou(hf: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """``ModelConfig`` shape fields (``SHAPE_FIELDS``) for a Hugging Face config, or a ConfigError."""
    arch = architecture(hf, where)
    if hf.get("quantization_config"):
        raise ConfigError(f"{where}: quantized checkpoints are not supported; fuyou trains fp32 weights "
                          f"(use the unquantized model)")
    if SUPPORTED[arch][1] == "gpt":
        return _gpt2_to_fuyou(hf, where)
    return _llama_to_fuyou(hf, arch, where)


def _require(hf: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if hf.get(k) is None]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}; is it a complete Hugging Face model config?")


def rope_theta(hf: dict, where: str = "config.json") -> float:
    """RoPE base of a v4 or v5 config; refuses any RoPE scaling (fuyou implements the default RoPE)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for spec in (params, scaling):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"{where}: RoPE scaling {kind!r} is not supported (fuyou implements the default "
                              f"RoPE only); use a model whose rope_scaling is null")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_to_fuyou(hf: dict, arch: str, where: str) -> dict[str, Any]:
    _require(hf, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
             where)
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={hf['hidden_act']!r}; fuyou's Llama MLP is SwiGLU (silu)")
    if hf.get("head_dim") is not None and int(hf["head_dim"]) * heads != d:
        raise ConfigError(f"{where}: head_dim={hf['head_dim']} is not hidden_size/num_attention_heads = "
                          f"{d / heads:g}; fuyou's attention needs head_dim * heads == hidden_size")
    if arch != "Qwen2ForCausalLM" and hf.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true adds an O-projection bias, which fuyou's Llama block lacks "
                          f"(it supports Q/K/V biases as in Qwen2)")
    if hf.get("mlp_bias"):
        raise ConfigError(f"{where}: mlp_bias=true is not supported (fuyou's Llama MLP has no biases)")
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", arch == "MistralForCausalLM")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if (uses_window and window is not None and int(window) < max_pos) or layer_types != {"full_attention"}:
        raise ConfigError(f"{where}: sliding-window attention (window {window}, max_position_embeddings {max_pos}) "
                          f"is not supported; fuyou's attention is full causal. Supported: sliding_window null "
                          f"(Mistral v0.2 and later) or at least max_position_embeddings")
    return {
        "family": "llama", "n_layer": int(hf["num_hidden_layers"]), "d_model": d, "n_head": heads,
        "n_kv_head": int(hf.get("num_key_value_heads") or heads), "d_ff": int(hf["intermediate_size"]),
        "vocab_size": int(hf["vocab_size"]), "max_seq_len": max_pos,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": rope_theta(hf, where), "attn_bias": arch == "Qwen2ForCausalLM",
    }


def _gpt2_to_fuyou(hf: dict, where: str) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"{where}: activation_function={act!r}; fuyou's GPT MLP uses the tanh GELU "
                          f"(gelu_new / gelu_pytorch_tanh)")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ConfigError(f"{where}: non-standard attention scaling (scale_attn_by_inverse_layer_idx or "
                          f"scale_attn_weights=false) is not supported")
    if hf.get("add_cross_attention"):
        raise ConfigError(f"{where}: cross-attention is not supported (fuyou trains decoder-only models)")
    d = int(hf.get("n_embd", 768))
    return {
        "family": "gpt", "n_layer": int(hf.get("n_layer", 12)), "d_model": d, "n_head": int(hf.get("n_head", 12)),
        "n_kv_head": None, "d_ff": int(hf["n_inner"]) if hf.get("n_inner") else None,
        "vocab_size": int(hf.get("vocab_size", 50257)), "max_seq_len": int(hf.get("n_positions", 1024)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)), "rope_theta": 10000.0, "attn_bias": False,
    }


def to_hf(model, dtype: str = "fp32", template: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``config.json`` for ``model`` (a ModelConfig). ``template``: the config the run started from;
    its other fields (token ids, dropout, version) are kept when it describes the same architecture."""
    if model.family == "gpt":
        arch = "GPT2LMHeadModel"
    else:
        arch = "Qwen2ForCausalLM" if model.attn_bias else "LlamaForCausalLM"
    if template is not None:
        try:
            t_arch = architecture(template)
        except ConfigError:
            t_arch = None
        same = t_arch is not None and SUPPORTED[t_arch][1] == model.family and \
            (t_arch == "Qwen2ForCausalLM") == model.attn_bias
        template = dict(template) if same else None
        arch = t_arch if same else arch
    hf = template if template is not None else _fresh(arch)
    hf["architectures"], hf["model_type"] = [arch], SUPPORTED[arch][0]
    if model.family == "gpt":
        hf.update(n_embd=model.d_model, n_layer=model.n_layer, n_head=model.n_head, vocab_size=model.vocab_size,
                  n_positions=model.max_seq_len, n_inner=model.d_ff if model.d_ff != 4 * model.d_model else None,
                  layer_norm_epsilon=model.norm_eps, tie_word_embeddings=model.tie_embeddings)
        hf.setdefault("activation_function", "gelu_new")
    else:
        hf.update(hidden_size=model.d_model, intermediate_size=model.ff_dim, num_hidden_layers=model.n_layer,
                  num_attention_heads=model.n_head, num_key_value_heads=model.kv_heads, vocab_size=model.vocab_size,
                  max_position_embeddings=model.max_seq_len, rms_norm_eps=model.norm_eps,
                  tie_word_embeddings=model.tie_embeddings, head_dim=model.head_dim)
        if isinstance(hf.get("rope_parameters"), dict):
            hf["rope_parameters"] = {**hf["rope_parameters"], "rope_theta": model.rope_theta}
        else:
            hf["rope_theta"], hf["rope_scaling"] = model.rope_theta, None
    name = _DTYPES[dtype]
    for key in ("dtype", "torch_dtype"):
        if key in hf:
            hf[key] = name
    if "dtype" not in hf and "torch_dtype" not in hf:
        hf["torch_dtype"] = name
    return hf


def _fresh(arch: str) -> dict[str, Any]:
    """Fields of a config with no template (a model trained from scratch in fuyou): token ids unset,
    since fuyou's byte tokenizer has no Hugging Face counterpart."""
    if arch == "GPT2LMHeadModel":
        return {"activation_function": "gelu_new", "bos_token_id": None, "eos_token_id": None,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    base = {"hidden_act": "silu", "bos_token_id": None, "eos_token_id": None, "attention_dropout": 0.0}
    if arch == "Qwen2ForCausalLM":
        return {**base, "use_sliding_window": False, "sliding_window": None}
    return {**base, "attention_bias": False, "mlp_bias": False}
