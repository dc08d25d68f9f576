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
import math
from dataclasses import dataclass, field

from fuyou.policy import to_keep
from fuyou.engine.budget import DEVICE_SLACK_FRACTION, MemoryPlan, offtier_bytes, plan_memory, policy_memory, weight_buffer_need
from fuyou.engine.layout import copies_needed
from fuyou.engine.budget import activation_bytes
from fuyou.planner.cost import StageCost, Workload, gpu_working_bytes, placement_bytes, stage_costs
from fuyou.planner.hardware import GPUS, HardwareProfile, with_more_ssds
from fuyou.policy import CLASSES, ActivationPolicy, BlockPolicy
from fuyou.planner.simulate import SimResult, simulate
from fuyou.units import format_size

SEARCH_STEPS = 2   # steps simulated per candidate (steady state from the second)
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
    clipping_step: float | None = None    # a step that clips after one that did (deferred updates)

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

    @property
    def feasible(self) -> bool:
        return self.best.feasible


def memory_plan(w: Workload, hw: HardwareProfile, costs: list[StageCost], policy: ActivationPolicy,
                cpu_budget: int) -> tuple[MemoryPlan, int]:
    """The engine's memory plan for this policy, and the SSD bytes it needs."""
    cuda = hw.device == "cuda"
    off = w.offload.model_copy(update=dict(prefetch_depth=policy.prefetch_depth, cpu_mem=cpu_budget,
                                           gpu_mem=hw.gpu_mem if cuda else None))
    pb = placement_bytes(w, costs, policy)
    # The activation items are the engine's own (budget.policy_memory), from the engine's view of the
    # policy, so a plan the planner accepts is one the engine accepts.
    keep = to_keep(policy, w.model.n_layer)
    extra_cpu, extra_dev, ckpt_bytes = policy_memory(w.model, keep, off, w.batch, w.seq, w.csize,
                                                     w.store.checksum_block, w.grad_accum)
    plan = plan_memory(
        w.numels, off, chunk=w.chunk, io_buffer_bytes=w.store.queue_depth * max(w.store.block_size, w.store.checksum_block),
        act=activation_bytes(w.model, w.batch, w.seq), csize=w.csize, gsize=w.gsize, deferred=w.grad_clip is not None,
        micro_batches=w.grad_accum, tied=w.tied, compute_on_cpu=not cuda,
        checkpoint_bytes=ckpt_bytes, working_bytes=gpu_working_bytes(w) if cuda else None,
        extra_cpu=extra_cpu, extra_device=extra_dev,
        offtier_bytes=offtier_bytes(w.model, keep, w.batch, w.seq, w.csize))
    ssd = sum(state_ssd_bytes(w, plan).values()) + pb["ssd"] + pb["ckpt_ssd"] + 64 * 1024**2
    return plan, ssd


def state_ssd_bytes(w: Workload, plan: MemoryPlan) -> dict[str, int]:
    """SSD space of the training state by kind: the fp32 state's copies (one to three per stage, by
    commit mode, interval and clipping: Note: [State copies] in engine/layout.py), compute weights
    not cached, and gradients saved for exact clipping."""
    off, clip = w.offload, w.grad_clip is not None
    every = off.commit_steps == 1
    state = sum(12 * n * copies_needed(off.commit, every, clip and i not in plan.resident_stages)
                for i, n in enumerate(w.numels))
    weights = sum(w.csize * n for i, n in enumerate(w.numels) if i not in plan.cached_stages)
    return {"optimizer state copies": state, "compute weights": weights,
            "saved gradients": w.gsize * sum(n for i, n in enumerate(w.numels) if i not in plan.resident_stages)
            if clip else 0}


