"""Per-stage costs of one step, from the model's shapes alone (nothing is allocated).

For each stage: FLOPs of its forward, of each activation class's matmul (what keeping the class
saves in recomputation), of its recompute + backward; and the bytes it moves: compute weights (read
from SSD unless cached, host->device at every use), gradients (device->host), optimizer state (12 B
per parameter in fp32, ``StateFormat`` bytes when compressed, read and written, plus the compute copy written when not cached) and activations by
tier. FLOP conventions match ``StageModel.flops_per_token``: a matmul of an (N, i) input with an (i, o)
weight is 2*N*i*o; attention's score and value matmuls are 4*N*T*d forward with the causal half
counted; backward is twice forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fuyou.engine.budget import (class_parts, class_widths, device_working_bytes, handoff_slots,
                                 largest_saved_tensor, master_from_memory, saved_block_bytes, stage_ssd_bytes,
                                 stage_uses)
from fuyou.engine.config import OffloadConfig
from fuyou.models import ModelConfig, StageModel
from fuyou.models.lora import LoRAConfig, attach
from fuyou.models.quant import packed_bytes
from fuyou.optim.compressed import StateFormat
from fuyou.policy import DTYPE_BYTES, ActivationPolicy, BlockPolicy, default_checkpoint_dtype, to_keep
from fuyou.store import StoreConfig


@dataclass
class Workload:
    """What is trained and how: the model, the batch and the engine settings the step depends on."""

    model: ModelConfig
    batch: int
    seq: int
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    grad_accum: int = 1       # micro-batches per step, run layer-major (the engine's schedule)
    csize: int = 2            # compute dtype bytes (bf16)
    store: StoreConfig = field(default_factory=StoreConfig)
    grad_clip: float | None = 1.0  # exact clipping (speculative updates, gradients saved to SSD) or None
    fmt: StateFormat = field(default_factory=StateFormat)  # how the optimizer state is stored
    lora: LoRAConfig | None = None  # LoRA: a read-only base, adapters and their AdamW on the device
    ranks: int = 1            # data parallel (fuyou/distributed.py): GPUs of one machine sharing the step
    packed: bool = False      # rows may pack several examples (``DataConfig.may_pack``): attention takes a mask
    cuda: bool = True         # the compute device is a GPU (its attention kernels save what the CPU's do not)
    depths: tuple[int, ...] = (1, 2, 3)  # the prefetch depths the search tries (offload.prefetch_depth given: it)

    def __post_init__(self):
        self.stage_model = StageModel(self.model)
        self.numels = [s.num_params for s in self.stage_model.stages]
        attach(self.stage_model, self.lora or LoRAConfig())
        # LoRA (fuyou.engine.lora_state): the adapters' parameters; None: full fine-tuning
        self.lora_params = (sum(p.numel for st in self.stage_model.stages for p in st.adapters.values())
                            if self.lora is not None and self.lora.enabled else None)
        self.tied = bool(self.stage_model.stages[-1].shared)
        # each stage's compute weights as stored and streamed: LoRA's int8/NF4 base packs its blocks (models/quant.py)
        packed = self.lora.base if self.lora_params is not None and self.lora.base != "compute" else None
        self.weight_bytes = [packed_bytes(s, self.csize, packed) if packed else self.csize * s.num_params
                             for s in self.stage_model.stages]
        self.dequant_bytes = self.csize * max(self.numels[1:-1] or [0]) if packed else 0
        self.gsize = 4 if self.grad_accum > 1 else self.csize
        self.chunk = self.fmt.chunk_elements(self.offload.optimizer_chunk, self.store.checksum_block)
        # what a block kept whole (its four classes in one tier) saves, one micro-batch: the engine's figure
        self.whole = saved_block_bytes(self.model, self.batch, self.seq, self.csize, self.lora, self.packed, self.cuda)
        self.largest_saved = largest_saved_tensor(self.model, self.batch, self.seq, self.csize, self.packed, self.cuda)
        if self.ranks < 1 or self.grad_accum % self.ranks:
            raise ValueError(f"{self.grad_accum} micro-batches do not divide among {self.ranks} ranks")
        # data parallel with full fine-tuning: each stage's optimizer state on one rank (the engine's rule)
        from fuyou.distributed import stage_owners

        self.owners = stage_owners(self.numels, self.ranks) if self.sharded else [0] * len(self.numels)

    @property
    def micro(self) -> int:
        """Micro-batches each rank runs per step (``grad_accum`` is the global batch's)."""
        return self.grad_accum // self.ranks

    @property
    def sharded(self) -> bool:
        return self.ranks > 1 and self.lora_params is None

    @classmethod
    def from_config(cls, cfg) -> "Workload":
        """The workload of a ``FuyouConfig`` (for predicting what ``fuyou train`` will do)."""
        return cls(cfg.model, cfg.train.micro_batch_size, cfg.data.seq_len, cfg.offload, cfg.train.grad_accum,
                   2 if cfg.train.precision == "bf16" else 4,
                   cfg.offload.store_config(),
                   cfg.train.grad_clip, StateFormat.of(cfg.optim), cfg.lora, packed=cfg.data.may_pack,
                   cuda=cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()))

    @property
    def master_is_weights(self) -> bool:
        """A master in the compute dtype is the compute weights: stages neither cached nor resident
        store no separate copy (the engine reads the master). LoRA's base has no master."""
        return self.lora_params is None and self.fmt.master_is_compute(torch.bfloat16 if self.csize == 2 else
                                                                          torch.float32)

    @property
    def handoff(self) -> int:
        """Streamed stages' weights kept for their update (``budget.handoff_slots``)."""
        return handoff_slots(self.offload, self.master_is_weights, self.ranks > 1)

    def master_from_memory(self, i: int, resident, cached, handoff: bool) -> bool:
        """Stage ``i``'s update takes its master from memory, not the SSD (``budget.master_from_memory``)."""
        return master_from_memory(self.master_is_weights, i in resident, i in cached, handoff)

    @property
    def state_bpp(self) -> float:
        """Bytes of optimizer state per parameter (``StateFormat``: 12 in fp32)."""
        return self.fmt.bytes_per_param()

    @property
    def tokens(self) -> int:
        return self.batch * self.seq * self.grad_accum

    @property
    def checkpoint_default(self) -> str:
        """The checkpoint dtype of blocks a policy leaves open (``offload.checkpoint_dtype``)."""
        return default_checkpoint_dtype(self.offload.checkpoint_dtype, "bf16" if self.csize == 2 else "fp32")

    def checkpoint_bytes(self, cost: "StageCost", block: BlockPolicy) -> int:
        """One micro-batch's checkpoint of a block stage under its policy (``act_bytes`` count fp32)."""
        return cost.act_bytes["checkpoint"] * DTYPE_BYTES[block.checkpoint_dtype or self.checkpoint_default] // 4

    @property
    def model_flops(self) -> float:
        """Model FLOPs of one optimizer step (no recomputation), for TFLOPS and MFU."""
        return self.stage_model.flops_per_token(self.seq, frozen=self.lora_params is not None) * self.tokens


