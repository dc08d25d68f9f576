"""LoRA: low-rank adapters on a frozen base, with PEFT's meaning.

A targeted matmul ``y = x W^T + b`` becomes ``y + scale * B(A(dropout(x)))`` with ``A`` of shape
(rank, in) and ``B`` (out, rank), ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA), as in
PEFT's ``LoraLayer``. Only ``A`` and ``B`` train; the base weights are read, never updated, so they need
no master copy, no moments and no gradient (``fuyou.engine.engine`` in LoRA mode).

Targets are the module names users write for PEFT (``lora.targets``): Llama/Qwen/Mistral ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``; GPT-2 ``c_attn``,
``c_fc``, ``c_proj`` (both the attention's and the MLP's, as PEFT's suffix match takes both;
``attn.c_proj`` / ``mlp.c_proj`` for one); ``all-linear`` (every block matmul; never the LM head or the
embedding, as in PEFT); fuyou's own names (``q``, ``qkv``, ``fc1``, ...) work too.

Initialisation (``lora.init``): ``default`` is PEFT's: A ~ kaiming-uniform with a = sqrt(5), which is
U(-1/sqrt(in), 1/sqrt(in)), and B = 0 (the model starts as the base); ``gaussian``: A ~ N(0, 1/rank).
Each adapter is drawn from a generator seeded by (seed, stage, name): the same values whatever the
engine or the tier.

Dropout draws its mask from a generator seeded by (key, stage, name), where the trainers' key is a
function of (seed, step, micro-batch): recomputation in backward redraws the same mask, and a resumed
run the same masks as an uninterrupted one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from fuyou.errors import ConfigError


class LoRAConfig(BaseModel):
    """Low-rank adapters (module docstring). ``rank = 0``: full fine-tuning (no adapters)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rank: int = Field(0, ge=0, description="Adapter rank r; 0 turns LoRA off (every weight trains).")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the update is alpha / r x B A x (PEFT's lora_alpha).")
    targets: list[str] | None = Field(
        None, description="Matmuls that get adapters: Hugging Face module names (q_proj, k_proj, v_proj, o_proj, "
        "gate_proj, up_proj, down_proj; GPT-2 c_attn, c_proj, c_fc), 'all-linear', or fuyou's names; unset: "
        "PEFT's defaults (q_proj and v_proj; GPT-2's c_attn).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input (PEFT's lora_dropout).")
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r.")
    init_from: str | None = Field(
        None, description="A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors: what peft's "
        "save_pretrained and `fuyou export` of a LoRA run write) whose A and B a new run starts from; its r, "
        "lora_alpha, use_rslora and target modules must be this run's.")
    init: Literal["default", "gaussian"] = Field(
        "default", description="A's initialisation: PEFT's default (kaiming-uniform, a=sqrt(5)) or 'gaussian' "
        "(N(0, 1/r)); B starts at zero either way.")
    base: Literal["compute", "int8", "nf4", "nf4dq"] = Field(
        "compute", description="How the frozen base is stored and streamed: 'compute' in the run's compute "
        "precision (train.precision: bf16 or fp32); 'int8' its blocks' matmul weights as int8 with an fp32 scale "
        "per output channel, about 1 byte a parameter, half of bf16's; 'nf4' as QLoRA's 4-bit NormalFloat with "
        "an fp32 absmax per block of 64, about 0.56 bytes; 'nf4dq' NF4 with QLoRA's double quantisation of the "
        "absmax values (bitsandbytes' bnb_4bit_use_double_quant), about 0.516 bytes (fuyou/models/quant.py).")

    @field_validator("base", mode="before")
    @classmethod
    def _base_by_dtype(cls, v):
        """A dtype names no base format of its own: the compute precision's is 'compute' (refused with a bare
        list of the values, which did not say which one is bf16: a pass)."""
        if isinstance(v, str) and v.lower() in ("bf16", "bfloat16", "fp32", "float32", "fp16", "float16"):
            raise ValueError(f"lora.base={v}: the base in the run's compute precision is lora.base=compute (the "
                             f"default: bf16 with train.precision=bf16, fp32 with fp32); 'int8', 'nf4' and 'nf4dq' "
                             f"store it smaller")
        return v

    @field_validator("targets", mode="before")
    @classmethod
    def _one_target(cls, v):
        """A string is one name or several: 'q_proj,v_proj' and '[q_proj, v_proj]' (the CLI's unquoted list)."""
        if isinstance(v, str):
            return [t.strip().strip("'\"") for t in v.strip().strip("[]").split(",") if t.strip()]
        return v

    @model_validator(mode="after")
    def _init_from_needs_lora(self):
        if self.init_from and not self.rank:
            raise ValueError(f"lora.init_from={self.init_from} is set but lora.rank is 0 (LoRA off): give the adapter's "
                             f"own settings too" + (f": {own}" if (own := _adapter_settings(self.init_from)) else
                                                    " (lora.rank, lora.alpha, lora.targets: its adapter_config.json's "
                                                    "r, lora_alpha and target_modules)"))
        fields = LoRAConfig.model_fields
        adapter = [f"lora.{k}" for k in ("targets", "dropout", "alpha", "use_rslora", "init")
                   if getattr(self, k) != fields[k].default]
        # a new-user pass: lora.targets alone ran full fine-tuning in silence. An explicit lora.rank=0 is LoRA
        # turned off knowingly (a config file's [lora] kept for later, and every run's saved config.toml)
        if adapter and not self.rank and "rank" not in self.model_fields_set:
            raise ValueError(f"{', '.join(adapter)} set but not lora.rank, which is 0 (LoRA off: every weight "
                             f"trains): set lora.rank (for example 16) to train adapters, or lora.rank=0 to train "
                             f"every weight")
        if self.base != "compute" and not self.rank:
            raise ValueError(f"lora.base={self.base} is set but lora.rank is 0 (LoRA off): a quantised base is "
                             f"LoRA's, whose base is frozen; set lora.rank, or drop lora.base")
        return self

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


# Hugging Face module name -> fuyou's matmul weights (local names in a block), per family.
HF_TARGETS = {
    "llama": {"q_proj": ["q"], "k_proj": ["k"], "v_proj": ["v"], "o_proj": ["o"], "gate_proj": ["gate"],
              "up_proj": ["up"], "down_proj": ["down"]},
    "gpt": {"c_attn": ["qkv"], "c_proj": ["proj", "fc2"], "attn.c_proj": ["proj"], "mlp.c_proj": ["fc2"],
            "c_fc": ["fc1"]},
}
ALL_LINEAR = {"llama": ["q", "k", "v", "o", "gate", "up", "down"], "gpt": ["qkv", "proj", "fc1", "fc2"]}
# fuyou's matmul -> its Hugging Face module path within a layer (PEFT's adapter names)
HF_MODULE = {
    "llama": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    "gpt": {"qkv": "attn.c_attn", "proj": "attn.c_proj", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"},
}


def _adapter_settings(path: str) -> str | None:
    """The lora.* settings of the PEFT adapter in ``path`` (its adapter_config.json), as overrides; None where
    it cannot be read (advice that was refused for lora.rank=0 now gives them: a pass)."""
    import json
    from pathlib import Path

    try:
        conf = json.loads((Path(path).expanduser() / "adapter_config.json").read_text())
        r, alpha, targets = conf["r"], conf.get("lora_alpha", 8), conf["target_modules"]  # (8: PEFT's default alpha)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if targets == "all-linear":
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        return None  # (a regular expression: the generic advice)
    rs = " lora.use_rslora=true" if conf.get("use_rslora") else ""
    return f"lora.rank={r} lora.alpha={alpha} lora.targets=[{','.join(targets)}]{rs}"


DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt": ["c_attn"]}  # PEFT's for these architectures


def resolve_targets(family: str, targets: list[str] | None) -> list[str]:
    """fuyou's matmul names (in block order) for ``lora.targets``, or a ConfigError naming the choices."""
    chosen: set[str] = set()
    targets = DEFAULT_TARGETS[family] if targets is None else targets
    if not targets:
        raise ConfigError("lora.targets is empty; name the matmuls to adapt (e.g. ['q_proj', 'v_proj'] or 'all-linear')")
    for t in targets:
        if t == "all-linear":
            chosen.update(ALL_LINEAR[family])
        elif t in HF_TARGETS[family]:
            chosen.update(HF_TARGETS[family][t])
        elif t in ALL_LINEAR[family]:
            chosen.add(t)
        elif suffix_of(t, family):  # PEFT's suffix match: 'self_attn.q_proj', 'mlp.c_proj'
            chosen.update(suffix_of(t, family))
        else:
            names = sorted(HF_TARGETS[family]) + ["all-linear"] + ALL_LINEAR[family]
            leaf = t.rpartition(".")[2]
            if re.search(r"(^|\.)\d+\.", t) and leaf in HF_TARGETS[family]:
                raise ConfigError(f"lora.targets: {t!r} names one layer's module; fuyou adapts the same matmuls in "
                                  f"every block: give {leaf!r}")
            if leaf in NOT_BLOCK_MATMULS:
                raise ConfigError(f"lora.targets: {t!r} is not supported: fuyou adapts the blocks' matmuls, not the "
                                  f"LM head or the embeddings (PEFT's all-linear leaves the head out too); choose from "
                                  f"{', '.join(names)}")
            raise ConfigError(f"lora.targets: {t!r} is no matmul of a {family} block; choose from {', '.join(names)}")
    return [n for n in ALL_LINEAR[family] if n in chosen]


def same_targets(family: str, a: list[str] | None, b: list[str] | None) -> bool:
    """Whether two ``lora.targets`` values adapt the same matmuls however spelt (``q_proj`` or ``q``, the
    default's written out, ``all-linear`` or its list): what a resume compares. Values that resolve to
    nothing valid are compared as written."""
    try:
        return resolve_targets(family, a) == resolve_targets(family, b)
    except ConfigError:
        return a == b


NOT_BLOCK_MATMULS = {"lm_head", "embed_tokens", "wte", "wpe", "embed_out", "score"}


def suffix_of(target: str, family: str) -> list[str]:
    """fuyou's matmuls whose module path within a layer (``HF_MODULE``) is ``target`` or ends in ``.target``."""
    return [n for n, p in HF_MODULE[family].items() if p == target or p.endswith("." + target)]


@dataclass(frozen=True)
class LoRASettings:
    """What a block needs to apply its adapters: the scale and the dropout probability."""

    scale: float
    dropout: float

    def delta(self, stage_index: int, name: str, x: Tensor, a: Tensor, b: Tensor, key: int | None) -> Tensor:
        """``scale * B(A(dropout(x)))``; dropout only when ``key`` is given (training)."""
        if self.dropout > 0 and key is not None:
            gen = torch.Generator(device=x.device)
            gen.manual_seed(_mix(key, stage_index, name))
            keep = torch.rand(x.shape, generator=gen, device=x.device) >= self.dropout
            x = x * keep.to(x.dtype) * (1.0 / (1.0 - self.dropout))
        return F.linear(F.linear(x, a), b) * self.scale


def _mix(key: int, stage_index: int, name: str) -> int:
    h = (key * 1_000_003 + stage_index) * 1_000_033 + sum(ord(c) * 31**i for i, c in enumerate(name))
    return h % (2**63 - 1)


def dropout_key(seed: int, step: int, micro_batch: int) -> int:
    """The dropout key of one micro-batch of one step (module docstring)."""
    return (seed * 7_919 + step) * 4_099 + micro_batch


def attach(model, cfg: LoRAConfig) -> list[str]:
    """Give every block of ``model`` (a ``StageModel``) its adapter shapes (``Stage.adapters``) and
    settings; returns the targeted matmuls. A no-op when LoRA is off."""
    from fuyou.models.stages import ParamSpec

    if not cfg.enabled:
        return []
    names = resolve_targets(model.cfg.family, cfg.targets)
    settings = LoRASettings(cfg.scale, cfg.dropout)
    for st in model.stages[1:-1]:
        for n in names:
            out, inp = st.params[f"{n}.weight"].shape
            if cfg.rank > min(out, inp):
                raise ConfigError(f"lora.rank={cfg.rank} exceeds the smaller side of {n} ({out} x {inp}): the update "
                                  f"B @ A has rank {min(out, inp)} at most there, so the rest would train nothing; "
                                  f"give lora.rank <= {min(out, inp)} (or leave {n} out of lora.targets)")
            st.adapters[f"{n}.lora_A"] = ParamSpec((cfg.rank, inp), "lora_a", decay=False)
            st.adapters[f"{n}.lora_B"] = ParamSpec((out, cfg.rank), "zeros", decay=False)
        st.lora = settings
    return names


def init_adapters(stage, cfg: LoRAConfig, seed: int) -> dict[str, Tensor]:
    """A stage's adapters by global key, fp32 (module docstring)."""
    out = {}
    for local, spec in stage.adapters.items():
        if spec.init == "zeros":
            out[stage.key(local)] = torch.zeros(spec.shape)
            continue
        gen = torch.Generator().manual_seed(_mix(seed, stage.index, local))
        if cfg.init == "gaussian":
            t = torch.empty(spec.shape).normal_(0.0, 1.0 / cfg.rank, generator=gen)
        else:
            bound = 1.0 / math.sqrt(spec.shape[1])
            t = torch.empty(spec.shape).uniform_(-bound, bound, generator=gen)
        out[stage.key(local)] = t
    return out