def evaluate(w: Workload, hw: HardwareProfile, costs, policy: ActivationPolicy, cpu_budget: int,
             steps: int = SEARCH_STEPS, clip_modes: bool = True) -> Evaluation:
    """Memory plan and simulated step of one policy. With ``steps >= REPORT_STEPS`` (the reported
    plan) also the commits amortized over their interval and, with ``clip_modes``, the steps on
    which exact clipping triggers."""
    plan, ssd = memory_plan(w, hw, costs, policy, cpu_budget)
    problems = []
    if plan.cpu_required > cpu_budget:
        problems.append(f"CPU memory: needs {format_size(plan.cpu_required)}, the budget is {format_size(cpu_budget)}")
    if hw.device == "cuda" and plan.device_required > hw.gpu_mem:
        problems.append(f"GPU memory: one stage's working set needs {format_size(plan.device_required)}, the GPU has "
                        f"{format_size(hw.gpu_mem)}")
    if ssd > hw.ssd_capacity:
        problems.append(f"SSD space: needs {format_size(ssd)}, the drives hold {format_size(hw.ssd_capacity)}")
    ev = Evaluation(policy, plan, ssd, problems)
    if problems:
        return ev
    cached, resident = set(plan.cached_stages), set(plan.resident_stages)
    every = w.offload.commit == "cow" and w.offload.commit_steps == 1
    ev.sim = simulate(w, costs, hw, policy, cached, steps=steps, resident=resident, commit=every)
    if steps < REPORT_STEPS:
        return ev
    # The report's figures: crash safety amortized over the interval, and a triggered step.
    if w.offload.commit == "cow" and not every and resident:
        with_commit = simulate(w, costs, hw, policy, cached, steps=steps, resident=resident, commit=True)
        ev.commit_cost_s = max(0.0, with_commit.step_time - ev.sim.step_time)
        secs = w.offload.commit_secs
        ev.steps_per_commit = w.offload.commit_steps or max(1.0, secs / max(ev.sim.step_time, 1e-9))
        ev.commit_s = ev.commit_cost_s / ev.steps_per_commit
    if w.grad_clip is not None and clip_modes:
        ev.triggered_step, ev.clipping_step = (
            simulate(w, costs, hw, policy, cached, steps=steps, resident=resident, commit=every,
                     clip_mode=mode).step_time + ev.commit_s for mode in ("redo", "defer"))
    return ev


def _assign(w, hw, costs, depth: int, tiers: tuple[str, ...], k: int, cpu_budget: int) -> ActivationPolicy:
    """Checkpoints, then the first ``k`` candidates, each in the first tier of ``tiers`` with room."""
    L = w.model.n_layer
    base = ActivationPolicy.recompute_all(L, checkpoint="ssd", prefetch_depth=depth)
    plan, _ = memory_plan(w, hw, costs, base, cpu_budget)
    # what is kept on the GPU also grows the plan's allocator slack (a fraction of the device items)
    room = {"gpu": (hw.gpu_mem - plan.device_required) / (1 + DEVICE_SLACK_FRACTION) if hw.device == "cuda" else 0,
            "cpu": cpu_budget - plan.cpu_required - weight_buffer_need(w.numels, [], depth, w.tied, w.csize),
            "ssd": math.inf}
    if hw.device == "cpu":  # the compute device's memory is CPU memory: "gpu" and "cpu" are one tier
        room["gpu"], room["cpu"] = room["cpu"], 0
    blocks = {i: dict(checkpoint="ssd") for i in range(L)}

    def put(i: int, cls: str, nbytes: int) -> None:
        for t in tiers:
            if room[t] >= nbytes:
                room[t] -= nbytes
                blocks[i][cls] = t
                return

    M = w.grad_accum  # each micro-batch of a step keeps its own
    for i in reversed(range(L)):
        put(i, "checkpoint", M * costs[i + 1].act_bytes["checkpoint"])
    cands = [(i, cls) for cls in CLASSES for i in reversed(range(L))]
    for i, cls in cands[:k]:
        put(i, cls, M * costs[i + 1].act_bytes[cls])
    return ActivationPolicy(blocks={i: BlockPolicy(**b) for i, b in blocks.items()}, prefetch_depth=depth)


