"""The planner's search: which activations to keep and where, how many weights to cache, the prefetch
depth, within the GPU, CPU and SSD budgets, minimising the simulated step time.

The memory model is the engine's own (``fuyou.engine.budget.plan_memory`` and ``policy_memory``):
the same items, the weight cache and resident optimizer state taking what the CPU budget leaves.
Activations a policy keeps add the engine's items (kept on the device, the cpu tier's share,
staging for what goes on to the SSD, what is fetched back ahead of backward).

Search (DESIGN.md idea 3): candidates (block, class) are ordered by recompute FLOPs saved per byte
kept (``fc2`` first: 2*ff FLOPs/element; then ``proj``, ``qkv``, ``fc1``: 2*d) and, within a class, from
the last block (needed first in backward) to the first. A policy keeps a prefix of that list, each
item in the first tier with room (GPU, then CPU, then SSD; or GPU then SSD, leaving CPU memory to the
weight cache: both orders are tried). Step time is close to convex in the prefix length, so a coarse
grid followed by a ternary refinement finds the minimum in about twenty simulations. The prefetch
depth (1-3) is chosen first, with nothing swapped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

from fuyou.policy import to_keep
from fuyou.engine.budget import (ACT_SHARE, DEVICE_SLACK_FRACTION, MemoryPlan, act_cpu_share, cpu_tier_need,
                                 exchange_buffer_bytes, offtier_bytes, plan_memory,
                                 policy_memory, weight_buffer_need)
from fuyou.engine.config import OffloadConfig
from fuyou.engine.layout import copies_needed, store_margin
from fuyou.engine.budget import activation_bytes
from fuyou.planner.cost import StageCost, Workload, gpu_working_bytes, placement_bytes, stage_costs
from fuyou.planner.hardware import GPUS, PROBED_RATES, HardwareProfile, card_for, with_more_ssds
from fuyou.policy import CLASSES, ActivationPolicy, BlockPolicy
from fuyou.planner.simulate import SimResult, simulate_plan
from fuyou.optim.compressed import StateFormat
from fuyou.units import format_size

SEARCH_STEPS = 2   # steps simulated per candidate (steady state from the second)
#: `fuyou plan`: the process's fixed overhead by compute device (torch, and the CUDA context's host side; the
#: engine prints what it measured as "fixed overhead before the engine": ~0.24 GiB on a CPU)
CPU_RESERVE = {"cuda": 1536 * 1024**2, "cpu": 384 * 1024**2}  # (a CPU run from a Hugging Face checkpoint, whose
# tokenizer imports transformers, measured 318 MiB: a new-user pass found a 256 MiB reserve exceeded)
CPU_RESERVE_FRACTION = 0.02    # and heap fragmentation, of --cpu-mem: left out of the planned budget
REPORT_STEPS = 3   # steps simulated for the chosen plan


@dataclass
class Evaluation:
    policy: ActivationPolicy
    memory: MemoryPlan
    ssd_bytes: int
    problems: list[str]
    sim: SimResult | None = None
    commit_s: float = 0.0                 # crash safety per step: the commits' cost, amortized
    steps_per_commit: float = 1.0
    commit_cost_s: float = 0.0            # one commit (the resident state written) beyond a step
    triggered_step: float | None = None   # the first step on which exact clipping triggers (its redo)
    redo_write_bytes: int = 0             # what that step writes to SSD beyond a step that does not clip
    redo_read_bytes: int = 0              # and reads
    clipping_step: float | None = None    # a step that clips after one that did (deferred updates)
    clipping_traffic: tuple[int, int] | None = None  # that step's SSD bytes (read, written), every rank's

    @property
    def feasible(self) -> bool:
        return not self.problems

    @property
    def step_time(self) -> float:
        """The steady-state step with crash-safe commits amortized (clipping not triggering)."""
        return self.sim.step_time + self.commit_s if self.sim is not None else math.inf


@dataclass
class Plan:
    workload: Workload
    hardware: HardwareProfile
    costs: list[StageCost]
    best: Evaluation
    fixes: list[str] = field(default_factory=list)
    whatif: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0
    tokens_goal: int | None = None   # `fuyou plan --tokens`: report the time to train on this many tokens
    cpu_given: int | None = None     # `fuyou plan --cpu-mem` before its --cpu-reserve (the plan's budget is less)
    cpu_need: int | None = None      # infeasible for CPU memory: the planned budget (each rank's) that would fit
    cpu_note: str = ""               # ... and the settings it is for, when not train's defaults
    train_settings: list[str] = field(default_factory=list)  # overrides given to plan that train needs too
    split: list[tuple[int, int, float | None, str]] = field(default_factory=list)
    """``search_split``: the splits of the global batch considered, (micro-batch, micro-batches, step
    seconds or None, why it does not fit or why it was chosen), in the order tried."""
    split_reason: str = ""
    batches: list[tuple[int, float | None]] = field(default_factory=list)
    """``search_global_batch``: (global batch, tokens/s of its best split or None) for each candidate."""

    @property
    def feasible(self) -> bool:
        return self.best.feasible


def memory_plan(w: Workload, hw: HardwareProfile, costs: list[StageCost], policy: ActivationPolicy,
                cpu_budget: int) -> tuple[MemoryPlan, int]:
    """The engine's memory plan for this policy, and the SSD bytes it needs (every rank's together).
    Data parallel (``w.ranks`` > 1): ``cpu_budget`` is one rank's share and each rank is planned as the
    engine plans it (its own stages' optimizer state, the weight exchange's buffer, its share of the one
    weight cache the ranks of a machine map); the plan returned is the rank that needs the most CPU
    memory, with every rank's resident stages."""
    if not w.sharded:
        plan = _rank_plan(w, hw, policy, cpu_budget, None)
    else:
        plans = [_rank_plan(w, hw, policy, cpu_budget, {i for i, o in enumerate(w.owners) if o == r})
                 for r in range(w.ranks)]
        plan = max(plans, key=lambda p: p.cpu_required + p.cache_bytes + p.resident_bytes)
        plan.resident_elsewhere = sorted(i for p in plans if p is not plan for i in p.resident_stages)
        plan.spare_elsewhere = sorted(i for p in plans if p is not plan for i in p.spare_stages)
    return plan, sum(ssd_parts(w, plan, costs, policy, hw.device == "cuda").values())


