"""Models as a sequence of stages: embedding, one stage per transformer block, head (norm, LM head, loss).

A stage is a *stateless template*: it declares the shapes of its parameters (``ParamSpec``) and is
called with an explicit parameter dict, so an engine can bind weights that were streamed in from the
CPU or the SSD (DESIGN.md, Execution model). Nothing is allocated to describe a model; a 175B model's
stages and counts cost microseconds.

Parameters are named globally ``"<stage>.<local>"`` (``"block.3.qkv.weight"``). Each parameter is
owned by exactly one stage; a stage may *share* a parameter owned by another (the tied LM head uses
``"embed.wte"``), which is listed in ``Stage.shared``. Gradients of a shared parameter are summed over
every stage that uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fuyou.models.config import ModelConfig
from fuyou.models.layers import (apply_rope, attention_mask, autocast_input, causal_attention, layer_norm,
                                 linear_cross_entropy, rms_norm, rope_tables)

Init = Literal["normal", "normal_resid", "zeros", "ones", "lora_a"]


@dataclass(frozen=True)
class ParamSpec:
    """Shape and initialisation of one parameter. ``decay``: whether weight decay applies to it."""

    shape: tuple[int, ...]
    init: Init
    decay: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Stage:
    """One unit of the layer loop. Subclasses implement ``forward``."""

    name: str
    index: int
    cfg: ModelConfig
    params: dict[str, ParamSpec] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)  # local name -> global key owned elsewhere
    adapters: dict[str, ParamSpec] = field(default_factory=dict)  # LoRA's A and B (fuyou.models.lora)
    lora: object = None  # their ``LoRASettings`` when the stage has adapters

    def key(self, local: str) -> str:
        return f"{self.name}.{local}"

    @property
    def num_params(self) -> int:
        """Parameters this stage owns (shared ones are counted at their owner)."""
        return sum(s.numel for s in self.params.values())

    @property
    def matmul_params(self) -> int:
        """Parameters used as matmul weights in this stage (for the FLOP count)."""
        return 0

    def bind(self, all_params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Select this stage's parameters (owned, shared, and its adapters where ``all_params`` has
        them) from a global dict, by local name."""
        bound = {local: all_params[self.key(local)] for local in self.params}
        bound.update({local: all_params[gkey] for local, gkey in self.shared.items()})
        bound.update({local: all_params[self.key(local)] for local in self.adapters if self.key(local) in all_params})
        return bound

    def _matmul(self, lin, cls: str, name: str, x: Tensor, params: dict[str, Tensor], key: int | None) -> Tensor:
        """Matmul ``name`` (its weight and bias, if any) of activation class ``cls``, plus its LoRA
        adapter's update when ``params`` holds one (``fuyou.models.lora``; ``key``: dropout's)."""
        y = lin(cls, x, params[f"{name}.weight"], params.get(f"{name}.bias"))
        a = params.get(f"{name}.lora_A")
        if a is not None:
            y = y + self.lora.delta(self.index, name, x, a, params[f"{name}.lora_B"], key)
        return y

    def init_params(self, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Initialise this stage's owned parameters on the CPU, independently of every other stage.

        The generator is seeded from (seed, stage index), so an engine can initialise stage i alone,
        straight into its offload tier, and get the same values as whole-model initialisation.
        """
        gen = torch.Generator().manual_seed(seed * 1_000_003 + self.index)
        std, resid_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        out: dict[str, Tensor] = {}
        for local, spec in self.params.items():
            if spec.init == "zeros":
                t = torch.zeros(spec.shape)
            elif spec.init == "ones":
                t = torch.ones(spec.shape)
            else:
                s = resid_std if spec.init == "normal_resid" else std
                t = torch.empty(spec.shape).normal_(0.0, s, generator=gen)
            out[self.key(local)] = t.to(dtype)
        return out

    def forward(self, params: dict[str, Tensor], x: Tensor, targets: Tensor | None = None, acts=None,
                pos: Tensor | None = None, loss_tokens: int | None = None, key: int | None = None) -> Tensor:
        """Run the stage. ``acts`` (blocks only): an activation context whose ``linear(cls, x, w, b)``
        replaces each classed matmul (see ``fuyou.engine.recompute``). ``pos``: each token's position in
        its document, (B, T), 0 where a packed document starts (None: one document per row, positions
        0..T-1). ``loss_tokens`` (head only): the loss is the sum over tokens divided by this count (the
        step's tokens with a target, over all its micro-batches), not the micro-batch's mean. ``key``
        (blocks with LoRA adapters): the micro-batch's dropout key; None: no dropout (evaluation)."""
        raise NotImplementedError


def _linear(cls: str, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A block's matmul of activation class ``cls`` (the classes are in ``ACT_CLASSES``). The
    engine's activation swapper passes its own ``acts.linear`` to keep or restore these outputs."""
    return F.linear(x, weight, bias)


# Activation classes of a block, in DESIGN.md's swap priority (recompute FLOPs saved per byte):
# the outputs of the second MLP matmul, the attention projection, the QKV projection(s), the first
# MLP matmul(s) (Llama: gate and up).
ACT_CLASSES = ("fc2", "proj", "qkv", "fc1")


class EmbeddingStage(Stage):
    """Token embedding (plus learned positions for GPT). Input: token ids (B, T). Output: (B, T, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__("embed", 0, cfg)
        self.params["wte"] = ParamSpec((cfg.vocab_size, cfg.d_model), "normal", decay=False)
        if cfg.family == "gpt":
            self.params["wpe"] = ParamSpec((cfg.max_seq_len, cfg.d_model), "normal", decay=False)

    def forward(self, params, x, targets=None, acts=None, pos=None, loss_tokens=None, key=None):
        h = F.embedding(x, params["wte"])
        if "wpe" in params:
            h = h + (params["wpe"][: x.shape[1]] if pos is None else F.embedding(pos, params["wpe"]))
        return h


class GPTBlock(Stage):
    """Pre-norm GPT-2/3 block: LN, fused QKV, causal attention, projection; LN, FC1, GELU(tanh), FC2."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(f"block.{layer}", layer + 1, cfg)
        d, f = cfg.d_model, cfg.ff_dim
        p = self.params
        p["ln1.weight"], p["ln1.bias"] = ParamSpec((d,), "ones", False), ParamSpec((d,), "zeros", False)
        p["qkv.weight"], p["qkv.bias"] = ParamSpec((3 * d, d), "normal", True), ParamSpec((3 * d,), "zeros", False)
        p["proj.weight"], p["proj.bias"] = ParamSpec((d, d), "normal_resid", True), ParamSpec((d,), "zeros", False)
        p["ln2.weight"], p["ln2.bias"] = ParamSpec((d,), "ones", False), ParamSpec((d,), "zeros", False)
        p["fc1.weight"], p["fc1.bias"] = ParamSpec((f, d), "normal", True), ParamSpec((f,), "zeros", False)
        p["fc2.weight"], p["fc2.bias"] = ParamSpec((d, f), "normal_resid", True), ParamSpec((d,), "zeros", False)

    @property
    def matmul_params(self) -> int:
        return sum(self.params[k].numel for k in ("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"))

    def forward(self, params, x, targets=None, acts=None, pos=None, loss_tokens=None, key=None):
        cfg = self.cfg
        B, T, D = x.shape
        lin = acts.linear if acts is not None else _linear
        mm = self._matmul
        h = layer_norm(x, params["ln1.weight"], params["ln1.bias"], cfg.norm_eps)
        qkv = mm(lin, "qkv", "qkv", h, params, key)
        q, k, v = qkv.view(B, T, 3, cfg.n_head, cfg.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = attention_mask(pos, T, None, x.device)
        a = causal_attention(q, k, v, mask).transpose(1, 2).reshape(B, T, D)
        x = x + mm(lin, "proj", "proj", a, params, key)
        h = layer_norm(x, params["ln2.weight"], params["ln2.bias"], cfg.norm_eps)
        h = F.gelu(mm(lin, "fc1", "fc1", h, params, key), approximate="tanh")
        return x + mm(lin, "fc2", "fc2", h, params, key)


class LlamaBlock(Stage):
    """Llama block: RMSNorm, Q/K/V with RoPE and grouped-query attention, O; RMSNorm, SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(f"block.{layer}", layer + 1, cfg)
        d, f, kvd, qd = cfg.d_model, cfg.ff_dim, cfg.kv_heads * cfg.head_dim, cfg.q_width
        p = self.params
        p["attn_norm.weight"] = ParamSpec((d,), "ones", False)
        p["q.weight"] = ParamSpec((qd, d), "normal", True)
        p["k.weight"] = ParamSpec((kvd, d), "normal", True)
        p["v.weight"] = ParamSpec((kvd, d), "normal", True)
        if cfg.attn_bias:  # Qwen2-style Q/K/V biases
            p["q.bias"] = ParamSpec((qd,), "zeros", False)
            p["k.bias"] = ParamSpec((kvd,), "zeros", False)
            p["v.bias"] = ParamSpec((kvd,), "zeros", False)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head of the queries and keys
            p["q_norm.weight"] = ParamSpec((cfg.head_dim,), "ones", False)
            p["k_norm.weight"] = ParamSpec((cfg.head_dim,), "ones", False)
        p["o.weight"] = ParamSpec((d, qd), "normal_resid", True)
        p["mlp_norm.weight"] = ParamSpec((d,), "ones", False)
        p["gate.weight"] = ParamSpec((f, d), "normal", True)
        p["up.weight"] = ParamSpec((f, d), "normal", True)
        p["down.weight"] = ParamSpec((d, f), "normal_resid", True)
        self._rope: dict[tuple, tuple[Tensor, Tensor]] = {}

    @property
    def matmul_params(self) -> int:
        return sum(s.numel for k, s in self.params.items() if k.endswith(".weight") and not k.endswith("norm.weight"))

    def _tables(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (T, str(device))
        if key not in self._rope:
            self._rope[key] = rope_tables(T, self.cfg.head_dim, self.cfg.rope_theta, device, self.cfg.rope_scaling)
        return self._rope[key]

    def forward(self, params, x, targets=None, acts=None, pos=None, loss_tokens=None, key=None):
        cfg = self.cfg
        B, T, D = x.shape
        hd = cfg.head_dim
        lin = acts.linear if acts is not None else _linear
        mm = self._matmul
        h = autocast_input(rms_norm(x, params["attn_norm.weight"], cfg.norm_eps))
        q = mm(lin, "qkv", "q", h, params, key).view(B, T, cfg.n_head, hd)
        k = mm(lin, "qkv", "k", h, params, key).view(B, T, cfg.kv_heads, hd)
        v = mm(lin, "qkv", "v", h, params, key).view(B, T, cfg.kv_heads, hd).transpose(1, 2)
        if cfg.qk_norm:
            q, k = rms_norm(q, params["q_norm.weight"], cfg.norm_eps), rms_norm(k, params["k_norm.weight"], cfg.norm_eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = self._tables(T, x.device)
        if pos is not None:  # per-row positions (packed documents): (B, 1, T, hd) tables
            cos, sin = cos[pos][:, None], sin[pos][:, None]
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # once for both (a saved graph keeps one copy)
        mask = attention_mask(pos, T, cfg.sliding_window, x.device)
        a = causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask)
        x = x + mm(lin, "proj", "o", a.transpose(1, 2).reshape(B, T, cfg.q_width), params, key)
        h = autocast_input(rms_norm(x, params["mlp_norm.weight"], cfg.norm_eps))
        h = F.silu(mm(lin, "fc1", "gate", h, params, key)) * mm(lin, "fc1", "up", h, params, key)
        return x + mm(lin, "fc2", "down", h, params, key)


class HeadStage(Stage):
    """Final norm, LM head and mean cross-entropy (computed in fp32, a slice of tokens at a time:
    ``layers.linear_cross_entropy``). Returns the loss when given ``targets``, the logits otherwise."""

    def __init__(self, cfg: ModelConfig):
        super().__init__("head", cfg.n_layer + 1, cfg)
        self.loss_chunk_tokens: int | None = None  # tokens per slice of the loss; None: layers.loss_chunk_tokens
        d = cfg.d_model
        self.params["norm.weight"] = ParamSpec((d,), "ones", False)
        if cfg.family == "gpt":
            self.params["norm.bias"] = ParamSpec((d,), "zeros", False)
        if cfg.tie_embeddings:
            self.shared["lm_head.weight"] = "embed.wte"
        else:
            self.params["lm_head.weight"] = ParamSpec((cfg.vocab_size, d), "normal", True)

    @property
    def matmul_params(self) -> int:
        return self.cfg.vocab_size * self.cfg.d_model

    def forward(self, params, x, targets=None, acts=None, pos=None, loss_tokens=None, key=None):
        if "norm.bias" in params:
            h = layer_norm(x, params["norm.weight"], params["norm.bias"], self.cfg.norm_eps)
        else:
            h = rms_norm(x, params["norm.weight"], self.cfg.norm_eps)
        if targets is None:
            return F.linear(h, params["lm_head.weight"]).float()
        # Logits, loss and gradients a slice of tokens at a time: never the whole batch's logits.
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), params["lm_head.weight"], targets.reshape(-1),
                                    self.loss_chunk_tokens, loss_tokens=loss_tokens)
