"""The activation policy: per block, where each activation class is kept, or that it is recomputed.

The planner chooses it (``fuyou.planner``), the engine carries it out (``fuyou.engine.recompute``):
this module is the language both speak, with the translation into the engine's form (``KeepPolicy``).

Classes, in DESIGN.md's swap-priority order (recompute FLOPs saved per byte kept, highest first):

* ``fc2``  output of the second MLP matmul, B*T*d elements;
* ``proj`` attention output projection, B*T*d;
* ``qkv``  QKV projection output, B*T*(q_width + 2*kv_dim) (llama: the q, k and v outputs; q_width is d
  unless ``model.d_head`` sets the heads apart, as Qwen3's);
* ``fc1``  first MLP matmul output, B*T*ff (llama: gate and up outputs, 2*B*T*ff).

Keeping a class saves its matmul's recomputation (2*B*T*in*out FLOPs). The stage input
``checkpoint`` (B*T*d) is always kept; its tier and its dtype are chosen. A block whose four classes
are kept in one tier is kept whole: everything autograd saves goes to that tier
(``fuyou.engine.budget.saved_block_bytes``: more than the four classes) and nothing is recomputed;
its input stays on the compute device with its graph, whatever its checkpoint tier. Tiers: ``gpu`` (the compute
device's memory), ``cpu``, ``ssd``; a class not kept is ``recompute``. Activations are stored in the
compute dtype (2 bytes); the checkpoint in fp32 (exact) or, with ``checkpoint_dtype=bf16``, in 2 bytes
(not fp16: the residual stream outgrows its range).

Note: [Checkpoint dtype] A checkpoint stored in bf16 is the block's input *rounded*, and the
block computes from the rounded value in forward as in its recomputation: forward, recomputation and
backward are one function, so the gradients are exact for the model with a rounding at that block's
input (the gradient passes the rounding unchanged, as a straight-through estimator). The residual stream
between blocks stays fp32 otherwise. This is Megatron-LM's bf16 residual stream
(``fp32_residual_connection=False``, its default), applied once per block instead of at every add. The
reference trainer applies the same rounding for the same configuration (``stage_input_dtypes``), so the
fp32 equivalence tests stay ``torch.equal`` with it; its effect on training against fp32 checkpoints
is measured in tests/engine/test_checkpoint_dtype.py. ``offload.checkpoint_dtype`` sets it for blocks
the policy leaves open (``fp32``; ``compute``: the compute dtype; ``auto``: fp32 unless the planner
chose otherwise); ``fuyou plan`` decides it per block with ``auto`` (``fuyou.planner.search``).

The JSON form (what ``fuyou plan --json`` emits and the engine reads)::

    {"blocks": {"0": {"checkpoint": "gpu", "fc2": "cpu", "proj": "recompute", ...}, ...},
     "cache_weights_stages": 12, "prefetch_depth": 2}

The human form (``fuyou train --act-policy``): ``recompute`` or ``RULE[;RULE...]`` with
``RULE = [A-B:]CLASSES=TIER``, e.g. ``fc2,proj=ssd``, ``30-39:all=gpu``, ``fc2=cpu;0-3:checkpoint=gpu``,
or ``[A-B:]checkpoint_dtype=fp32|bf16``.
Rules apply in order, later ones overriding earlier ones; blocks no rule names keep everything
recomputed and their checkpoint on the GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fuyou.errors import ConfigError
from fuyou.models.stages import ACT_CLASSES

CLASSES = ACT_CLASSES  # defined beside the block code that produces them
TIERS = ("gpu", "cpu", "ssd")
Tier = Literal["gpu", "cpu", "ssd"]
Place = Literal["recompute", "gpu", "cpu", "ssd"]
CkptDtype = Literal["fp32", "bf16"]
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


class BlockPolicy(BaseModel):
    """Where one block's activations live."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Tier = Field("gpu", description="Tier of the block's input checkpoint (always kept).")
    checkpoint_dtype: CkptDtype | None = Field(
        None, description="dtype the checkpoint is stored in (16 bits: the block's input rounded, Note: [Checkpoint "
        "dtype]); None: offload.checkpoint_dtype decides.")
    fc2: Place = Field("recompute", description="Second MLP matmul output: tier, or recompute.")
    proj: Place = Field("recompute", description="Attention output projection: tier, or recompute.")
    qkv: Place = Field("recompute", description="QKV projection output: tier, or recompute.")
    fc1: Place = Field("recompute", description="First MLP matmul output(s): tier, or recompute.")

    def kept(self) -> dict[str, str]:
        """Classes kept (not recomputed), by tier, checkpoint included."""
        out = {"checkpoint": self.checkpoint}
        out.update({c: getattr(self, c) for c in CLASSES if getattr(self, c) != "recompute"})
        return out