def _rank_plan(w: Workload, hw: HardwareProfile, policy: ActivationPolicy, cpu_budget: int,
               owned: set[int] | None) -> MemoryPlan:
    cuda = hw.device == "cuda"
    off = w.offload.model_copy(update=dict(prefetch_depth=policy.prefetch_depth, cpu_mem=cpu_budget,
                                           gpu_mem=hw.gpu_mem if cuda else None))
    # The activation items are the engine's own (budget.policy_memory), from the engine's view of the
    # policy, so a plan the planner accepts is one the engine accepts.
    keep = to_keep(policy, w.model.n_layer, w.checkpoint_default)
    extra_cpu, extra_dev, ckpt_bytes, share_cap = policy_memory(w.model, keep, off, w.batch, w.seq, w.csize,
                                                                w.store.checksum_block, w.micro, w.whole)
    if owned is not None:  # the engine's: one chunk of compute weights on its way between the ranks
        extra_cpu["weight exchange buffer"] = exchange_buffer_bytes(w.chunk, w.csize)
    return plan_memory(
        w.numels, off, chunk=w.chunk, io_buffer_bytes=w.store.queue_depth * max(w.store.block_size, w.store.checksum_block),
        act=activation_bytes(w.model, w.batch, w.seq, frozen=w.lora_params is not None), csize=w.csize, gsize=w.gsize, deferred=w.grad_clip is not None,
        micro_batches=w.micro, tied=w.tied, compute_on_cpu=not cuda,
        checkpoint_bytes=ckpt_bytes, working_bytes=gpu_working_bytes(w) if cuda else None,
        extra_cpu=extra_cpu, extra_device=extra_dev,
        offtier_bytes=offtier_bytes(w.model, keep, w.batch, w.seq, w.csize), fmt=w.fmt, lora_params=w.lora_params,
        owned=owned, cache_share=w.ranks,  # one weight cache per machine (sharded state or LoRA's base)
        weight_bytes=w.weight_bytes, dequant_bytes=w.dequant_bytes,
        share_cap=share_cap, handoff=w.handoff)


def state_ssd_bytes(w: Workload, plan: MemoryPlan) -> dict[str, int]:
    """SSD space of the training state by kind (every rank's together): the optimizer state's copies
    (one to three per stage, by commit mode, interval and clipping: Note: [State copies] in
    engine/layout.py), compute weights not cached (data parallel: each rank stores those of the stages
    it does not cache, its owners' new weights written there by the exchange), and gradients saved for
    exact clipping."""
    off, clip = w.offload, w.grad_clip is not None
    if w.lora_params is not None:  # LoRA: every stage's base weights (compute dtype, or packed int8/NF4), nothing else
        name = "base weights" if w.lora.base == "compute" else f"base weights ({w.lora.base})"
        # a commit's adapters and moments (fp32, 12 B a parameter, ``engine.lora_state``): the new file is written
        # before the old is removed (left out: du was 3.6 MB over the plan, a pass)
        return {"optimizer state copies": 0, name: w.ranks * sum(w.weight_bytes), "saved gradients": 0,
                "adapter commits": 2 * 12 * w.lora_params * w.ranks if w.offload.commit == "cow" else 0}
    every = off.commit_steps == 1
    resident = plan.resident_all
    state = sum(w.fmt.state_bytes(n) * copies_needed(off.commit, every, clip and i not in resident)
                for i, n in enumerate(w.numels))
    weights = sum(w.csize * n * ((w.ranks - 1) + (0 if w.master_is_weights and i not in resident else 1))
                  for i, n in enumerate(w.numels) if i not in plan.cached_stages)
    return {"optimizer state copies": state, "compute weights": weights,
            "saved gradients": w.gsize * sum(n for i, n in enumerate(w.numels) if i not in resident)
            if clip else 0}