@dataclass
class StageCost:
    """FLOPs and bytes of one stage for one micro-batch (see the module docstring)."""

    name: str
    index: int
    kind: str                     # "embed", "block", "head"
    numel: int
    fwd_flops: float
    class_flops: dict[str, float]  # matmul FLOPs per activation class (recompute saved by keeping it)
    act_bytes: dict[str, int]      # bytes per activation class, "checkpoint" included

    def recompute_flops(self, kept: set[str]) -> float:
        """``kept``: the classes kept, or {"all"} for a block kept whole (nothing recomputed)."""
        if "all" in kept:
            return 0.0
        return self.fwd_flops - sum(f for c, f in self.class_flops.items() if c in kept)

    def backward_flops(self, kept: set[str], frozen: bool = False) -> float:
        """The engine's backward task: recompute (less what is kept) plus backward (2x forward: the
        gradients of the input and of the weights; ``frozen`` (LoRA's base): the input's only, 1x, for
        the base's matmuls; attention's and the adapters' (``adapter_flops``) stay 2x: attention has no
        weight, the adapters train)."""
        if self.kind == "head":
            return (2 if frozen else 3) * self.fwd_flops
        if not frozen:
            return self.recompute_flops(kept) + 2 * self.fwd_flops
        base = sum(self.class_flops.values())
        return self.recompute_flops(kept) + base + 2 * (self.fwd_flops - base)


