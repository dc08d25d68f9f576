"""The engine's memory plan: what must fit in the CPU and device budgets, checked before any work.

CPU budget (``offload.cpu_mem``) covers everything the engine allocates in CPU memory:

* ``optimizer buffers``: the out-of-core AdamW's chunk buffers (``OutOfCoreAdamW.max_buffer_bytes``);
* ``weight buffers``: ``prefetch_depth + 1`` stages' compute weights read from SSD (stages not cached), and
  where the master is the compute weights ``handoff_slots`` more: backward's, kept for their update
  (engine.py, Note: [Master in memory]);
* ``gradients in flight``: ``max_pending + 2`` stages' flattened gradients on their way to the optimizer
  (pool buffers, each rounded up to 4 KiB);
* on a CPU compute device, what a GPU would otherwise hold: stage-input checkpoints, the working
  memory of one stage's recompute and backward (an estimate: 4 bytes x batch x seq x (16 d + 4 ff)
  plus attention scores and, for the head, the loss's logits slices), the stage inputs of every
  micro-batch between stages and the tied embedding's pending gradient;
* ``I/O bounce buffers`` of the store's threads, and a fixed ``allocator and thread slack``
  (``RUNTIME_SLACK``, measured);
* ``weight cache``: whatever is left, filled with stages' compute weights in forward order;
* ``resident optimizer state``: what the cache leaves, filled with stages' master weights and Adam
  moments (12 B per parameter in fp32, less when compressed: fuyou/optim/compressed.py; with exact
  clipping also the gradient that waits there for the global norm, 2-4 B) in the order 0, 1, 2, ...
  -- the stages whose updates come last in backward, just before the next step's forward needs them
  (``offload.resident_mem`` caps it).

Not counted: the *fixed overhead* of the process before the engine starts (interpreter, torch and
its libraries, the token arrays), measured as resident memory at engine start and reported. The
promise is: peak resident memory <= fixed overhead + ``cpu_mem``.

``plan_memory`` computes the plan from shapes and settings alone; the engine (``Engine._memory_plan``)
and the planner (``fuyou.planner.search``) both call it, so "does it fit?" has one answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fuyou.errors import BudgetError
from fuyou.units import format_size, unitless_hint

# Memory the itemised plan does not see: allocator fragmentation, per-thread arenas and buffers of
# the loader, optimizer and I/O threads. Measured on tests/engine/test_budget_and_errors.py's model:
# the peak exceeded the itemised plan by at most 24 MiB with a 256 KiB mmap threshold, and by up to
# 47 MiB since activation-sized temporaries come from the heap (engine.bound_malloc: 20-30 % faster
# compute on the CPU); 64 MiB keeps the promise with room.
RUNTIME_SLACK = 64 * 1024**2

LEAVING = 2
"""Outgoing activations whose device copies may still be pending (``swapper``'s Note: [Activation
stream hand-off]): the swapper waits for the oldest beyond that."""

D2H_DEPTH = 1
"""Flattened stage gradients on the device at once: before the next stage's is allocated, the main
thread waits for the previous one's copy to the host (``Engine._bound_leaving``). That copy ran during
the whole backward of the next stage, far longer than it takes, so the wait is normally nil."""

DEVICE_SLACK = 256 * 1024**2
DEVICE_SLACK_FRACTION = 0.02
"""The caching allocator's rounding and fragmentation beyond the itemised device plan: ``DEVICE_SLACK``
plus this fraction of the items; an estimate until ``tools/gpu_check.sh`` measures
``max_memory_allocated`` against the plan."""


@dataclass
class MemoryPlan:
    cpu_budget: int
    cpu_items: dict[str, int] = field(default_factory=dict)
    device_budget: int | None = None
    device_items: dict[str, int] = field(default_factory=dict)
    cached_stages: list[int] = field(default_factory=list)
    cache_bytes: int = 0
    resident_stages: list[int] = field(default_factory=list)
    resident_bytes: int = 0   # their state, the gradients they hold for the norm and their spare copies
    spare_stages: list[int] = field(default_factory=list)  # resident stages with a spare copy (``plan_memory``)
    cache_share: int = 1   # ranks that map one weight cache; cache_bytes is this rank's share of it
    local_ranks: int = 1   # ranks that share offload.cpu_mem (data parallel: cpu_budget is this rank's share)
    resident_elsewhere: list[int] = field(default_factory=list)  # the planner: stages resident on other ranks
    spare_elsewhere: list[int] = field(default_factory=list)     # ... and those of them with a spare copy
    act_share_cap: int | None = None  # the cpu tier's share is the default quarter of the budget, up to this
    first_cached_delta: int = 0  # with nothing cached: what caching the first stage changes (cache + buffers)
    handoff: int = 0  # streamed stages' weights kept for their update (``handoff_slots``); 0: none is

    @property
    def resident_all(self) -> list[int]:
        """Every stage whose optimizer state is in CPU memory: this rank's and (data parallel) its owner's."""
        return sorted(self.resident_stages + self.resident_elsewhere)

    @property
    def spare_all(self) -> list[int]:
        """Every resident stage with a spare copy of its state (``spare_stages``), on any rank."""
        return sorted(self.spare_stages + self.spare_elsewhere)

    @property
    def cpu_required(self) -> int:
        return sum(self.cpu_items.values())

    @property
    def cpu_minimum(self) -> int:
        """The least budget under which this plan's items fit. ``cpu_required`` at this budget, except
        that a default share of the cpu tier is a quarter of the budget (``act_cpu_share``): at a smaller
        budget it is smaller, so the least budget M solves ``other + min(M // 4, cap) <= M``. And where
        nothing is cached, caching the first stage (the embedding, often the largest) can need less than
        streaming it, whose weight buffers are sized for it (``first_cached_delta`` < 0): the lesser of the two
        (the cache takes the first stages first: at that budget it takes the embedding)."""
        other = self.cpu_required - self.cpu_items.get(ACT_SHARE, 0)
        least = self._least(other)
        if not self.cached_stages and self.first_cached_delta < 0:
            least = min(least, self._least(other + self.first_cached_delta))
        return least

    def _least(self, other: int) -> int:
        if self.act_share_cap is None:
            return other + self.cpu_items.get(ACT_SHARE, 0)
        cap = self.act_share_cap
        return other + cap if 3 * cap <= other else -(-4 * other // 3) + 3

    @property
    def device_required(self) -> int:
        return sum(self.device_items.values())

    def check(self) -> None:
        if self.cpu_required > self.cpu_budget:
            n = self.local_ranks
            share = (f" (this rank's 1/{n} of offload.cpu_mem, which the {n} ranks of this machine share)"
                     if n > 1 else "")
            least = format_size(self.cpu_minimum, up=True)
            need = format_size(self.cpu_required, up=True)
            # (the items at this budget: a share that grows with the budget made "the minimum" read one figure
            # and the advice a larger one, a pass)
            what = (f"the engine's minimum of {need}" if self.cpu_required == self.cpu_minimum else
                    f"the {need} the engine needs at that budget")
            raise BudgetError(
                f"the CPU memory budget {format_size(self.cpu_budget)}{unitless_hint(n * self.cpu_budget)}{share} "
                f"cannot hold {what}:\n{_lines(self.cpu_items)}\nraise offload.cpu_mem "
                f"(--cpu-mem) to at least {format_size(n * self.cpu_minimum, up=True)}"
                + (f" ({n} x {least})" if n > 1 else "")
                + f", or lower {_levers(self.cpu_items, self.act_share_cap is None)}"
                + (f" (with offload.act_cpu_mem unset, the activations' CPU tier takes a quarter of the budget, up "
                   f"to the {format_size(self.act_share_cap)} the policy keeps there)" if self.act_share_cap else "")
            )
        if self.device_budget is not None and self.device_required > self.device_budget:
            raise BudgetError(
                f"the device memory budget {format_size(self.device_budget)}{unitless_hint(self.device_budget)} "
                f"cannot hold one stage's working set "
                f"of {format_size(self.device_required, up=True)}:\n{_lines(self.device_items)}\nraise offload.gpu_mem "
                f"(--gpu-mem) to at least that, or lower train.micro_batch_size, data.seq_len or offload.prefetch_depth"
            )

    def describe(self) -> str:
        out = [f"CPU budget {format_size(self.cpu_budget)}:"]
        out += [f"  {k:<26} {format_size(v):>12}" for k, v in self.cpu_items.items()]
        shared = f"; this rank's 1/{self.cache_share} of one cache the ranks share" if self.cache_share > 1 else ""
        n = len(self.cached_stages)
        out.append(f"  {'weight cache':<26} {format_size(self.cache_bytes):>12} ({n} stage{'s' * (n != 1)}{shared})")
        if self.resident_stages:
            spare = f", {len(self.spare_stages)} with a spare copy" if self.spare_stages else ""
            out.append(f"  {'resident optimizer state':<26} {format_size(self.resident_bytes):>12} "
                       f"({len(self.resident_stages)} stage{'s' * (len(self.resident_stages) != 1)}{spare})")
        if self.device_items:
            b = "unlimited" if self.device_budget is None else format_size(self.device_budget)
            out.append(f"device budget {b}:")
            out += [f"  {k:<26} {format_size(v):>12}" for k, v in self.device_items.items()]
        return "\n".join(out)


def _lines(items: dict[str, int]) -> str:
    return "\n".join(f"  {k}: {format_size(v)}" for k, v in items.items())


def activation_bytes(cfg_model, batch: int, seq: int, frozen: bool = False) -> dict[str, int]:
    """Estimated device bytes of stage inputs and of one stage's recompute+backward working set
    (``block_work``: the CPU's fp32 estimate; ``head_work``: ``head_working_bytes``)."""
    d, ff, h = cfg_model.d_model, cfg_model.ff_dim, cfg_model.n_head
    tokens = batch * seq
    checkpoint = 4 * tokens * d
    block = 4 * tokens * (16 * d + 4 * ff) + 4 * batch * h * seq * seq
    return {"checkpoint": checkpoint, "block_work": block,
            "head_work": head_working_bytes(cfg_model, batch, seq, frozen),
            "batch": 3 * 8 * tokens}  # tokens, targets, positions (int64)


def head_working_bytes(cfg_model, batch: int, seq: int, frozen: bool = False) -> int:
    """The head's forward+backward: its loss a slice of tokens at a time (``layers.linear_cross_entropy``):
    about 6 B a logit of the slice at once (the matmul's bf16 output as it becomes the fp32 logits, which
    then become the softmax in place, and its bf16 copy for the gradients' matmuls), the LM head's gradient
    (an fp32 sum, added a block of rows at a time, and its copy in the weights' dtype: 6 B per parameter)
    and the input's side (its gradient, its normed and cast copies: ~12 B per token and feature); 7 B a
    logit are charged. Calibrated against the CPU allocator's peak in bf16 (tests/engine/test_working_set.py:
    measured / estimate 0.81-0.90, a 128k vocabulary's 0.88; the weight gradient's product added whole with
    its fp32 copy was 10 B per parameter, 1.5x this at a 128k vocabulary: a pass)."""
    from fuyou.models.layers import loss_chunk_tokens

    d, v, tokens = cfg_model.d_model, cfg_model.vocab_size, batch * seq
    head_grad = 0 if frozen else 6 * v * d  # ``frozen``: LoRA's head has no weight gradient
    return 7 * min(tokens, loss_chunk_tokens(v)) * v + 12 * tokens * d + head_grad


def block_working_bytes(cfg_model, batch: int, seq: int, csize: int, stage_max: int,
                        micro_batches: int = 1, packed: bool = False) -> int:
    """Device working memory of the largest stage's recompute + backward on a GPU, for one micro-batch
    of ``batch`` sequences (an estimate; the CPU's is ``activation_bytes``, which counts fp32
    throughout and the attention scores).

    A block's autograd saves its norms' outputs, QKV, attention output, the fp32 residual and the MLP's
    two ff-wide tensors in the compute dtype (~ (9 d + 2 ff) per token, fused/flash attention: no T*T
    scores), plus the largest gradient in flight (2 ff per token). The parameter gradients autograd
    returns are the plan's "gradients leaving the device" when a step has one micro-batch (they are
    copied to the host as they are); with several, each micro-batch's are added into the stage's sum
    (that item) and are counted here. On CUDA, flash attention's backward adds its own transients
    (``attention_backward_bytes``). Measured against the caching allocator's peak on an H200 (torch
    2.11, flash attention, bf16), one micro-batch's gradients added to both: GPT 0.94, Llama 0.84;
    without the attention term the GPT block was 1.10x the estimate (2026-12-04,
    tests/engine/test_working_set.py). Against the CPU allocator's peak, the estimate less that
    CUDA-only term: 0.84-0.90. With a mask (``packed`` rows, a sliding window shorter than the sequence):
    the mask, boolean and in the compute dtype, and with grouped queries the keys and values expanded per
    query head that autograd then saves (``layers.kernel_gqa``; not measured on a GPU yet).
    """
    N = batch * seq
    d, ff = cfg_model.d_model, cfg_model.ff_dim * (2 if cfg_model.family == "llama" else 1)
    mask, kv_saved = attention_saves(cfg_model, batch, seq, csize, packed, cuda=True)
    return (csize * N * (9 * d + 4 * ff) + 4 * N * d + attention_backward_bytes(cfg_model, batch, seq, csize)
            + (stage_max * csize if micro_batches > 1 else 0) + mask * (1 + csize)
            + 2 * csize * N * (kv_saved - cfg_model.kv_heads * cfg_model.head_dim))


def attention_saves(cfg_model, batch: int, seq: int, csize: int, packed: bool, cuda: bool) -> tuple[int, int]:
    """What attention adds to a block's saved tensors, as ``layers.causal_attention`` runs: the elements of
    its mask ((B or 1) x T x T where it takes one, ``layers.masked``; GPT blocks take no sliding window),
    and the width of the keys and values autograd saves (expanded to the queries' where the kernel does not
    take grouped queries, ``layers.kernel_gqa``)."""
    import torch

    from fuyou.models.layers import kernel_gqa, masked

    window = cfg_model.sliding_window if cfg_model.family == "llama" else None
    has_mask = masked(packed, window, seq)
    kv, q = cfg_model.kv_heads * cfg_model.head_dim, cfg_model.q_width
    expand = kv < q and not kernel_gqa("cuda" if cuda else "cpu", torch.bfloat16 if csize == 2 else torch.float32,
                                       has_mask)
    return ((batch if packed else 1) * seq * seq if has_mask else 0), (q if expand else kv)


def attention_backward_bytes(cfg_model, batch: int, seq: int, csize: int) -> int:
    """CUDA flash attention's backward transients for one micro-batch: the query, key and value
    gradients in the compute dtype and the query gradient's fp32 accumulator; with grouped-query
    attention the kernel also makes key and value gradients for every query head before summing them
    per group. A GPT block measured 6.1 d bytes per token above the estimate without them (H200, torch
    2.11); this term is 10 there."""
    N, q, kv = batch * seq, cfg_model.q_width, cfg_model.kv_heads * cfg_model.head_dim
    expanded = 2 * q if kv < q else 0
    return N * (csize * (q + 2 * kv + expanded) + 4 * q)


def device_working_bytes(cfg_model, batch: int, seq: int, csize: int, stage_max: int,
                         micro_batches: int = 1, frozen: bool = False, packed: bool = False) -> int:
    """Device working memory of the largest stage's recompute + backward on a GPU: the larger of a
    block's (``block_working_bytes``) and the head's (``head_working_bytes``). ``frozen`` (LoRA): no
    parameter gradients of the base; ``packed``: rows may pack several examples (a mask)."""
    return max(block_working_bytes(cfg_model, batch, seq, csize, 0 if frozen else stage_max, micro_batches, packed),
               head_working_bytes(cfg_model, batch, seq, frozen))


HEAP_SLACK = 3  # CPU compute: a third of the working set for the heap's fragmentation (plan_memory)


def plan_memory(stage_numels: list[int], off, *, handoff: int = 0, **kw) -> MemoryPlan:
    """The memory plan (``_plan_memory``), with ``handoff`` slots for backward's weights (``handoff_slots``) where
    they pay: they take memory the weight cache and the resident state would have, so the plan is made with
    and without them and the one whose step moves fewer SSD bytes wins (``_ssd_bytes``; a tie, or slots the
    budget cannot hold, go without: the least budget stays what it was). Not with data parallelism (``owned``)."""
    plan = _plan_memory(stage_numels, off, **kw)
    # (data parallel: each rank's bytes are its own stages' state, so equal budgets could choose apart, and the
    # ranks' shared weight cache needs one plan: none there)
    if handoff and kw.get("owned") is None:
        other = _plan_memory(stage_numels, off, handoff=handoff, **kw)
        fits = other.cpu_required <= other.cpu_budget
        if fits and _ssd_bytes(other, stage_numels, kw) < _ssd_bytes(plan, stage_numels, kw):
            return other
    return plan


def _ssd_bytes(plan: MemoryPlan, stage_numels: list[int], kw: dict) -> int:
    """SSD bytes of a step under ``plan``, read and written (``stage_ssd_bytes``, the planner's figure too), one
    process: every stage's state is this plan's."""
    import torch

    from fuyou.optim.compressed import StateFormat

    fmt, csize, tied = kw.get("fmt") or StateFormat(), kw["csize"], kw["tied"]
    wb = kw.get("weight_bytes") or [n * csize for n in stage_numels]
    master_is_weights = fmt.master_is_compute(torch.bfloat16 if csize == 2 else torch.float32)
    return sum(sum(stage_ssd_bytes(n, wb[i], stage_uses(i, len(stage_numels), tied), fmt, csize, kw["gsize"],
                                   kw["deferred"], i in plan.cached_stages, i in plan.resident_stages,
                                   master_is_weights, bool(plan.handoff)))
               for i, n in enumerate(stage_numels))


def stage_uses(i: int, stages: int, tied: bool) -> int:
    """Times a step loads stage ``i``'s weights: forward and backward, the head once (layer-major), and a tied
    embedding once more for the head."""
    return (1 if i == stages - 1 else 2) + (1 if i == 0 and tied else 0)


def stage_ssd_bytes(numel: int, weight_bytes: int, uses: int, fmt, csize: int, gsize: int, clip: bool, cached: bool,
                    resident: bool, master_is_weights: bool, handoff: bool) -> tuple[int, int]:
    """SSD bytes (read, written) of one stage's step, full fine-tuning: its weights where the cache does not hold
    them, at each of ``uses``; its optimizer state where it is not resident (read and written; a master that
    is the weights not read where it is in memory: ``master_from_memory``); compute weights apart from the
    master, where they are not cached; with exact clipping (``clip``), its gradient saved in case the step is
    redone (the redo's reads not counted). A resident stage's state goes to the SSD by commits only."""
    state = fmt.state_bytes(numel)
    in_memory = master_from_memory(master_is_weights, resident, cached, handoff)
    master = numel * fmt.master_dtype.itemsize if in_memory else 0
    read = (0 if resident else state - master) + (0 if cached else uses * weight_bytes)
    separate = not cached and not (master_is_weights and not resident)
    written = (0 if resident else state + (numel * gsize if clip else 0)) + (numel * csize if separate else 0)
    return read, written


def master_from_memory(master_is_weights: bool, resident: bool, cached: bool, handoff: bool) -> bool:
    """A stage's update takes its master from memory, not the SSD: the master is its weights (``master_is_weights``),
    in the cache, or handed over by its backward where the plan keeps them (``handoff``: engine.py, Note: [Master in
    memory]). Not a redo's, nor a streamed stage's update deferred to the norm (the caller's to say)."""
    return master_is_weights and not resident and (cached or handoff)


def _plan_memory(stage_numels: list[int], off, *, chunk: int, io_buffer_bytes: int, act: dict[str, int],
                csize: int, gsize: int, deferred: bool, micro_batches: int, tied: bool, compute_on_cpu: bool,
                checkpoint_bytes: int | None = None, working_bytes: int | None = None,
                extra_cpu: dict[str, int] | None = None, extra_device: dict[str, int] | None = None,
                device_budget: int | None = None, offtier_bytes: int = 0, fmt=None,
                lora_params: int | None = None, owned: set[int] | None = None, cache_share: int = 1,
                weight_bytes: list[int] | None = None, dequant_bytes: int = 0,
                share_cap: int | None = None, handoff: int = 0) -> MemoryPlan:
    """The memory plan of the engine (module docstring) from shapes and settings, allocating nothing.

    ``stage_numels``: parameters owned by each stage, in stage order. ``off``: an ``OffloadConfig``.
    ``micro_batches``: per optimizer step (``train.grad_accum``); the step is layer-major, so the inputs
    of all of them are held at once, each stage's gradient is summed in one buffer (``gsize``: 4 when
    they are summed) and the weights are loaded once per step.
    ``chunk``: the optimizer's chunk in elements (already rounded to the store's blocks);
    ``io_buffer_bytes``: the store's bounce buffers. ``act``: ``activation_bytes(...)``.
    ``checkpoint_bytes`` / ``working_bytes`` replace the default device items (every stage's input
    checkpoint kept on the device; the CPU-oriented working-set estimate); ``extra_cpu`` and
    ``extra_device`` add items (activations a policy keeps in CPU or device memory). The weight cache
    gets what the budget has left. ``device_budget``: the device budget when ``off.gpu_mem`` leaves it
    to the device (the engine's default: the device's free memory). ``offtier_bytes``: the largest
    block's activations that leave the device (their copies may keep ``LEAVING`` of them alive).
    ``fmt``: how the optimizer state is stored (``fuyou.optim.compressed.StateFormat``; default fp32).
    ``lora_params``: LoRA (``fuyou.engine.lora_state``): the adapters' parameter count; the base has no
    optimizer state and no gradients, the adapters, their gradients and AdamW moments (16 B each) are
    on the device. ``owned`` (data parallel, ``fuyou.distributed.stage_owners``): the stages whose
    optimizer state this rank holds; only they can be resident (default: every stage). ``cache_share``:
    the ranks of one machine that map one weight cache (``fuyou.store.shared``); each plan charges its
    share of every cached stage, so the machine's plans together hold one cache (``cache_bytes`` is
    this rank's share; ``shared_cache_layout`` gives the whole). ``weight_bytes``: each stage's compute
    weights as stored, cached and streamed (default: its parameters in the compute dtype; LoRA's int8 or
    NF4 base packs its blocks smaller, ``fuyou.models.quant``), and ``dequant_bytes`` the largest stage's
    dequantised weights, which its compute holds beside the packed ones. ``handoff``: streamed stages' weights
    the weight pool holds beyond the window, for their updates (``handoff_slots``).
    """
    from fuyou.optim.compressed import StateFormat
    from fuyou.optim.out_of_core import optimizer_buffer_bytes

    fmt = fmt or StateFormat()
    # (compute on the CPU: a GPU's budget does not apply, the CPU budget counts its compute: the engine says so)
    given = off.gpu_mem if off.gpu_mem is not None else device_budget
    plan = MemoryPlan(off.cpu_mem, device_budget=None if compute_on_cpu else given,
                      cache_share=cache_share, act_share_cap=share_cap, handoff=handoff)  # (``act_share_cap``)
    stage_max = max(stage_numels)
    wb = weight_bytes or [n * csize for n in stage_numels]
    opt_lowp = csize  # a stage the cache does not hold writes its compute weights through these buffers
    lora = lora_params is not None
    if lora:  # nothing of the base is updated: no optimizer buffers, no gradients leave the device
        plan.cpu_items["optimizer buffers"] = 0
        plan.cpu_items["gradients in flight"] = 0
    else:
        plan.cpu_items["optimizer buffers"] = optimizer_buffer_bytes(fmt, chunk, off.optimizer_depth,
                                                                     gsize if deferred else 0, opt_lowp, stage_max)
        plan.cpu_items["gradients in flight"] = (off.max_pending_updates + 2) * (-(-stage_max * gsize // 4096) * 4096)
    plan.cpu_items["I/O bounce buffers"] = io_buffer_bytes
    plan.cpu_items["allocator and thread slack"] = RUNTIME_SLACK
    dev = plan.device_items
    # the window's depth + 1 positions (a load waits until the GPU is done with the position depth + 1
    # back: weights.py); with a tied head, also the embedding's and the head's weights: the head holds
    # the embedding's position while it runs
    dev["stage weights in window"] = (off.prefetch_depth + 1) * max(wb) + (wb[0] + wb[-1] if tied else 0)
    if dequant_bytes:
        dev["quantised base, a stage dequantised"] = dequant_bytes
    dev["checkpoints"] = ((len(stage_numels) + 1) * micro_batches * act["checkpoint"] if checkpoint_bytes is None
                          else checkpoint_bytes)
    # the largest stage's fp32 gradients; a frozen base (LoRA) has none, but its backward still holds about
    # a stage of compute-dtype temporaries beyond the activation estimate (measured: a 1024-wide, 11M-parameter
    # Llama block at 2 x 64 tokens, +22.7 MiB against the 14 MiB estimate; tests/engine/test_lora.py)
    stage_grads = stage_max * csize if lora else 2 * stage_max * 4
    dev["working memory (estimate)"] = (max(act["block_work"], act["head_work"]) + stage_grads
                                        if working_bytes is None else working_bytes)
    if tied and compute_on_cpu and not lora:
        dev["tied embedding gradient"] = gsize * stage_numels[0]
    if lora:
        dev["LoRA adapters, gradients and AdamW moments"] = 16 * lora_params
    dev.update(extra_device or {})
    if not compute_on_cpu:  # a separate device: what crosses to and from it is held a while longer
        dev["input batch"] = (micro_batches + 1) * act["batch"]  # the step's micro-batches, and the next
        dev["gradients leaving the device"] = 0 if lora else D2H_DEPTH * stage_max * gsize
        if tied and not lora:  # Note: [Tied gradient] in engine.py: it waits in CPU memory through the blocks' backward
            # on the device beside the head's gradient, then the embedding's (the embedding's size bounds it)
            dev["gradients leaving the device"] = max(dev["gradients leaving the device"],
                                                      gsize * (stage_numels[0] + max(stage_numels[0], stage_numels[-1])))
            plan.cpu_items["tied embedding gradient"] = -(-gsize * stage_numels[0] // 4096) * 4096
        if offtier_bytes:
            dev["activations leaving the device"] = LEAVING * offtier_bytes
        dev["allocator slack (estimate)"] = DEVICE_SLACK + int(sum(dev.values()) * DEVICE_SLACK_FRACTION)
        plan.cpu_items["input batch staging"] = 2 * (-(-act["batch"] // 4096) * 4096)
    if compute_on_cpu:  # the compute device's memory is CPU memory
        for k, v in dev.items():
            if k != "stage weights in window":  # on the CPU those are the cache or the weight buffers
                plan.cpu_items[f"compute: {k}"] = v
        # glibc's heap between a pass's temporaries: what one frees is not always where the next fits (the
        # heap is trimmed after each head and step, engine/malloc.trim_heap). Measured at a plan's minimum
        # (LoRA, Llama d 512, vocabulary 32k, batch 8 x 256, 5 runs each): peaks 4-8 % over the budget
        # without this item, up to 0.7 % over with a quarter of the working set, 2-17 % under with a third
        plan.cpu_items["compute: heap fragmentation (estimate)"] = dev["working memory (estimate)"] // HEAP_SLACK
    plan.cpu_items.update(extra_cpu or {})
    # The weight cache gets what is left; stages it cannot hold stream from SSD via weight buffers.
    steady = sum(plan.cpu_items.values())
    spare = off.cpu_mem - steady
    def cached(nbytes: int) -> int:  # a stage's weights in the cache: whole pages, this rank's share of them
        return -(-(-(-nbytes // 4096) * 4096) // cache_share)

    if off.cache_weights:
        for index, nbytes in enumerate(wb):
            need = cached(nbytes)
            if spare - need < weight_buffer_need(wb, plan.cached_stages + [index], off.prefetch_depth, tied, handoff):
                break
            plan.cached_stages.append(index)
            plan.cache_bytes += need
            spare -= need
    need = weight_buffer_need(wb, plan.cached_stages, off.prefetch_depth, tied, handoff)
    if need:
        plan.cpu_items["weight buffers"] = need
    if off.cache_weights and wb and not plan.cached_stages:  # (cpu_minimum: the first stage cached instead)
        plan.first_cached_delta = cached(wb[0]) + weight_buffer_need(wb, [0], off.prefetch_depth, tied, handoff) - need
    # Optimizer state kept in CPU memory gets what the cache leaves (module docstring). Its updates
    # read nothing from the SSD; the state is still written there every step (crash-safe commits).
    spare = off.cpu_mem - sum(plan.cpu_items.values()) - plan.cache_bytes
    spare = spare if off.resident_mem is None else min(spare, off.resident_mem)
    if spare > 0 and not lora:
        def state_copy(numel: int) -> int:  # one copy of a stage's state tensors, each in whole pages
            return sum(-(-t.numel(numel) * t.itemsize // 4096) * 4096 for t in fmt.tensors)

        held = gsize if deferred else 0  # exact clipping: its gradient waits beside it for the norm
        for index, numel in enumerate(stage_numels):
            if owned is not None and index not in owned:
                continue  # another rank's state
            need = state_copy(numel) + (-(-held * numel // 4096) * 4096 if held else 0)
            if need > spare:
                break
            plan.resident_stages.append(index)
            plan.resident_bytes += need
            spare -= need
        # Exact clipping: a resident stage waits for the norm, there being no copy to redo from, unless
        # what is left holds a second copy of its state (Note: [Spare copies] in engine.py). The last
        # stages first: their gradients come first in backward, whose time hides their updates; one
        # that does not fit (a large head) leaves the room to the blocks before it. Never in
        # ``clip_schedule=defer``, where every update waits for the norm anyway.
        if deferred and getattr(off, "resident_spare", True) and getattr(off, "clip_schedule", "auto") != "defer":
            for index in reversed(plan.resident_stages):
                need = state_copy(stage_numels[index])
                if need > spare:
                    continue
                plan.spare_stages.append(index)
                plan.resident_bytes += need
                spare -= need
            plan.spare_stages.sort()
    # Initialisation holds one stage's fp32 values and its flat copy, before buffers are in use.
    held = plan.cache_bytes + plan.resident_bytes
    init = 2 * 4 * stage_max + held
    extra = init - (sum(plan.cpu_items.values()) + held)
    if extra > 0:
        plan.cpu_items["initialisation (transient)"] = extra
    return plan


def exchange_buffer_bytes(chunk: int, csize: int) -> int:
    """Data parallel, sharded state: the weight exchange's one buffer, a chunk of compute weights on its
    way between the ranks (``fuyou/engine/exchange.py``)."""
    return max(4096, chunk * csize)


def shared_cache_layout(stage_numels: list[int], cached: list[int], csize: int) -> tuple[dict[int, int], int]:
    # (stage_numels: elements of the compute dtype each stage's stored weights take, ``StageState.wnumel``)
    """Byte offset of each cached stage in a weight cache the ranks share (4 KiB aligned, in stage
    order: every rank computes the same), and its size."""
    offsets, at = {}, 0
    for i in sorted(cached):
        offsets[i] = at
        at += -(-stage_numels[i] * csize // 4096) * 4096
    return offsets, at


def weight_buffer_need(stage_bytes: list[int], cached: list[int], prefetch_depth: int, tied: bool,
                       handoff: int = 0) -> int:
    """Pool bytes for the loads in the prefetch window: ``depth + 1`` positions, one more when the
    tied head holds the embedding's weights too, each rounded up to the 4 KiB pool granule; and those of
    ``handoff`` stages kept for their updates (``handoff_slots``): the most any ``handoff`` stages take that
    follow one another in backward (the updates finish in that order; a window of the largest stage each
    made the hand-off cost a head four times, and the cache it displaced worth more than the reads it saved).
    ``stage_bytes``: each stage's stored compute weights."""
    rest = [n for i, n in enumerate(stage_bytes) if i not in cached]
    if not rest:
        return 0
    page = lambda n: -(-n // 4096) * 4096  # noqa: E731
    need = (prefetch_depth + 1 + (1 if tied else 0)) * page(max(rest))
    if handoff:  # the updates run in backward's order (the head's first): at most ``handoff`` consecutive ones
        order = rest[::-1]
        need += max(sum(page(n) for n in order[k:k + handoff]) for k in range(len(order)))
    return need


def handoff_slots(off, master_is_weights: bool, data_parallel: bool) -> int:
    """Streamed stages' weights the weight pool holds beyond the prefetch window: read by backward, kept
    for their update when the master is the compute weights (``master_is_weights``: engine.py, Note:
    [Master in memory]). One for the update running, ``max_pending_updates`` queued, one being submitted
    (the submit waits for room in the queue with it); data parallel, one more waiting for its sum over
    the ranks. None when every update waits for the norm (``clip_schedule='defer'``), or ``handoff_weights`` is
    off."""
    if (not master_is_weights or getattr(off, "clip_schedule", "auto") == "defer"
            or not getattr(off, "handoff_weights", True)):
        return 0
    return off.max_pending_updates + 2 + (1 if data_parallel else 0)


def class_widths(cfg_model) -> dict[str, int]:
    """Elements per token of each activation class's matmul output (``ACT_CLASSES``): fc2 and proj d,
    qkv the query width (d unless ``d_head`` sets it apart) + 2 x the KV width, fc1 ff (llama: gate and
    up, 2 ff)."""
    d, kv = cfg_model.d_model, cfg_model.kv_heads * cfg_model.head_dim
    return {"fc2": d, "proj": d, "qkv": cfg_model.q_width + 2 * kv,
            "fc1": cfg_model.ff_dim * (2 if cfg_model.family == "llama" else 1)}


def class_parts(cfg_model) -> dict[str, tuple[int, ...]]:
    """``class_widths`` by the tensors the swapper places one at a time, in the order the forward makes them:
    Llama's qkv is three matmuls (q, k, v) and its fc1 two (gate, up); GPT's classes one each."""
    if cfg_model.family != "llama":
        return {k: (v,) for k, v in class_widths(cfg_model).items()}
    d, kv = cfg_model.d_model, cfg_model.kv_heads * cfg_model.head_dim
    return {"fc2": (d,), "proj": (d,), "qkv": (cfg_model.q_width, kv, kv), "fc1": (cfg_model.ff_dim,) * 2}


def largest_saved_tensor(cfg_model, batch: int, seq: int, csize: int, packed: bool = False, cuda: bool = False) -> int:
    """Bytes of the largest tensor a block's forward saves, one micro-batch (``saved_block_bytes`` lists them), at
    most: the widest matmul input or output (the MLP's hidden width, the queries' and the keys' and values'), an
    fp32 residual or normalised input, or the attention mask. A block kept whole reaches the swapper tensor by
    tensor, so where the cpu tier's share cannot take all of it, no more than this is left of the share unused
    (``planner.cost.kept_in_forward``)."""
    N = batch * seq
    mask, kv = attention_saves(cfg_model, batch, seq, csize, packed, cuda)
    width = max(cfg_model.ff_dim, cfg_model.q_width, kv, cfg_model.d_model)
    return max(csize * width * N, 4 * cfg_model.d_model * N, csize * mask)


def saved_block_bytes(cfg_model, batch: int, seq: int, csize: int, lora=None, packed: bool = False,
                      cuda: bool = False) -> int:
    """Bytes autograd saves in one block's forward for one micro-batch: what a block kept whole (policy
    ``all``) swaps (``fuyou.engine.recompute.GraphKeeper``: every saved tensor once, less the block's
    input and weights). Counted from the blocks' code (``fuyou.models.stages``) as PyTorch saves it, in
    bytes per token unless said: each norm its statistics (4 B per row; LayerNorm mean and rstd), RMSNorm
    its fp32 input and, where its weight trains, its fp32 normalised product; each matmul its input
    where its weight trains or it has an adapter (in the compute dtype, cast once for the matmuls
    sharing it); attention its query, keys, values (rotated), output (the kernel's fp32 log-sum-exp, 4 B
    per head) and the output's copy into the projection (with grouped queries the keys and values per query
    head where the kernel does not take them, ``layers.kernel_gqa``: ``cuda`` with a mask or in fp32); the
    MLP its activation's input and output (Llama: gate, SiLU, up); the fp32 residual before the second norm. Per block: Llama's cos and sin tables
    (per row with ``packed`` documents), a mask (with packing or a sliding window shorter than the
    sequence, in the compute dtype), GPT's norm weights cast to fp32 under bf16. ``lora``: a
    ``LoRAConfig`` (the base frozen: a matmul without an adapter saves no input; an adapter saves
    A·x, r per token, and its weights, and with dropout the mask and the dropped input instead of the input).
    Checked against the engine's swapped bytes on the CPU (tests/engine/test_activations.py: GPT and
    Llama, fp32 and bf16, grouped queries, QK norms, windows, packing, LoRA with and without dropout)."""
    from fuyou.models.lora import resolve_targets

    c, N, B, T = csize, batch * seq, batch, seq
    d, ff, hd = cfg_model.d_model, cfg_model.ff_dim, cfg_model.head_dim
    qw, kv, h, kvh = cfg_model.q_width, cfg_model.kv_heads * hd, cfg_model.n_head, cfg_model.kv_heads
    fam = cfg_model.family
    full = lora is None or not lora.enabled
    adapted = set() if full else set(resolve_targets(fam, lora.targets))
    inputs = {"llama": {"q": d, "k": d, "v": d, "o": qw, "gate": d, "up": d, "down": ff},
              "gpt": {"qkv": d, "proj": qw, "fc1": d, "fc2": ff}}[fam]
    outputs = {"llama": {"q": qw, "k": kv, "v": kv, "o": d, "gate": ff, "up": ff, "down": d},
               "gpt": {"qkv": qw + 2 * kv, "proj": d, "fc1": ff, "fc2": d}}[fam]

    dropout = not full and lora.dropout > 0

    def saves_input(*names: str) -> bool:  # (an adapter with dropout saves its dropped input instead)
        return full or (not dropout and any(n in adapted for n in names))

    mask, kv_saved = attention_saves(cfg_model, batch, seq, c, packed, cuda)
    mask *= c  # (in the compute dtype)
    attn = c * (qw + 2 * kv_saved) + c * qw + 4 * h + (c * qw if saves_input("o" if fam == "llama" else "proj") else 0)
    if fam == "gpt":
        per_token = (2 * 8 + 4 * d + attn + c * ff
                     + (c * d if saves_input("qkv") else 0) + (c * d if saves_input("fc1") else 0)
                     + (c * ff if saves_input("fc2") else 0))
        const = (4 * 4 * d if c == 2 else 0) + mask  # the norms' weights and biases cast to fp32 under bf16
    else:
        first, second = saves_input("q", "k", "v"), saves_input("gate", "up")
        norms = 2 * 4 + 4 * d + (2 * 4 * d if full else 0) + c * d * (first + second)
        qk = (4 * (qw + kv) + 4 * (h + kvh) + (c * (qw + kv) if full else 0)) if cfg_model.qk_norm else 0
        per_token = norms + qk + attn + 3 * c * ff + (c * ff if saves_input("down") else 0)
        const = 2 * (B if packed else 1) * T * hd * c + mask
    adapters = 0
    for n in adapted:
        adapters += N * c * lora.rank + c * lora.rank * (inputs[n] + outputs[n])
        if dropout:  # the mask, in the input's dtype (GPT's norms give fp32), and the dropped input
            adapters += N * inputs[n] * ((4 if fam == "gpt" and n in ("qkv", "fc1") else c) + c)
    return N * per_token + const + adapters


def kept_activation_bytes(cfg_model, policy: dict, batch: int, seq: int, act_bytes: int,
                          whole: int | None = None) -> dict[str, int]:
    """Bytes of activations a policy (``fuyou.policy.KeepPolicy`` per block) keeps per tier for one
    micro-batch (a step keeps them for each of its micro-batches). A kept class costs its matmul output;
    a block kept whole what autograd saves (``whole``; by default ``saved_block_bytes`` of full
    fine-tuning without packing), its input staying on the device; a checkpoint moved off the device,
    B·T·d in its dtype (4 B, or 2 B in bf16)."""
    d, tokens = cfg_model.d_model, batch * seq
    per_class = class_widths(cfg_model)
    if whole is None:
        whole = saved_block_bytes(cfg_model, batch, seq, act_bytes)
    out = {"gpu": 0, "cpu": 0, "ssd": 0}
    for b in policy.values():
        if b.all is not None:
            out[b.all] += whole
        for cls, tier in b.classes.items():
            out[tier] += act_bytes * tokens * per_class[cls]
        if b.checkpoint != "gpu":
            out[b.checkpoint] += b.checkpoint_bytes * tokens * d
    return out


def offtier_bytes(cfg_model, policy: dict, batch: int, seq: int, csize: int) -> int:
    """Bytes of the largest single activation a policy sends off the device (``KeepPolicy`` per block):
    what one pending outgoing copy may keep alive (``LEAVING`` of them make the plan's "activations
    leaving the device"). A kept class is its matmul output; a block kept whole saves tensors up to
    the fp32 residual stream or an MLP-wide tensor in the compute dtype; a checkpoint is B·T·d in its dtype."""
    d, tokens = cfg_model.d_model, batch * seq
    per_class = class_widths(cfg_model)
    largest = 0
    for b in policy.values():
        if b.all in ("cpu", "ssd"):
            largest = max(largest, 4 * tokens * d, csize * tokens * per_class["fc1"])
        for cls, tier in b.classes.items():
            if tier != "gpu":
                largest = max(largest, csize * tokens * per_class[cls])
        if b.checkpoint != "gpu":
            largest = max(largest, b.checkpoint_bytes * tokens * d)
    return largest


ACT_SHARE = "activations (cpu tier share)"


# What lowers each item of the CPU plan (the items that follow the budget, such as the weight cache, have none).
LEVERS = (("optimizer buffers", "offload.optimizer_chunk or offload.optimizer_depth"),
          ("gradients in flight", "offload.max_pending_updates"),
          ("I/O bounce buffers", "offload.io_threads"),
          ("weight buffers", "offload.prefetch_depth"),
          ("weight exchange buffer", "offload.optimizer_chunk"),
          ("activation staging", "offload.act_staging_chunks"),
          ("compute:", "the batch, sequence length or grad_accum"),
          ("input batch staging", "the batch or sequence length"))


def _levers(items: dict[str, int], act_cpu_mem_given: bool) -> str:
    """The settings that lower a refused plan's items, largest item first (the advice named the optimizer's
    chunk under LoRA, which has no optimizer buffers, and never the offload.act_cpu_mem that was the cause: a
    pass)."""
    out: list[str] = []
    for name, size in sorted(items.items(), key=lambda kv: -kv[1]):
        lever = ("offload.act_cpu_mem" if name == ACT_SHARE and act_cpu_mem_given else
                 next((lv for key, lv in LEVERS if name.startswith(key)), None))
        if size > 0 and lever and lever not in out:
            out.append(lever)
    return ("what takes the most: " + "; ".join(out[:3])) if out else "the batch or sequence length"


def act_share_cap(policy: dict, off, cpu_tier_bytes: int) -> int | None:
    """The most a default cpu tier share (``act_cpu_share``) takes, or None when the share does not
    depend on the budget (``offload.act_cpu_mem`` given, or no cpu tier): ``MemoryPlan.cpu_minimum``."""
    if off.act_cpu_mem is not None or not act_cpu_share(policy, off, cpu_tier_bytes)[0]:
        return None
    return _share_cap(cpu_tier_bytes)


def _share_cap(cpu_tier_bytes: int) -> int:
    return cpu_tier_bytes + cpu_tier_bytes // 32 + 2**20  # slack for the pool's rounding of each tensor


def policy_tiers(policy: dict) -> set[str]:
    """The activation tiers (gpu, cpu, ssd) engine block policies (``fuyou.policy.keep_policies``) use."""
    return {t for b in policy.values() for t in (b.checkpoint, b.all, *b.classes.values()) if t}


def act_cpu_share(policy: dict, off, cpu_tier_bytes: int | None = None) -> tuple[int, bool]:
    """(CPU memory for activations of tier ``cpu``, whether any activation leaves the compute device)
    for engine block policies (``fuyou.policy.keep_policies``): ``offload.act_cpu_mem``, by default a
    quarter of ``cpu_mem`` when the policy uses the cpu tier, but no more than what the policy keeps
    there in a step (``cpu_tier_bytes``, ``cpu_tier_need``) with a little slack; nothing when the policy
    keeps nothing there, whatever ``act_cpu_mem`` says (it was charged, from resident optimizer state).
    (Uncapped, the share grew with the budget, so the smallest budget a refusal named was never enough:
    each raise raised the share with it. What does not fit the share overflows to the SSD tier.)"""
    uses = policy_tiers(policy)
    if "cpu" not in uses:  # nothing to hold: a given offload.act_cpu_mem is unused (loop.py notes it), not charged
        share = 0
    elif off.act_cpu_mem is not None:
        share = off.act_cpu_mem
    else:
        share = off.cpu_mem // 4
        if cpu_tier_bytes is not None:
            share = min(share, _share_cap(cpu_tier_bytes))
    return share, bool(uses & {"cpu", "ssd"})


def cpu_tier_need(cfg_model, policy: dict, batch: int, seq: int, csize: int, micro_batches: int = 1,
                  whole: int | None = None) -> int:
    """Bytes a policy keeps in the cpu tier in a step: each micro-batch's, until its backward."""
    return micro_batches * kept_activation_bytes(cfg_model, policy, batch, seq, csize, whole)["cpu"]


def policy_memory(cfg_model, policy: dict, off, batch: int, seq: int, csize: int,
                  checksum_block: int, micro_batches: int = 1,
                  whole: int | None = None) -> tuple[dict[str, int], dict[str, int], int, int | None]:
    """What an activation policy adds to the memory plan: (CPU items, device items, bytes of stage
    inputs kept on the device, ``plan_memory``'s ``share_cap``: ``act_share_cap``). The engine and the planner both call it, with the engine's block
    policies (a block whose classes are all kept is kept whole and charged its working set). Every
    micro-batch of a step keeps its activations until backward (layer-major: ``micro_batches``). ``whole``:
    what a block kept whole saves (``saved_block_bytes``)."""
    act = activation_bytes(cfg_model, batch, seq)
    kept = kept_activation_bytes(cfg_model, policy, batch, seq, csize, whole)
    share, offtier = act_cpu_share(policy, off, micro_batches * kept["cpu"])
    extra_cpu, extra_dev = {}, {}
    if kept["gpu"]:
        extra_dev["kept activations (policy, gpu tier)"] = micro_batches * kept["gpu"]
    if offtier:
        extra_cpu["activation staging"] = off.act_staging_chunks * (-(-off.act_chunk // checksum_block) * checksum_block)
    if share:
        extra_cpu[ACT_SHARE] = share
    # Activations read back ahead of backward are materialised on the compute device: the block (of one
    # micro-batch) in backward and ``act_prefetch_blocks`` more.
    per_block = [sum(kept_activation_bytes(cfg_model, {i: b}, batch, seq, csize, whole)[k] for k in ("cpu", "ssd"))
                 for i, b in policy.items()]
    if max(per_block, default=0):
        extra_dev["activations fetched ahead"] = (off.act_prefetch_blocks + 1) * max(per_block)
    # Between stages each micro-batch's residual stream (or, in backward, its gradient) is on the device,
    # with one more while a stage computes (fp32); blocks whose checkpoints stay there keep one per
    # micro-batch, in the checkpoint's dtype.
    stream = act["checkpoint"] // 4  # elements
    # (a block whose input is rounded for a bf16 checkpoint rounds the stream tensor in place: no extra copy;
    # a block kept whole keeps that tensor, fp32, with its graph)
    kept_ckpt = sum(4 if b.all else b.checkpoint_bytes for b in policy.values() if b.checkpoint == "gpu") * stream
    return (extra_cpu, extra_dev, (micro_batches + 1) * act["checkpoint"] + micro_batches * kept_ckpt,
            act_share_cap(policy, off, micro_batches * kept["cpu"]))