def ssd_parts(w: Workload, plan: MemoryPlan, costs, policy: ActivationPolicy, cuda: bool = True) -> dict[str, int]:
    """The SSD footprint by part (every rank's together): the training state (``state_ssd_bytes``), the
    activations and checkpoints the policy swaps to the SSD at the peak, and each rank's store margin."""
    pb = placement_bytes(w, costs, policy, plan.cpu_items.get(ACT_SHARE, 0), cuda)
    state = state_ssd_bytes(w, plan)
    return {**state, "swapped activations": w.ranks * pb["ssd"], "swapped checkpoints": w.ranks * pb["ckpt_ssd"],
            "store margin": w.ranks * sum(rank_store_margin(
                w, (sum(state.values()) - state.get("adapter commits", 0)) // w.ranks))}  # (the store's tensors)


def rank_store_margin(w: Workload, nbytes: int) -> tuple[int, int]:
    """A rank's store margin (``engine.layout.store_margin``) for ``nbytes`` of its tensors: at most a tensor per
    state role and copy, compute weights and a saved gradient per stage (the engine's ``TrainingState.specs``)."""
    per_stage = 1 if w.lora_params is not None else len(w.fmt.tensors) * 3 + 2
    return store_margin(nbytes, per_stage * len(w.numels), w.store.checksum_block, w.store.stripe_unit)


def evaluate(w: Workload, hw: HardwareProfile, costs, policy: ActivationPolicy, cpu_budget: int,
             steps: int = SEARCH_STEPS, clip_modes: bool = True) -> Evaluation:
    """Memory plan and simulated step of one policy. With ``steps >= REPORT_STEPS`` (the reported
    plan) also the commits amortized over their interval and, with ``clip_modes``, the steps on
    which exact clipping triggers."""
    plan, ssd = memory_plan(w, hw, costs, policy, cpu_budget)
    problems = []
    if plan.cpu_required > cpu_budget:
        problems.append(f"CPU memory: needs {format_size(plan.cpu_required, up=True)}, the budget is "
                        f"{format_size(cpu_budget)}")
    if hw.device == "cuda" and plan.device_required > hw.gpu_mem:
        problems.append(f"GPU memory: one stage's working set needs {format_size(plan.device_required)}, "
                        + ("the device budget (offload.gpu_mem) is " if hw.gpu_budget else "the GPU has ")
                        + format_size(hw.gpu_mem))
    if ssd > hw.ssd_capacity:
        problems.append(f"SSD space: needs {format_size(ssd)}, the drives hold {format_size(hw.ssd_capacity)}")
    ev = Evaluation(policy, plan, ssd, problems)
    if problems:
        return ev
    every = w.offload.commit == "cow" and w.offload.commit_steps == 1
    # A step whose norm stays below the threshold: speculative, unless offload.clip_schedule=defer makes
    # every step wait for the norm (the engine's _defer).
    schedule = w.offload.clip_schedule if w.grad_clip is not None else None
    calm = "defer" if schedule == "defer" else "speculate"
    ev.sim = simulate_plan(w, costs, hw, policy, plan, steps=steps, commit=every, clip_mode=calm)
    if steps < REPORT_STEPS:
        return ev
    # The report's figures: crash safety amortized over the interval, and a triggered step.
    if w.offload.commit == "cow" and not every:
        ev.steps_per_commit = w.offload.steps_per_commit(ev.sim.step_time)
        if plan.resident_all:  # without state held in CPU memory a commit writes only its record
            with_commit = simulate_plan(w, costs, hw, policy, plan, steps=steps, commit=True, clip_mode=calm)
            ev.commit_cost_s = max(0.0, with_commit.step_time - ev.sim.step_time)
            ev.commit_s = ev.commit_cost_s / ev.steps_per_commit
    if w.grad_clip is not None and clip_modes:
        # the first step that clips, and the next ones while it keeps clipping, per schedule
        modes = {"auto": ("redo", "defer"), "speculate": ("redo", "redo"), "defer": ("defer", "defer")}[schedule]
        sims = {m: simulate_plan(w, costs, hw, policy, plan, steps=steps, commit=every, clip_mode=m)
                for m in set(modes)}
        ev.triggered_step, ev.clipping_step = (sims[m].step_time + ev.commit_s for m in modes)
        if "redo" in sims:  # what a redo writes again (the wear the plan showed left it out: a note)
            ev.redo_write_bytes = max(0, sims["redo"].step_written() - ev.sim.step_written())
            ev.redo_read_bytes = max(0, sims["redo"].step_read() - ev.sim.step_read())
        # (a fine-tune whose norm stays above the threshold runs these steps: 17 % more reads than the line said,
        # a pass)
        ev.clipping_traffic = (sims[modes[1]].step_read(), sims[modes[1]].step_written())
    return ev


def _assign(w, hw, costs, depth: int, tiers: tuple[str, ...], k: int, cpu_budget: int) -> ActivationPolicy:
    """Checkpoints, then the first ``k`` candidates, each in the first tier of ``tiers`` with room."""
    L = w.model.n_layer
    base = ActivationPolicy.recompute_all(L, checkpoint="ssd", prefetch_depth=depth)
    plan, _ = memory_plan(w, hw, costs, base, cpu_budget)
    # what is kept on the GPU also grows the plan's allocator slack (a fraction of the device items)
    room = {"gpu": (hw.gpu_mem - plan.device_required) / (1 + DEVICE_SLACK_FRACTION) if hw.device == "cuda" else 0,
            "cpu": cpu_budget - plan.cpu_required - weight_buffer_need(w.weight_bytes, [], depth, w.tied),
            "ssd": math.inf}
    if hw.device == "cpu":  # the compute device's memory is CPU memory: "gpu" and "cpu" are one tier
        room["gpu"], room["cpu"] = room["cpu"], 0
    # the engine's cpu tier is its share (act_cpu_share: offload.act_cpu_mem, by default a quarter of the
    # budget); what the policy put there beyond it would overflow to the SSD (cost.kept_in_forward)
    off = w.offload
    room["cpu"] = min(room["cpu"], off.act_cpu_mem if off.act_cpu_mem is not None else cpu_budget // 4)
    blocks = {i: dict(checkpoint="ssd") for i in range(L)}

    charged: dict[int, tuple[str, int]] = {}  # each block's checkpoint: its tier and the bytes charged there

    def put(i: int, cls: str, nbytes: int) -> None:
        for t in tiers:
            # the last of a block's four classes into the tier of the other three keeps the block whole: it
            # holds everything autograd saves (``Workload.whole``), not just the four, and its fp32 input stays
            # on the device in place of its checkpoint (``policy.to_keep``), which the policy then says
            others = [blocks[i].get(c) for c in CLASSES if c != cls]
            if cls == "checkpoint" or not all(o == t for o in others):
                if room[t] >= nbytes:
                    room[t] -= nbytes
                    blocks[i][cls] = t
                    if cls == "checkpoint":
                        charged[i] = (t, nbytes)
                    return
                continue
            after = dict(room)
            tier, ck = charged.get(i, ("gpu", 0))
            after[tier] += ck
            after["gpu"] -= M * costs[i + 1].act_bytes["checkpoint"]
            after[t] -= nbytes + M * w.whole - sum(M * costs[i + 1].act_bytes[c] for c in CLASSES)
            if after[t] >= 0 and after["gpu"] >= 0:
                room.update(after)
                blocks[i].update({cls: t, "checkpoint": "gpu"})
                charged[i] = ("gpu", M * costs[i + 1].act_bytes["checkpoint"])
                return

    M = w.micro  # each micro-batch of a step (this rank's) keeps its own
    fp32 = [M * w.checkpoint_bytes(costs[i + 1], BlockPolicy(checkpoint_dtype="fp32")) for i in range(L)]
    # auto (Note: [Checkpoint dtype] in fuyou/policy.py): when the GPU cannot keep every checkpoint in fp32,
    # the checkpoints it keeps are bf16 (twice as many stay on the device, the last blocks first); the
    # rest go off the device in fp32. Exact (all fp32) whenever they all fit.
    narrow = w.offload.checkpoint_dtype == "auto" and w.csize == 2 and sum(fp32) > room["gpu"]
    for i in reversed(range(L)):
        if w.offload.checkpoint_dtype == "auto" and w.csize == 2:
            on_gpu = narrow and fp32[i] // 2 <= room["gpu"]
            blocks[i]["checkpoint_dtype"] = "bf16" if on_gpu else "fp32"
            put(i, "checkpoint", fp32[i] // 2 if on_gpu else fp32[i])
            continue
        put(i, "checkpoint", M * w.checkpoint_bytes(costs[i + 1], BlockPolicy()))
    cands = [(i, cls) for cls in CLASSES for i in reversed(range(L))]
    for i, cls in cands[:k]:
        put(i, cls, M * costs[i + 1].act_bytes[cls])
    return ActivationPolicy(blocks={i: BlockPolicy(**b) for i, b in blocks.items()}, prefetch_depth=depth)


MIN_RUNG = 1 << 30   # the smallest lower CPU budget ``search`` tries (1 GiB)
DEPTH_MARGIN = 0.05  # ``search`` splits the swap tiers at each prefetch depth whose base plan is this close


def search(w: Workload, hw: HardwareProfile, cpu_budget: int, policy: ActivationPolicy | None = None,
           whatif: bool = True, ladder: bool = True) -> Plan:
    """The best plan (or, with ``policy``, the prediction for that policy) and what-ifs.

    More CPU memory must never predict a slower step, but the search is a heuristic, and what it
    fills the budget with (resident optimizer state without a spare copy waits for the norm under exact
    clipping; a cpu activation tier takes a share) can cost more than it saves. So with ``ladder`` it also plans the
    powers of two below the budget (down to ``MIN_RUNG`` or the first that does not fit: a full
    search each, about half of the planner's time) and keeps any of those plans, held to the memory
    it used (``resident_mem`` and ``act_cpu_mem`` caps, the weight cache taking the rest, which never
    slows a step), when it is faster. A plan is then never slower than the plan of any power of two
    below its budget, and those are monotonic (tested on a grid of budgets)."""
    costs = stage_costs(w)
    n_eval = 0
    asked = w  # the workload as given: the ladder plans lower budgets from it, not from a capped one

    def ev(pol, steps=SEARCH_STEPS):
        nonlocal n_eval
        n_eval += 1
        return evaluate(w, hw, costs, pol, cpu_budget, steps)

    if policy is not None:
        policy.check_layers(w.model.n_layer)
        best = ev(policy, REPORT_STEPS)
    else:
        L = w.model.n_layer
        tier_orders = [("gpu", "cpu", "ssd"), ("gpu", "ssd")] if hw.device == "cuda" else [("gpu", "ssd")]
        base = [ev(_assign(w, hw, costs, d, tier_orders[0], 0, cpu_budget)) for d in w.depths]
        # fuyou train's default too (every checkpoint on the compute device, nothing swapped): where the
        # budget is tight it needs less than checkpoints placed by room left beside an SSD swap's staging
        # buffers (a new-user pass: the plan refused 190 MiB that train ran in)
        base += [ev(ActivationPolicy.recompute_all(L, checkpoint="gpu", prefetch_depth=d)) for d in w.depths if d < 3]
        best = min(base, key=lambda e: (not e.feasible, e.step_time))
        # The swap split is searched at the best base's depth, and at any other whose base comes within
        # DEPTH_MARGIN of it (a new-user pass: 10.3 s planned at depth 1 alone, 10.4 s when the search
        # chose depth 2 from the bases and split the tiers at that depth only)
        near = sorted({e.policy.prefetch_depth for e in base if e.feasible and best.feasible
                       and e.step_time <= best.step_time * (1 + DEPTH_MARGIN)},
                      key=lambda d: d != best.policy.prefetch_depth)
        for depth in near:
            for tiers in tier_orders:
                memo: dict[int, Evaluation] = {}

                def f(k: int) -> float:
                    if k not in memo:
                        memo[k] = ev(_assign(w, hw, costs, depth, tiers, k, cpu_budget))
                    return memo[k].step_time

                K = 4 * L
                grid = sorted({round(K * x / 8) for x in range(9)})
                vals = [f(k) for k in grid]
                j = min(range(len(grid)), key=vals.__getitem__)
                lo, hi = grid[max(0, j - 1)], grid[min(len(grid) - 1, j + 1)]
                while hi - lo > 2:  # ternary refinement on the near-convex curve
                    m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
                    if f(m1) <= f(m2):
                        hi = m2
                    else:
                        lo = m1
                for k in range(lo, hi + 1):
                    f(k)
                cand = min(memo.values(), key=lambda e: e.step_time)
                if cand.step_time < best.step_time * (1 - 1e-9):
                    best = cand
        if best.feasible:
            best = ev(best.policy, REPORT_STEPS)
        if best.feasible and best.memory.resident_all and w.offload.resident_mem is None:
            w2, capped = _resident_choice(w, hw, costs, best, cpu_budget)
            n_eval += 9
            if w2 is not w:
                # The activation policy was searched with every resident stage waiting for the norm; with
                # fewer, another policy may be faster (searched again under the cap: more CPU memory must
                # not predict a slower step, issue 21).
                again = search(w2, hw, cpu_budget, None, whatif=False, ladder=False)
                n_eval += again.evaluations
                if again.feasible and again.best.step_time < capped.step_time:
                    capped = again.best
                    capped.policy = capped.policy.model_copy(update={"resident_mem": w2.offload.resident_mem})
            w, best = w2, capped
        if best.feasible and ladder:
            w, best, n = _from_lower_budgets(asked, w, hw, costs, best, cpu_budget)
            n_eval += n
    if best.feasible:
        best.policy = best.policy.model_copy(update={"cache_weights_stages": len(best.memory.cached_stages)})
    plan = Plan(w, hw, costs, best)
    if not best.feasible:
        plan.fixes, plan.cpu_need, plan.cpu_note = _fixes(w, hw, cpu_budget, best, policy)
        if plan.cpu_need:  # the least it needs, as the fix says, not what the fastest policy tried needed
            best.problems = [f"CPU memory: needs at least {format_size(plan.cpu_need, up=True)}{plan.cpu_note}, the "
                             f"budget is {format_size(cpu_budget)}" if p.startswith("CPU memory:") else p
                             for p in best.problems]
    elif whatif:
        sims = {"twice the SSDs": with_more_ssds(hw, 2),
                "twice the GPU throughput": hw.model_copy(update={k: 2 * getattr(hw, k) for k in (
                    "fwd_flops", "bwd_flops", *PROBED_RATES) if getattr(hw, k)}),
                "twice the CPU Adam throughput": hw.model_copy(update=dict(cpu_adam=2 * hw.cpu_adam))}
        if w.lora_params is not None:  # no CPU Adam in LoRA
            del sims["twice the CPU Adam throughput"]
        if hw.device == "cuda":
            sims["twice the PCIe bandwidth"] = hw.model_copy(update=dict(h2d=2 * hw.h2d, d2h=2 * hw.d2h))
        if w.ranks > 1:  # data parallel: gloo through CPU memory (the weight exchange), NVLink
            sims["twice the bandwidth between ranks"] = hw.model_copy(update=dict(
                gloo_broadcast=2 * hw.gloo_broadcast, gloo_reduce=2 * hw.gloo_reduce,
                gpu_link=2 * hw.gpu_link if hw.gpu_link else None))
        for name, h in sims.items():
            plan.whatif[name] = simulate_plan(w, costs, h, best.policy, best.memory, steps=REPORT_STEPS,
                                              commit=w.offload.commit == "cow" and w.offload.commit_steps == 1
                                              ).step_time + best.commit_s
        # The engine's own settings: clipping and crash safety (each re-planned: they change memory).
        off = w.offload
        variants = ({"train.grad_clip=none": dict(grad_clip=None)} if w.grad_clip is not None and w.lora_params is None
                    else {})
        if off.commit == "cow" and off.commit_steps != 1:
            variants["offload.commit_every=1 (commit every step)"] = dict(offload=off.model_copy(update={"commit_every": 1}))
        if off.commit == "cow":
            variants["offload.commit=none (no resume)"] = dict(offload=off.model_copy(update={"commit": "none"}))
        # compressed optimizer state (fuyou/optim/compressed.py): fewer bytes per step where the SSD binds
        for master, moments in (("fp32", "int8"), ("bf16", "int8")) if w.lora_params is None else ():
            fmt = StateFormat(master, moments)
            if fmt.bytes_per_param() < w.fmt.bytes_per_param():
                variants[f"optim.master={master} optim.moments={moments} ({fmt.bytes_per_param():.3g} B/param of "
                         f"state)"] = dict(fmt=fmt)
        if w.lora_params is not None and w.lora.base == "compute":  # LoRA: a base of half the bytes or less,
            # planned afresh (its dequantised stage takes device memory the policy may have given activations)
            for base in ("int8", "nf4", "nf4dq"):
                again = search(dataclasses.replace(w, lora=w.lora.model_copy(update={"base": base})), hw, cpu_budget,
                               None, whatif=False, ladder=False)
                n_eval += again.evaluations
                if again.feasible:
                    plan.whatif[f"lora.base={base} (the blocks' base weights as {base})"] = again.best.step_time
        for name, change in variants.items():
            w2 = dataclasses.replace(w, **change)
            # as many steps as the plan's own figure, so the commits are amortized in both (with fewer the
            # what-ifs left them out: the compressed state's was 35.1 s where planning it gives 35.9 s)
            e2 = evaluate(w2, hw, costs, best.policy, cpu_budget, REPORT_STEPS, clip_modes=False)
            if e2.feasible:
                plan.whatif[name] = e2.step_time
    plan.evaluations = n_eval
    return plan


def _from_lower_budgets(asked: Workload, w: Workload, hw: HardwareProfile, costs, best: Evaluation,
                        cpu_budget: int):
    """``search``'s ladder: the plan of each power of two below the budget (for the workload as
    ``asked``), held to the memory it used, evaluated under this budget; the fastest of them and of
    ``best`` (for ``w``) is kept. Returns (workload, evaluation, evaluations made)."""
    n, rung = 0, 1 << ((cpu_budget - 1).bit_length() - 1)
    while rung >= MIN_RUNG:
        lower = search(asked, hw, rung, None, whatif=False, ladder=False)
        n += lower.evaluations + 1
        if not lower.feasible:
            break
        low_off = lower.workload.offload.model_copy(update={"cpu_mem": rung})
        keep = to_keep(lower.best.policy, w.model.n_layer, w.checkpoint_default)
        share, _ = act_cpu_share(keep, low_off, cpu_tier_need(w.model, keep, w.batch, w.seq, w.csize, w.micro, w.whole))
        caps = {"resident_mem": lower.best.memory.resident_bytes, "act_cpu_mem": share if share else None}
        w2 = dataclasses.replace(asked, offload=lower.workload.offload.model_copy(update=caps))
        e = evaluate(w2, hw, costs, lower.best.policy, cpu_budget, REPORT_STEPS)
        if e.feasible and e.step_time < best.step_time * (1 - 1e-9):
            e.policy = e.policy.model_copy(update=caps)
            w, best = w2, e
        rung //= 2
    return w, best, n


def _resident_choice(w: Workload, hw: HardwareProfile, costs, best: Evaluation, cpu_budget: int):
    """Whether to hold less optimizer state in CPU memory than the budget allows. Resident stages read
    nothing from the SSD, but under exact clipping those without a spare copy (the memory left after them
    holds those copies) wait for the norm instead of updating during backward, so more of them can make
    the step longer. Tries caps in eighths of what fits (none, 1/8,
    ..., 7/8) for the chosen activation policy and keeps the fastest; ``search`` then searches the
    activation policy again under that cap. The chosen cap is the policy's ``resident_mem`` and
    ``--plan auto`` applies it."""
    first = evaluate(w, hw, costs, best.policy, cpu_budget, SEARCH_STEPS, clip_modes=False)  # on the same footing
    choices = [(first.step_time, w, None)]
    for frac in [i / 8 for i in range(8)]:
        cap = int(best.memory.resident_bytes * frac)
        w2 = dataclasses.replace(w, offload=w.offload.model_copy(update={"resident_mem": cap}))
        e2 = evaluate(w2, hw, costs, best.policy, cpu_budget, SEARCH_STEPS, clip_modes=False)
        if e2.feasible:
            choices.append((e2.step_time * (1 + 1e-9), w2, cap))  # ties keep what the budget gives
    _, w2, cap = min(choices, key=lambda c: c[0])
    if w2 is w:
        return w, best
    chosen = evaluate(w2, hw, costs, best.policy, cpu_budget, REPORT_STEPS)  # with the clipping figures
    chosen.policy = chosen.policy.model_copy(update={"resident_mem": cap})
    return w2, chosen


CPU_FIX = "a CPU memory budget of at least"
DEFAULT_PREFETCH = OffloadConfig.model_fields["prefetch_depth"].default  # fuyou train's


def leanest(w: Workload, hw: HardwareProfile, costs: list[StageCost], cpu_budget: int) -> ActivationPolicy:
    """The leanest plan's policy: every activation recomputed, at the least prefetch depth, with checkpoints on
    the SSD (staging buffers) or on the compute device (train's default), whichever fits the GPU (else needs the
    least GPU memory: a pass was told of a GPU 3.6x the one that fits), then needs the least CPU memory."""
    def need(pol: ActivationPolicy) -> tuple[bool, int, int]:
        p = memory_plan(w, hw, costs, pol, cpu_budget)[0]
        over = hw.device == "cuda" and p.device_required > hw.gpu_mem
        return over, p.device_required if over else 0, p.cpu_minimum

    return min((ActivationPolicy.recompute_all(w.model.n_layer, checkpoint=c, prefetch_depth=min(w.depths))
                for c in ("ssd", "gpu")), key=need)


def _fixes(w: Workload, hw: HardwareProfile, cpu_budget: int, failed: Evaluation,
           policy: ActivationPolicy | None = None) -> tuple[list[str], int | None, str]:
    """What would make an infeasible configuration fit: one sentence per way, the planned CPU budget (each
    rank's) that would, if CPU memory is short, and the settings that budget is for when they are not
    fuyou train's defaults (" (at offload.prefetch_depth=1; ...)"). The user's activation policy, if given,
    is the one planned; else the leanest."""
    costs = stage_costs(w)
    fixes = []
    lean = policy if policy is not None else leanest(w, hw, costs, cpu_budget)
    plan, ssd = memory_plan(w, hw, costs, lean, cpu_budget)
    gpu_need = min(plan.device_required, failed.memory.device_required)  # (the search's own plan may need less)

    @functools.cache
    def plain() -> MemoryPlan:  # what a plain fuyou train runs: recompute, checkpoints on the device, its depth
        return memory_plan(w, hw, costs, ActivationPolicy.recompute_all(
            w.model.n_layer, checkpoint="gpu", prefetch_depth=DEFAULT_PREFETCH), cpu_budget)[0]

    lean_flags = (f"--act-policy '{lean.describe(w.model.n_layer)}'" + (
        f" offload.prefetch_depth={lean.prefetch_depth}" if lean.prefetch_depth != DEFAULT_PREFETCH else ""))
    if hw.device == "cuda" and gpu_need > hw.gpu_mem:
        b = w.batch
        while b > 1:
            b //= 2
            w2 = dataclasses.replace(w, batch=b)
            if memory_plan(w2, hw, stage_costs(w2), lean, cpu_budget)[0].device_required <= hw.gpu_mem:
                fixes.append(f"batch {b} (of sequence {w.seq}) fits "
                             + ("the device budget of " if hw.gpu_budget else "the GPU's ")
                             + f"{format_size(hw.gpu_mem)}"
                             + (f" (with {lean_flags})" if policy is None else ""))
                break
        if hw.gpu_budget:  # train's own budget, not a card: raise it, at what a plain train runs as well
            lean_too = ""
            if policy is None:  # (the leanest policy's figure alone was refused by a plain train: a review)
                default = plain().device_required
                if default > gpu_need:
                    lean_too = (f" (fuyou train's default policy and prefetch depth {DEFAULT_PREFETCH}); "
                                f"{format_size(gpu_need, up=True)} with {lean_flags}")
                    gpu_need = default
            fixes.append(f"offload.gpu_mem of at least {format_size(gpu_need, up=True)}{lean_too}")
        else:
            need = card_for(hw, gpu_need)  # the card's memory, its headroom included
            gpus = [n for n, g in GPUS.items() if g["mem"] >= need]
            fixes.append(f"a GPU with at least {format_size(need, up=True)} of memory"
                         + (f" ({', '.join(gpus)})" if gpus else ""))
    need_cpu = plan.cpu_minimum
    note = ""
    if plan.cpu_required > cpu_budget:  # the planned budget (after the reserve); `fuyou plan` restates it as --cpu-mem
        if policy is None and lean.prefetch_depth != DEFAULT_PREFETCH:  # (train's minimum at its default differs)
            default = plain().cpu_minimum
            if default > need_cpu:  # (each rank's, as the figure it qualifies)
                note = (f" (with offload.prefetch_depth={lean.prefetch_depth}; fuyou train's default depth "
                        f"{DEFAULT_PREFETCH} needs {format_size(default, up=True)}"
                        + (" a rank)" if w.ranks > 1 else ")"))
        each = f" for the machine: {w.ranks} ranks' shares of {format_size(need_cpu, up=True)}" if w.ranks > 1 else ""
        fixes.append(f"{CPU_FIX} {format_size(need_cpu * w.ranks, up=True)} planned, after the reserve{each}{note}")
    if ssd > hw.ssd_capacity:
        off = w.offload
        for change, what in ((dict(commit_every=1), "offload.commit_every=1 (commit every step: two state copies, "
                                                    "not three)"),
                             (dict(commit="none"), "offload.commit=none (one state copy; no resume)")):
            if off.commit == "cow" and (change.get("commit") == "none" or off.commit_steps != 1):
                w2 = dataclasses.replace(w, offload=off.model_copy(update=change))
                need = memory_plan(w2, hw, costs, lean, cpu_budget)[1]
                if need <= hw.ssd_capacity:
                    fixes.append(f"{what} needs {format_size(need)} of SSD space")
                    break
        small = StateFormat(master="bf16", moments="int8")
        if w.lora_params is None and w.fmt.exact:  # (a 175B model fits one drive so, and it went unoffered: a pass)
            for change in ({}, dict(commit_every=1)):
                if change and (off.commit != "cow" or off.commit_steps == 1):
                    continue
                w2 = dataclasses.replace(w, fmt=small, offload=off.model_copy(update=change))
                need = memory_plan(w2, hw, stage_costs(w2), lean, cpu_budget)[1]
                if need <= hw.ssd_capacity:
                    fixes.append("optim.master=bf16 optim.moments=int8" + (" offload.commit_every=1" if change else "")
                                 + f" (compressed optimizer state: measure its quality, bench/compressed_quality.py) "
                                 f"needs {format_size(need)} of SSD space")
                    break
        per = hw.ssd_capacity / hw.ssd_drives
        fixes.append(f"at least {format_size(ssd)} of SSD space: {math.ceil(ssd / per)} drives of this size "
                     f"(--ssd {math.ceil(ssd / per)}xNAME or --ssd-capacity)")
    if not fixes:
        fixes.append("; ".join(failed.problems))
    return fixes, (need_cpu if plan.cpu_required > cpu_budget else None), note


SPLIT_TIE = 0.01   # splits within 1% of the fastest count as equally fast: the largest micro-batch wins
MAX_SPLIT = 16     # micro-batches per step the split search goes to once one split fits


def search_split(w: Workload, hw: HardwareProfile, cpu_budget: int, global_batch: int,
                 policy: ActivationPolicy | None = None, whatif: bool = True) -> Plan:
    """The best way to run ``global_batch`` sequences per optimizer step: each micro-batch size that
    divides it (largest first, so ``global_batch`` at once before any accumulation) is planned as in
    ``search``, and the fastest predicted step that fits is chosen; among splits within ``SPLIT_TIE``
    of it, the largest micro-batch (a GPU runs larger matmuls more efficiently than the cost model's
    constant rate says, and fewer micro-batches launch fewer kernels). The search stops after two
    splits in a row that fit and are not faster than the best so far by more than ``SPLIT_TIE``:
    smaller micro-batches leave more GPU memory for kept activations, but past that point they only
    add per-micro-batch work. Once a split fits, it goes no further than ``MAX_SPLIT`` micro-batches
    (a simulated step grows with them: 64 take seconds per candidate; the cost model's constant GPU
    rate does not charge small matmuls their inefficiency, so its gains there are not to be trusted);
    set ``--grad-accum`` for more. The plan lists every split tried and why it lost."""
    if global_batch < 1:
        raise ValueError("the global batch must be at least 1")
    tried, plans = [], {}
    worse = 0
    # data parallel: the micro-batches divide among the ranks
    for b in sorted((d for d in range(1, global_batch + 1) if global_batch % d == 0 and (global_batch // d) % w.ranks == 0),
                    reverse=True):
        if plans and global_batch // b > MAX_SPLIT:
            break
        w2 = dataclasses.replace(w, batch=b, grad_accum=global_batch // b)
        p = search(w2, hw, cpu_budget, policy, whatif=False, ladder=False)
        if not p.feasible:
            tried.append((b, global_batch // b, None, "; ".join(p.best.problems)))
            continue
        best_so_far = min((t for _, _, t, _ in tried if t is not None), default=math.inf)
        tried.append((b, global_batch // b, p.best.step_time, ""))
        plans[b] = p
        worse = worse + 1 if p.best.step_time >= best_so_far * (1 - SPLIT_TIE) else 0
        if worse >= 2:
            break
    if not plans:  # nothing fits: the plan of one sequence per micro-batch says why, with its fixes
        p = search(dataclasses.replace(w, batch=1, grad_accum=global_batch), hw, cpu_budget, policy, whatif=whatif)
        p.split, p.split_reason = tried, f"no split of {global_batch} sequences fits"
        return p
    fastest = min(t for _, _, t, _ in tried if t is not None)
    b = max(b for b, _, t, _ in tried if t is not None and t <= fastest * (1 + SPLIT_TIE))
    chosen = plans[b]
    t_b = chosen.best.step_time
    if whatif:  # the chosen split's full plan: the lower budgets' ladder and the what-ifs
        chosen = search(dataclasses.replace(w, batch=b, grad_accum=global_batch // b), hw, cpu_budget, policy)
    larger = [(bb, m, t, why) for bb, m, t, why in tried if bb > b]
    if b == global_batch:
        reason = f"the whole global batch fits in one micro-batch, and no split is {100 * SPLIT_TIE:g}% faster"
    elif not larger:  # data parallel: one micro-batch per rank is the largest split the ranks can share
        reason = (f"one micro-batch per GPU, the largest split the {w.ranks} GPUs can share, and no split is "
                  f"{100 * SPLIT_TIE:g}% faster")
    elif all(t is None for _, _, t, _ in larger):
        bb, m, _, why = min(larger)
        reason = f"the largest micro-batch that fits ({bb} x {m} does not: {why})"
    elif t_b <= fastest:
        reason = "the fastest predicted step of the splits that fit"
    else:
        reason = f"within {100 * SPLIT_TIE:g}% of the fastest split, with the largest micro-batch"
    chosen.split = [(bb, m, t, why if t is None else ("chosen" if bb == b else "")) for bb, m, t, why in tried]
    chosen.split_reason = reason
    return chosen


def global_batch_candidates(lo: int, hi: int, multiple: int = 1) -> list[int]:
    """The global batches ``search_global_batch`` tries in [lo, hi]: the ends and the powers of two between,
    each rounded up to a ``multiple`` (data parallel: of the ranks) within the range."""
    if not 1 <= lo <= hi:
        raise ValueError(f"a global batch range needs 1 <= low <= high, got {lo}-{hi}")
    out = {lo, hi}
    p = 1
    while p <= hi:
        if p >= lo:
            out.add(p)
        p *= 2
    m = multiple
    out = {m * -(-g // m) for g in out if m * -(-g // m) <= hi} | ({hi // m * m} if hi // m * m >= lo else set())
    if not out:
        raise ValueError(f"no global batch in {lo}-{hi} is a multiple of {m}")
    return sorted(out)


def search_global_batch(w: Workload, hw: HardwareProfile, cpu_budget: int, lo: int, hi: int,
                        policy: ActivationPolicy | None = None) -> Plan:
    """The global batch in [lo, hi] (``global_batch_candidates``) whose best split (``search_split``)
    trains the most tokens per second; the plan lists each candidate's rate. On a machine bound by the
    SSD or the CPU Adam, a larger global batch spreads the same state traffic over more tokens."""
    rates, best = [], None
    for g in global_batch_candidates(lo, hi, w.ranks):  # data parallel: batches the ranks can share
        p = search_split(w, hw, cpu_budget, g, policy, whatif=False)
        rate = p.workload.tokens / p.best.step_time if p.feasible else None
        rates.append((g, rate))
        if rate is not None and (best is None or rate > best[1]):
            best = (g, rate)
    g = best[0] if best else hi
    chosen = search_split(w, hw, cpu_budget, g, policy, whatif=True)
    chosen.batches = rates
    return chosen
