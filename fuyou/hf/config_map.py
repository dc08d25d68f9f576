"""Hugging Face ``config.json`` <-> fuyou's ``ModelConfig`` fields, for the architectures fuyou runs.

fuyou's blocks compute what transformers computes for these architectures (RoPE in the half-split
layout, RMSNorm in fp32 then scaled, GELU-tanh for GPT-2), so a supported config maps field by field:

- Llama 2, 3, 3.1, 3.2, 3.3: RoPE scaling 'llama3' or 'linear' -> ``rope_scaling``; a ``head_dim``
  apart from hidden/heads -> ``d_head``; tied embeddings (3.2 1B/3B) -> ``tie_embeddings``.
- Mistral: an active ``sliding_window`` (v0.1's 4096) -> ``sliding_window``.
- Qwen2 / Qwen2.5: Q/K/V biases -> ``attn_bias``; ``use_sliding_window`` false (every released model)
  means full attention, whatever ``sliding_window`` says.
- Qwen3 (dense): q/k RMSNorm -> ``qk_norm``, ``head_dim`` (128, apart from hidden/heads) -> ``d_head``.
- GPT-2.

A sliding window at least ``max_position_embeddings`` long is kept too: fuyou trains a RoPE model past
its positions, where it applies, and within it attention takes no mask. Anything else that would change
the arithmetic is refused with a sentence, not approximated: other RoPE scalings (dynamic, yarn,
longrope), partial rotary embeddings, an O-projection bias (``attention_bias`` in Llama, Mistral and
Qwen3 biases Q, K, V *and* O; fuyou's block has Q/K/V biases only, as Qwen2), MLP biases,
sliding-window attention on some layers only, quantisation.

Not implemented, by decision (``REFUSED`` gives the user the reason):

- Gemma 1/2/3 is a block family of its own, not options of the Llama block: RMSNorm scaling by
  (1 + w), embeddings multiplied by sqrt(d_model), a GeGLU MLP; from Gemma 2 on, norms after attention
  and MLP as well as before, soft-capped attention and final logits, a query scale from
  ``query_pre_attn_scalar``, alternating local (sliding) and global layers; Gemma 3 adds q/k norms and
  a second RoPE base for its local layers. Each piece would be a branch in the block, the loss and
  the planner's shape formulas.
- Phi-3/3.5 stores Q, K, V as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` tensor; fuyou's
  weight table maps one Hugging Face tensor to one fuyou tensor, and splitting on import/joining on
  export would be a second kind of mapping. The long-context variants also use 'longrope' (Phi-3's
  'su') scaling, per-dimension factors switching at the original context, which fuyou lacks.

Both spellings of transformers' config are read: v4's ``rope_theta``/``rope_scaling``/``torch_dtype``
and v5's ``rope_parameters``/``dtype``. Written configs keep the template's spelling, or use v4's
(which v5 reads) when there is no template.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from fuyou.errors import ConfigError
from fuyou.models.config import RopeScaling

# architecture -> (model_type, fuyou family)
SUPPORTED: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("mistral", "llama"),
    "Qwen2ForCausalLM": ("qwen2", "llama"),
    "Qwen3ForCausalLM": ("qwen3", "llama"),
    "GPT2LMHeadModel": ("gpt2", "gpt"),
}
SUPPORTED_TEXT = ("LlamaForCausalLM (Llama 2, 3, 3.1, 3.2, 3.3), MistralForCausalLM (sliding window included), "
                  "Qwen2ForCausalLM (Qwen2, Qwen2.5), Qwen3ForCausalLM (dense Qwen3), GPT2LMHeadModel")
_GEMMA = ("its block is not Llama's: RMSNorm scaled by (1 + w), embeddings multiplied by sqrt(hidden_size), "
          "a GeGLU MLP")
_GEMMA2 = (f"{_GEMMA}, plus norms after attention and MLP, soft-capped attention and final logits and alternating "
           f"sliding/global layers")
# Architectures fuyou does not compute, by decision (module docstring), -> why, for the error message.
REFUSED: dict[str, tuple[str, str]] = {
    "GemmaForCausalLM": ("gemma", _GEMMA),
    "Gemma2ForCausalLM": ("gemma2", _GEMMA2),
    "Gemma3ForCausalLM": ("gemma3_text", f"{_GEMMA2}, q/k norms and a second RoPE base for the local layers"),
    "Gemma3ForConditionalGeneration": ("gemma3", "it is a vision-language model (and its text model is Gemma 3's, "
                                                 "whose block is not Llama's)"),
    "Phi3ForCausalLM": ("phi3", "its checkpoints fuse Q/K/V into one qkv_proj and gate/up into one gate_up_proj "
                                "tensor, which fuyou's one-to-one weight table does not split, and its long-context "
                                "models use longrope ('su') RoPE scaling"),
}
# The ModelConfig fields a checkpoint determines (everything else, e.g. init_std, stays the user's).
SHAPE_FIELDS = ("family", "n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "vocab_size", "max_seq_len",
                "tie_embeddings", "norm_eps", "rope_theta", "attn_bias", "d_head", "qk_norm", "rope_scaling",
                "sliding_window")
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_ROPE_FIELDS = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def architecture(hf: dict[str, Any], where: str = "config.json") -> str:
    """The supported architecture ``hf`` describes, or a ConfigError saying why not (``REFUSED``) or
    listing the supported ones."""
    archs = hf.get("architectures") or []
    if isinstance(archs, str):  # a hand-edited config
        archs = [archs]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{where}: architectures is {archs!r}; a Hugging Face config lists class names there "
                          f"(e.g. [\"LlamaForCausalLM\"])")
    if not archs:  # old configs: infer from model_type
        by_type = {mt: a for a, (mt, _) in {**SUPPORTED, **REFUSED}.items()}
        archs = [by_type[hf["model_type"]]] if hf.get("model_type") in by_type else []
    if len(archs) == 1 and archs[0] in SUPPORTED:
        return archs[0]
    if len(archs) == 1 and archs[0] in REFUSED:
        raise ConfigError(f"{where}: architecture {archs[0]} is not supported: {REFUSED[archs[0]][1]}. fuyou "
                          f"imports {SUPPORTED_TEXT}")
    if not archs and hf.get("model_type") is None:  # (it said "architecture model_type None": a pass)
        raise ConfigError(f"{where} has neither architectures nor model_type, so it names no architecture; a Hugging "
                          f"Face config gives them (e.g. \"architectures\": [\"LlamaForCausalLM\"]); fuyou imports "
                          f"{SUPPORTED_TEXT}")
    got = ", ".join(archs) or f"model_type {hf.get('model_type')!r}"
    raise ConfigError(f"{where}: architecture {got} is not supported; fuyou imports {SUPPORTED_TEXT}")


def to_fuyou(hf: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """``ModelConfig`` shape fields (``SHAPE_FIELDS``) for a Hugging Face config, or a ConfigError."""
    arch = architecture(hf, where)
    if hf.get("quantization_config"):
        raise ConfigError(f"{where}: quantized checkpoints are not supported; fuyou trains fp32 weights "
                          f"(use the unquantized model)")
    try:
        if SUPPORTED[arch][1] == "gpt":
            return _gpt2_to_fuyou(hf, where)
        return _llama_to_fuyou(hf, arch, where)
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # a field of the wrong type ("abc", a string for a dict)
        raise ConfigError(f"{where}: a field has a value fuyou cannot read ({type(e).__name__}: {e}); is it a valid "
                          f"Hugging Face config.json?") from None


def _require(hf: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if hf.get(k) is None]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}; is it a complete Hugging Face model config?")


def rope(hf: dict, where: str = "config.json") -> tuple[float, dict[str, Any] | None]:
    """RoPE base and scaling (``RopeScaling`` fields, or None) of a v4 or v5 config; refuses the
    scalings fuyou does not compute."""
    params, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}

    def kind(spec: dict) -> str:
        return spec.get("rope_type", spec.get("type", "default"))

    scaled = [s for s in (params, scaling) if kind(s) != "default"]
    if len(scaled) == 2 and (kind(params) != kind(scaling) or
                             any(params.get(f) != scaling.get(f) for f in _ROPE_FIELDS.get(kind(params), ()))):
        raise ConfigError(f"{where}: rope_parameters and rope_scaling disagree ({params} vs {scaling}); keep one")
    spec = scaled[0] if scaled else params
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor={partial} rotates part of each head only; fuyou's RoPE "
                          f"rotates the whole head")
    name = kind(spec)
    if name == "default":
        return theta, None
    if name not in _ROPE_FIELDS:
        raise ConfigError(f"{where}: RoPE scaling {name!r} is not supported (fuyou computes the default RoPE, "
                          f"'linear' and 'llama3'); use a model whose RoPE scaling is one of these or null")
    missing = [f for f in _ROPE_FIELDS[name] if spec.get(f) is None]
    if missing:
        raise ConfigError(f"{where}: RoPE scaling {name!r} lacks {', '.join(missing)}")
    try:
        scaling_cfg = RopeScaling(type=name, **{f: spec[f] for f in _ROPE_FIELDS[name]})
    except ValidationError as e:
        raise ConfigError(f"{where}: RoPE scaling {spec}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") \
            from None
    return theta, scaling_cfg.model_dump()


def _sliding_window(hf: dict, arch: str, n_layer: int, where: str) -> int | None:
    """The sliding window every layer uses, None for full attention; refuses a mix of the two.

    Mistral applies ``sliding_window`` to every layer when it is set. Qwen2/Qwen3 apply it only with
    ``use_sliding_window``, and then to the layers from ``max_window_layers`` on (or as ``layer_types``
    says). Llama has no sliding window (transformers ignores the key)."""
    window = hf.get("sliding_window")
    if arch == "MistralForCausalLM":
        active = window is not None
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        active = bool(hf.get("use_sliding_window")) and window is not None
    else:
        active = False
    types = hf.get("layer_types")
    if types is None and active and arch != "MistralForCausalLM":
        first = int(hf.get("max_window_layers", 28))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layer)]
    kinds = set(types or ())
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise ConfigError(f"{where}: layer_types {sorted(kinds)}: fuyou computes full and sliding-window "
                          f"attention only")
    if len(kinds) > 1:
        n = sum(t == "sliding_attention" for t in types)
        raise ConfigError(f"{where}: {n} of {len(types)} layers use sliding-window attention, the others full "
                          f"attention (layer_types / max_window_layers); fuyou applies one attention to every layer")
    if not active or (kinds == {"full_attention"} and arch != "MistralForCausalLM"):  # Mistral: every layer
        return None
    # kept however long: fuyou trains a RoPE model past its positions (with a note), where a window as long as
    # them applies, as transformers applies it (it was dropped, and the model trained with full attention: a pass);
    # within the window the attention takes no mask (layers.attention_mask), so it costs nothing there
    return int(window)


def _llama_to_fuyou(hf: dict, arch: str, where: str) -> dict[str, Any]:
    _require(hf, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
             where)
    d, heads, n_layer = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={hf['hidden_act']!r}; fuyou's Llama MLP is SwiGLU (silu)")
    if hf.get("head_dim") is None and d % heads:
        raise ConfigError(f"{where}: hidden_size={d} is not a multiple of num_attention_heads={heads} and there is "
                          f"no head_dim")
    head_dim = int(hf.get("head_dim") or d // heads)
    if arch != "Qwen2ForCausalLM" and hf.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true in {arch} biases the Q, K, V and O projections; fuyou's "
                          f"Llama block has Q/K/V biases (as Qwen2) but no O-projection bias")
    if hf.get("mlp_bias"):
        raise ConfigError(f"{where}: mlp_bias=true is not supported (fuyou's Llama MLP has no biases)")
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    theta, scaling = rope(hf, where)
    return {
        "family": "llama", "n_layer": n_layer, "d_model": d, "n_head": heads,
        "n_kv_head": int(hf.get("num_key_value_heads") or heads), "d_ff": int(hf["intermediate_size"]),
        "vocab_size": int(hf["vocab_size"]), "max_seq_len": max_pos,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta, "attn_bias": arch == "Qwen2ForCausalLM",
        "d_head": head_dim if head_dim * heads != d else None, "qk_norm": arch == "Qwen3ForCausalLM",
        "rope_scaling": scaling, "sliding_window": _sliding_window(hf, arch, n_layer, where),
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
        "d_head": None, "qk_norm": False, "rope_scaling": None, "sliding_window": None,
    }


def _expresses(arch: str, model) -> bool:
    """Whether Hugging Face's ``arch`` computes ``model`` (a ModelConfig) exactly."""
    if model.family == "gpt" or arch == "GPT2LMHeadModel":
        return model.family == "gpt" and arch == "GPT2LMHeadModel"
    if model.attn_bias != (arch == "Qwen2ForCausalLM") or model.qk_norm != (arch == "Qwen3ForCausalLM"):
        return False
    if arch == "LlamaForCausalLM":  # (LlamaConfig refuses a width its heads do not divide, head_dim or not: a pass)
        return model.sliding_window is None and model.d_model % model.n_head == 0
    return True