def stage_costs(w: Workload) -> list[StageCost]:
    cfg, B, T = w.model, w.batch, w.seq
    N, d, ff = B * T, cfg.d_model, cfg.ff_dim
    qw, kv = cfg.q_width, cfg.kv_heads * cfg.head_dim  # query and key/value features (qw: d unless d_head)
    out = []
    for s, numel in zip(w.stage_model.stages, w.numels):
        if s.name == "embed":
            out.append(StageCost(s.name, s.index, "embed", numel, 0.0, {}, {"checkpoint": 0}))
        elif s.name == "head":
            out.append(StageCost(s.name, s.index, "head", numel, 2.0 * N * d * cfg.vocab_size, {},
                                 {"checkpoint": 4 * N * d}))
        else:
            fc1_mult = 2 if cfg.family == "llama" else 1
            flops = {"fc2": 2.0 * N * ff * d, "proj": 2.0 * N * qw * d, "qkv": 2.0 * N * d * (qw + 2 * kv),
                     "fc1": 2.0 * N * d * ff * fc1_mult}
            nbytes = {"checkpoint": 4 * N * d, **{c: w.csize * N * n for c, n in class_widths(cfg).items()}}
            attn = 4.0 * N * T * qw
            # LoRA: each adapter's two thin matmuls, B(A x): 2 N r (in + out)
            adapters = sum(2.0 * N * p.numel for p in s.adapters.values())
            out.append(StageCost(s.name, s.index, "block", numel, sum(flops.values()) + attn + adapters, flops, nbytes))
    return out


def gpu_working_bytes(w: Workload) -> int:
    """Device working memory of the largest stage's recompute + backward on a GPU (``budget.device_working_bytes``)."""
    return device_working_bytes(w.model, w.batch, w.seq, w.csize, max(w.numels), w.micro,
                                frozen=w.lora_params is not None, packed=w.packed)


def forward_keeps(w: Workload, c: StageCost, b: BlockPolicy, keep=None) -> list[tuple[str, str, int]]:
    """What a block stage keeps from its forward, as the engine keeps it (``fuyou.policy.to_keep``: ``keep``,
    its ``KeepPolicy`` when known): (what, tier, bytes) for its checkpoint and each kept class, or for a
    block kept whole (its four classes in one tier) everything autograd saves (``Workload.whole``, what
    "all") with its input on the device."""
    if keep is None:
        keep = to_keep(ActivationPolicy(blocks={0: b}), 1, w.checkpoint_default)[0]
    if keep.all is not None:
        return [("checkpoint", "gpu", c.act_bytes["checkpoint"]), ("all", keep.all, w.whole)]
    kept = [(cls, getattr(b, cls), c.act_bytes[cls]) for cls in FORWARD_ORDER if getattr(b, cls) != "recompute"]
    return [("checkpoint", b.checkpoint, w.checkpoint_bytes(c, b))] + kept


FORWARD_ORDER = ("qkv", "proj", "fc1", "fc2")  # the classes in the order a block's forward produces them
# on CUDA the cpu tier's share rounds each tensor to 4 KiB: a block kept whole (some twenty saved tensors) loses up
# to this much of it to the rounding (``kept_in_forward``)
WHOLE_PAGES = 32 * 4096