class ActivationPolicy(BaseModel):
    """The planner's decision for a whole model (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    blocks: dict[int, BlockPolicy] = Field(default_factory=dict, description="Policy per block index (0-based).")
    cache_weights_stages: int = Field(0, ge=0, description="Stages whose compute weights are cached in CPU memory.")
    prefetch_depth: int = Field(2, ge=1, description="Stages whose weights (and activations) are fetched ahead.")
    resident_mem: int | None = Field(
        None, ge=0, description="CPU memory for resident optimizer state the plan chose (offload.resident_mem); "
        "None: whatever the budget leaves.")
    act_cpu_mem: int | None = Field(
        None, ge=0, description="CPU memory for the cpu activation tier the plan chose (offload.act_cpu_mem); "
        "None: the engine's default share.")

    @field_validator("blocks", mode="before")
    @classmethod
    def _keys(cls, v):
        if isinstance(v, dict):
            for k in v:
                if not str(k).lstrip("-").isdigit() or int(k) < 0:
                    raise ValueError(f"block keys are block indices 0, 1, 2, ...; got {k!r}")
        return v

    def block(self, i: int) -> BlockPolicy:
        return self.blocks.get(i) or BlockPolicy()

    @classmethod
    def recompute_all(cls, n_layer: int, checkpoint: str = "gpu", **kw) -> "ActivationPolicy":
        return cls(blocks={i: BlockPolicy(checkpoint=checkpoint) for i in range(n_layer)}, **kw)

    def check_layers(self, n_layer: int) -> None:
        bad = [i for i in self.blocks if i >= n_layer]
        if bad:
            raise ConfigError(f"the activation policy names block {max(bad)} but the model has {n_layer} blocks "
                              f"(0-{n_layer - 1})")

    def describe(self, n_layer: int) -> str:
        """The human form (rules ``parse_act_policy`` reads back to the same blocks), runs of equal
        blocks merged: for example ``0-11:fc2,proj,qkv,fc1=gpu;12-23:fc2,proj=gpu``."""
        rules, i = [], 0
        while i < n_layer:
            b, j = self.block(i), i
            while j + 1 < n_layer and self.block(j + 1) == b:
                j += 1
            by_tier: dict[str, list[str]] = {}
            for c in ("checkpoint", *CLASSES):
                tier = getattr(b, c)
                if tier != ("gpu" if c == "checkpoint" else "recompute"):
                    by_tier.setdefault(tier, []).append(c)
            rng = "" if (i, j) == (0, n_layer - 1) else (f"{i}:" if i == j else f"{i}-{j}:")
            rules += [f"{rng}{','.join(cs)}={t}" for t, cs in by_tier.items()]
            if b.checkpoint_dtype is not None:
                rules.append(f"{rng}checkpoint_dtype={b.checkpoint_dtype}")
            i = j + 1
        return ";".join(rules) or "recompute"

    def to_json(self) -> str:
        return json.dumps({"blocks": {str(i): b.model_dump() for i, b in sorted(self.blocks.items())},
                           "cache_weights_stages": self.cache_weights_stages, "prefetch_depth": self.prefetch_depth})

    @classmethod
    def from_json(cls, text: str | dict) -> "ActivationPolicy":
        try:
            raw = json.loads(text) if isinstance(text, str) else text
            if isinstance(raw, dict) and isinstance(raw.get("policy"), dict):  # a whole `fuyou plan --json` report
                raw = raw["policy"]
            return cls.model_validate(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"the activation policy is not valid JSON: {e}") from None
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg'].removeprefix('Value error, ')}"
                             for x in e.errors())
            raise ConfigError(f"invalid activation policy ({msgs}); classes are checkpoint (gpu|cpu|ssd) and "
                              f"{', '.join(CLASSES)} (recompute|gpu|cpu|ssd), checkpoint_dtype fp32|bf16") from None


_HELP = ("write 'recompute' or RULE[;RULE...] with RULE = [A-B:]CLASSES=TIER, CLASSES a comma list of "
         f"checkpoint, {', '.join(CLASSES)} or all, TIER one of recompute, gpu, cpu, ssd "
         "(checkpoint: gpu, cpu or ssd), or [A-B:]checkpoint_dtype=fp32|bf16; for example 'fc2,proj=ssd' or "
         "'30-39:all=gpu;0-3:checkpoint=cpu;checkpoint_dtype=bf16'")


def parse_act_policy(text: str, n_layer: int, **kw) -> ActivationPolicy:
    """Parse the human form (module docstring) for a model of ``n_layer`` blocks."""
    blocks = {i: BlockPolicy().model_dump() for i in range(n_layer)}
    text = text.strip()
    if text == "recompute":
        return ActivationPolicy(blocks={i: BlockPolicy(**b) for i, b in blocks.items()}, **kw)
    if not text.replace(";", "").strip():  # (' ; ;' trained as recompute in silence: a pass)
        raise ConfigError(f"empty activation policy {text!r}; {_HELP}")
    for rule in filter(None, (r.strip() for r in text.split(";"))):
        rng, _, body = rule.rpartition(":")
        lhs, eq, tier = body.partition("=")
        tier = tier.strip()
        is_dtype = lhs.strip() == "checkpoint_dtype"
        if is_dtype and tier not in DTYPE_BYTES:
            raise ConfigError(f"rule {rule!r}: checkpoint_dtype is fp32 or bf16; {_HELP}")
        if not eq or (not is_dtype and (not lhs.strip() or tier not in ("recompute", *TIERS))):
            raise ConfigError(f"cannot read rule {rule!r}; {_HELP}")
        lo, hi = 0, n_layer - 1
        if rng:
            a, dash, b = rng.partition("-")
            try:
                lo, hi = (int(a), int(b)) if dash else (int(a), int(a))
            except ValueError:
                raise ConfigError(f"block range {rng!r} in rule {rule!r} is not A-B or A; {_HELP}") from None
            if lo > hi:
                raise ConfigError(f"block range {rng!r} in rule {rule!r} runs backwards; write it {hi}-{lo}")
            if not 0 <= lo <= hi < n_layer:
                raise ConfigError(f"block range {rng!r} in rule {rule!r} is outside 0-{n_layer - 1} "
                                  f"(the model has {n_layer} blocks)")
        if is_dtype:
            for i in range(lo, hi + 1):
                blocks[i]["checkpoint_dtype"] = tier
            continue
        names = [c.strip() for c in lhs.split(",")]
        classes: list[str] = []
        for c in names:
            if c == "all":
                classes += ["checkpoint", *CLASSES] if tier != "recompute" else list(CLASSES)
            elif c in ("checkpoint", *CLASSES):
                classes.append(c)
            else:
                raise ConfigError(f"unknown activation class {c!r} in rule {rule!r}; {_HELP}")
        if "checkpoint" in classes and tier == "recompute":
            raise ConfigError(f"rule {rule!r}: the checkpoint is always kept (tier gpu, cpu or ssd); {_HELP}")
        for i in range(lo, hi + 1):
            for c in classes:
                blocks[i][c] = tier
    return ActivationPolicy(blocks={i: BlockPolicy(**b) for i, b in blocks.items()}, **kw)


@dataclass
class KeepPolicy:
    """The engine's form of one block's policy (``fuyou.engine.recompute``): the checkpoint's tier, the
    kept classes by tier, or ``all``: the whole graph kept in one tier."""

    checkpoint: str = "gpu"
    classes: dict[str, str] = field(default_factory=dict)   # class -> tier, only kept classes
    all: str | None = None                                    # keep the whole graph in this tier
    checkpoint_dtype: str = "fp32"                            # fp32, or bf16: the input rounded

    @property
    def checkpoint_bytes(self) -> int:
        """Bytes per element of the stored checkpoint."""
        return DTYPE_BYTES[self.checkpoint_dtype]

    @property
    def recomputes(self) -> bool:
        return self.all is None


def default_checkpoint_dtype(setting: str, precision: str) -> str:
    """The checkpoint dtype of blocks the policy leaves open: ``offload.checkpoint_dtype`` (``fp32``,
    ``compute``: the compute dtype, ``auto``: fp32 unless a plan chose) under ``train.precision``."""
    return precision if setting == "compute" else "fp32"


def keep_policies(spec: str, n_layer: int, default_dtype: str = "fp32") -> dict[int, KeepPolicy]:
    """Engine policies from ``--act-policy`` (the planner's human form, or a JSON file path). A block
    whose four classes are all kept in one tier is kept whole (no recomputation at all).
    ``default_dtype``: the checkpoint dtype of blocks the policy does not set (``default_checkpoint_dtype``)."""
    return to_keep(read_act_policy(spec, n_layer), n_layer, default_dtype)


def read_act_policy(spec: str, n_layer: int, **kw) -> ActivationPolicy:
    """``--act-policy``: a JSON file (a policy, or a whole `fuyou plan --json` report) or the human form."""
    if spec.strip().endswith(".json"):
        p = Path(spec.strip()).expanduser()
        if not p.is_file():
            raise ConfigError(f"activation policy file {spec} does not exist; give the file `fuyou plan --json` "
                              f"wrote, or a policy such as 'fc2,proj=ssd'")
        pol = ActivationPolicy.from_json(p.read_text())
        pol.check_layers(n_layer)
        return pol.model_copy(update=kw) if kw else pol
    return parse_act_policy(spec, n_layer, **kw)


PLANNED = ("prefetch_depth", "resident_mem", "act_cpu_mem")  # what a plan's policy sets besides the blocks


def _policy_file(spec: str):
    """The parsed JSON of a policy file (a policy, or a whole `fuyou plan --json` report); None for the human
    form or a file that cannot be read (read_act_policy says what is wrong with it)."""
    if not spec.strip().endswith(".json"):
        return None
    try:
        return json.loads(Path(spec.strip()).expanduser().read_text())
    except (OSError, ValueError):
        return None


def planned_settings(spec: str) -> dict:
    """The offload settings (``PLANNED``) a JSON policy file names besides its blocks (`fuyou plan --json`
    writes them: the plan's memory holds at them), and the CPU budget it was planned for (``cpu_mem``, a
    whole report's); {} for the human form or a file that names none. Values as written (unvalidated)."""
    raw = _policy_file(spec)
    given = raw.get("cpu_given_bytes") if isinstance(raw, dict) else None  # (a whole report: the budget planned)
    if isinstance(raw, dict) and isinstance(raw.get("policy"), dict):
        raw = raw["policy"]
    out = {k: raw[k] for k in PLANNED if isinstance(raw, dict) and raw.get(k) is not None}
    return {**out, "cpu_mem": given} if given is not None else out


PLANNED_WORKLOAD = ("model", "batch", "seq", "grad_accum", "model_shape", "optim", "lora", "gpus",
                    "grad_clip")  # a plan report's workload


def planned_workload(spec: str) -> dict:
    """What a `fuyou plan --json` report given as the policy file was planned for (``PLANNED_WORKLOAD``, as
    written); {} for a policy file alone or anything unreadable."""
    raw = _policy_file(spec)
    if not isinstance(raw, dict) or not isinstance(raw.get("policy"), dict):
        return {}
    return {k: raw[k] for k in PLANNED_WORKLOAD if k in raw}


def to_keep(pol: ActivationPolicy, n_layer: int, default_dtype: str = "fp32") -> dict[int, KeepPolicy]:
    """The engine's per-block policies for an ``ActivationPolicy`` (see ``keep_policies``)."""
    out = {}
    for i in range(n_layer):
        b = pol.block(i)
        kept = {c: getattr(b, c) for c in CLASSES if getattr(b, c) != "recompute"}
        tiers = set(kept.values())
        dtype = b.checkpoint_dtype or default_dtype
        if len(kept) == len(CLASSES) and len(tiers) == 1:  # its input stays on the device with its graph
            out[i] = KeepPolicy(checkpoint="gpu", all=tiers.pop(), checkpoint_dtype=dtype)
        else:
            out[i] = KeepPolicy(checkpoint=b.checkpoint, classes=kept, checkpoint_dtype=dtype)
    return out


def stage_input_dtypes(cfg) -> dict[int, str]:
    """Blocks whose input is rounded (Note: [Checkpoint dtype]) -> the dtype, for a run's config: what
    the engine does, and the reference trainer follows."""
    pol = keep_policies(cfg.offload.act_policy, cfg.model.n_layer,
                        default_checkpoint_dtype(cfg.offload.checkpoint_dtype, cfg.train.precision))
    return {i: k.checkpoint_dtype for i, k in pol.items() if k.checkpoint_dtype != "fp32"}