def unexportable(model) -> str | None:
    """Why no Hugging Face architecture computes ``model``, else None (said when such a model is trained or
    planned: it trained, and its export was refused at the end: a pass)."""
    if model.family != "gpt" and model.qk_norm and model.attn_bias:
        return ("no Hugging Face architecture computes q/k norms with Q/K/V biases only (Qwen3's attention_bias "
                "also biases the O projection)")
    return None


def hf_architecture(model) -> str:
    """The architecture a model trained from scratch is exported as, or a ConfigError when none computes it."""
    if model.family == "gpt":
        return "GPT2LMHeadModel"
    if unexportable(model):
        raise ConfigError(f"{unexportable(model)}; export a model without attn_bias")
    if model.qk_norm:
        return "Qwen3ForCausalLM"
    if model.attn_bias:
        return "Qwen2ForCausalLM"
    # Mistral: a sliding window, or a width the heads do not divide (head_dim apart), which LlamaConfig refuses
    llama = model.sliding_window is None and model.d_model % model.n_head == 0
    return "LlamaForCausalLM" if llama else "MistralForCausalLM"


def to_hf(model, dtype: str = "fp32", template: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``config.json`` for ``model`` (a ModelConfig). ``template``: the config the run started from;
    its other fields (token ids, dropout, version) are kept when its architecture computes the model."""
    arch = hf_architecture(model)
    if template is not None:
        try:
            t_arch = architecture(template)
        except ConfigError:
            t_arch = None
        keep = t_arch is not None and _expresses(t_arch, model)
        template = dict(template) if keep else None
        arch = t_arch if keep else arch
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
        _write_rope(hf, model)
        _write_window(hf, arch, model)
    name = _DTYPES[dtype]
    for key in ("dtype", "torch_dtype"):
        if key in hf:
            hf[key] = name
    if "dtype" not in hf and "torch_dtype" not in hf:
        hf["torch_dtype"] = name
    return hf


def _write_rope(hf: dict, model) -> None:
    """RoPE base and scaling in the config's spelling: v5's ``rope_parameters`` if it has them, else v4's."""
    sc = model.rope_scaling
    scaling = None if sc is None else {"rope_type": sc.type, **{f: getattr(sc, f) for f in _ROPE_FIELDS[sc.type]}}
    if isinstance(hf.get("rope_parameters"), dict):
        hf["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": model.rope_theta}
        hf.pop("rope_scaling", None)
        hf.pop("rope_theta", None)
    else:
        hf["rope_theta"], hf["rope_scaling"] = model.rope_theta, scaling


def _write_window(hf: dict, arch: str, model) -> None:
    """The sliding window, in the architecture's terms (``_sliding_window`` reads them back)."""
    window = model.sliding_window
    # No window: a template's that never applies within the context (Mistral's at least its positions; Qwen's
    # behind use_sliding_window=false) is kept as it was, so that a longer context behaves as the original
    old = hf.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        hf.update(use_sliding_window=window is not None, sliding_window=window if window is not None else old)
        if window is not None:
            hf["max_window_layers"] = 0  # from layer 0 on: every layer
    elif arch == "MistralForCausalLM":
        inactive = window is None and isinstance(old, int) and old >= model.max_seq_len
        hf["sliding_window"] = old if inactive else window
    if "layer_types" in hf or arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        hf["layer_types"] = ["full_attention" if window is None else "sliding_attention"] * model.n_layer


def _fresh(arch: str) -> dict[str, Any]:
    """Fields of a config with no template (a model trained from scratch in fuyou): token ids unset,
    since fuyou's byte tokenizer has no Hugging Face counterpart."""
    if arch == "GPT2LMHeadModel":
        return {"activation_function": "gelu_new", "bos_token_id": None, "eos_token_id": None,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    base = {"hidden_act": "silu", "bos_token_id": None, "eos_token_id": None, "attention_dropout": 0.0}
    if arch == "Qwen2ForCausalLM":
        return base
    if arch == "MistralForCausalLM":
        return {**base, "sliding_window": None}
    return {**base, "attention_bias": False, "mlp_bias": False}