def kept_in_forward(w: Workload, costs: list[StageCost], policy: ActivationPolicy, share: int | None,
                    cuda: bool = True) -> dict[tuple[int, int], list[tuple[str, str, int]]]:
    """What each block stage keeps in each micro-batch's forward (``forward_keeps``), by (stage index,
    micro-batch), with the cpu tier's overflow: as the engine's swapper does, in the order of the
    forward pass (layer-major), a tensor the cpu tier's ``share`` no longer has room for goes to the
    SSD (on CUDA the share's pinned buffers round each to 4 KiB), and a later, smaller one may still fit.
    A class is placed by its tensors (``class_parts``: Llama's q, k and v apart), and an item split
    between the tiers is two entries, its cpu part first. A block kept whole reaches the swapper as its many
    tensors, which are not listed here: where the share cannot take all of it, the share is taken to be
    full but for its largest tensor (``Workload.largest_saved``: the swapper's leftover is no larger), the
    rest on the SSD, and nothing after it in the cpu tier (an overstatement of at most that tensor; as one
    item, a whole block overflowed, 31 % over the engine's spill in a hostile pass). ``share``: the plan's
    ``activations (cpu tier share)``; None: unbounded."""
    used, out = 0, {}
    keep = to_keep(policy, w.model.n_layer, w.checkpoint_default)
    widths = class_parts(w.model)
    for c in costs:
        if c.kind != "block":
            continue
        keeps = forward_keeps(w, c, policy.block(c.index - 1), keep[c.index - 1])
        bounded = share is not None and any(tier == "cpu" for _, tier, _ in keeps)
        for mb in range(w.micro):
            if not bounded:
                out[(c.index, mb)] = keeps
                continue
            items = []
            for what, tier, nbytes in keeps:
                if tier != "cpu":
                    items.append((what, tier, nbytes))
                    continue
                parts = [nbytes]
                if what in widths and len(widths[what]) > 1:
                    per = nbytes // sum(widths[what])  # bytes a feature: csize x tokens
                    parts = [per * x for x in widths[what]]
                kept = spilled = 0
                for part in parts:
                    size = -(-part // 4096) * 4096 if cuda else part
                    if used + size <= share:
                        used += size
                        kept += part
                    elif what == "all":  # (its tensors: all but the largest's room of the share taken, at least)
                        kept = max(0, min(part, share - used - w.largest_saved - (WHOLE_PAGES if cuda else 0)))
                        spilled, used = part - kept, share
                    else:
                        spilled += part
                items += [(what, t, b) for t, b in (("cpu", kept), ("ssd", spilled)) if b]
            out[(c.index, mb)] = items
    return out


def placement_bytes(w: Workload, costs: list[StageCost], policy: ActivationPolicy, share: int | None = None,
                    cuda: bool = True) -> dict[str, int]:
    """Bytes of activations each tier holds at the peak on one rank (end of forward, every micro-batch's),
    checkpoints separately, the cpu tier's overflow (``share``, ``kept_in_forward``) on the SSD."""
    out = {"ckpt_gpu": 0, "ckpt_cpu": 0, "ckpt_ssd": 0, "gpu": 0, "cpu": 0, "ssd": 0}
    for items in kept_in_forward(w, costs, policy, share, cuda).values():
        for what, tier, nbytes in items:
            out[("ckpt_" if what == "checkpoint" else "") + tier] += nbytes
    return out


def step_bytes(w: Workload, cached: set[int], resident: set[int] | frozenset = frozenset(),
               handoff: bool = False) -> dict[str, int]:
    """Optimizer and weight bytes of one step (activations excluded): SSD read/write, H2D, D2H; the
    same whatever the number of micro-batches (layer-major: each stage is loaded and updated once).
    A ``resident`` stage's optimizer state is read from CPU memory (and written to SSD only by a
    commit, not counted here); exact clipping saves the gradients of the other stages to SSD (a
    triggered step's redo is not counted). A master that is the compute weights is not read by its update
    where it is cached or (``handoff``, ``MemoryPlan.handoff``) backward's copy is handed over (engine.py,
    Note: [Master in memory])."""
    reads = writes = h2d = d2h = 0
    for i, n in enumerate(w.numels):
        uses = stage_uses(i, len(w.numels), w.tied)
        if w.lora_params is not None:  # LoRA: the base (as stored, packed if quantised) is only read; nothing is
            h2d += uses * w.weight_bytes[i]  # written or leaves the device
            reads += 0 if i in cached else uses * w.weight_bytes[i]
            continue
        h2d += uses * n * w.csize
        r, wr = stage_ssd_bytes(n, w.weight_bytes[i], uses, w.fmt, w.csize, w.gsize, w.grad_clip is not None,
                                i in cached, i in resident, w.master_is_weights, handoff)
        reads, writes = reads + r, writes + wr
        d2h += n * w.gsize
    return {"ssd_read": reads, "ssd_write": writes, "h2d": h2d, "d2h": d2h}