def search(w: Workload, hw: HardwareProfile, cpu_budget: int, policy: ActivationPolicy | None = None,
           whatif: bool = True) -> Plan:
    """The best plan (or, with ``policy``, the prediction for that policy) and what-ifs."""
    costs = stage_costs(w)
    n_eval = 0

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
        base = [ev(_assign(w, hw, costs, d, tier_orders[0], 0, cpu_budget)) for d in (1, 2, 3)]
        best = min(base, key=lambda e: (not e.feasible, e.step_time))
        if best.feasible:
            depth = best.policy.prefetch_depth
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
        if best.feasible and best.memory.resident_stages and w.offload.resident_mem is None:
            w, best = _resident_choice(w, hw, costs, best, cpu_budget)
            n_eval += 4
    if best.feasible:
        best.policy = best.policy.model_copy(update={"cache_weights_stages": len(best.memory.cached_stages)})
    plan = Plan(w, hw, costs, best)
    if not best.feasible:
        plan.fixes = _fixes(w, hw, cpu_budget, best)
    elif whatif:
        cached = set(best.memory.cached_stages)
        sims = {"twice the SSDs": with_more_ssds(hw, 2),
                "twice the GPU throughput": hw.model_copy(update=dict(fwd_flops=2 * hw.fwd_flops, bwd_flops=2 * hw.bwd_flops)),
                "twice the CPU Adam throughput": hw.model_copy(update=dict(cpu_adam=2 * hw.cpu_adam))}
        if hw.device == "cuda":
            sims["twice the PCIe bandwidth"] = hw.model_copy(update=dict(h2d=2 * hw.h2d, d2h=2 * hw.d2h))
        for name, h in sims.items():
            plan.whatif[name] = simulate(w, costs, h, best.policy, cached, steps=REPORT_STEPS,
                                         resident=set(best.memory.resident_stages),
                                         commit=w.offload.commit == "cow" and w.offload.commit_steps == 1
                                         ).step_time + best.commit_s
        # The engine's own settings: clipping and crash safety (each re-planned: they change memory).
        off = w.offload
        variants = {"train.grad_clip=none": dict(grad_clip=None)} if w.grad_clip is not None else {}
        if off.commit == "cow" and off.commit_steps != 1:
            variants["offload.commit_every=1 (commit every step)"] = dict(offload=off.model_copy(update={"commit_every": 1}))
        if off.commit == "cow":
            variants["offload.commit=none (no resume)"] = dict(offload=off.model_copy(update={"commit": "none"}))
        for name, change in variants.items():
            w2 = dataclasses.replace(w, **change)
            e2 = evaluate(w2, hw, costs, best.policy, cpu_budget, SEARCH_STEPS, clip_modes=False)
            if e2.feasible:
                plan.whatif[name] = e2.step_time
    plan.evaluations = n_eval
    return plan


def _resident_choice(w: Workload, hw: HardwareProfile, costs, best: Evaluation, cpu_budget: int):
    """Whether to hold less optimizer state in CPU memory than the budget allows. Resident stages read
    nothing from the SSD, but under exact clipping they wait for the norm instead of updating during
    backward, so more of them can make the step longer. Tries a few caps (none, a quarter, a half,
    three quarters of what fits) for the chosen activation policy and keeps the fastest; the chosen cap
    is the policy's ``resident_mem`` and ``--plan auto`` applies it. Not yet a guarantee that more CPU
    memory is never slower: the activation policy is searched once, under the whole budget (issue 21)."""
    first = evaluate(w, hw, costs, best.policy, cpu_budget, SEARCH_STEPS, clip_modes=False)  # on the same footing
    choices = [(first.step_time, w, None)]
    for frac in (0.0, 0.25, 0.5, 0.75):
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


def _fixes(w: Workload, hw: HardwareProfile, cpu_budget: int, failed: Evaluation) -> list[str]:
    """What would make an infeasible configuration fit: one sentence per way."""
    costs = stage_costs(w)
    fixes = []
    lean = ActivationPolicy.recompute_all(w.model.n_layer, checkpoint="ssd", prefetch_depth=1)
    plan, ssd = memory_plan(w, hw, costs, lean, cpu_budget)
    if hw.device == "cuda" and plan.device_required > hw.gpu_mem:
        b = w.batch
        while b > 1:
            b //= 2
            w2 = Workload(w.model, b, w.seq, w.offload, w.grad_accum, w.csize, w.store)
            if memory_plan(w2, hw, stage_costs(w2), lean, cpu_budget)[0].device_required <= hw.gpu_mem:
                fixes.append(f"batch {b} (of sequence {w.seq}) fits the GPU's {format_size(hw.gpu_mem)}")
                break
        need = plan.device_required
        gpus = [n for n, g in GPUS.items() if g["mem"] >= need]
        fixes.append(f"a GPU with at least {format_size(need)} of memory" + (f" ({', '.join(gpus)})" if gpus else ""))
    need_cpu = plan.cpu_required
    if need_cpu > cpu_budget:
        fixes.append(f"a CPU memory budget of at least {format_size(need_cpu)} (--cpu-mem)")
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
        per = hw.ssd_capacity / hw.ssd_drives
        fixes.append(f"at least {format_size(ssd)} of SSD space: {math.ceil(ssd / per)} drives of this size "
                     f"(--ssd {math.ceil(ssd / per)}xNAME or --ssd-capacity)")
    if not fixes:
        fixes.append("; ".join(failed.problems))
    return fixes
