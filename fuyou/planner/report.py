"""What ``fuyou plan`` prints: a summary, the swap schedule, a text timeline, JSON, a Gantt chart."""

from __future__ import annotations

import math
import shlex

from collections import defaultdict

from fuyou.launch import command as launch_command
from fuyou.policy import CLASSES
from fuyou.planner.search import Plan, ssd_parts, state_ssd_bytes
from fuyou.planner.simulate import Task
from fuyou.units import format_decimal, format_size

ROWS = ["compute", "h2d", "d2h", "ssd-read", "ssd-write", "cpu-adam", "io-cpu", "reduce", "exchange"]
LABELS = {"compute": "GPU", "h2d": "H2D", "d2h": "D2H", "ssd-read": "SSD read", "ssd-write": "SSD write",
          "cpu-adam": "CPU Adam", "io-cpu": "I/O CPU", "reduce": "grad sum", "exchange": "exchange"}


def _labels(plan: Plan) -> dict[str, str]:
    """The rows' names: the compute device's row is "GPU", or "compute" where the CPU computes (a CPU profile)."""
    return LABELS if plan.hardware.device == "cuda" else {**LABELS, "compute": "compute"}


#: rows only some plans have: the I/O threads' CPU time (a CPU compute device), data parallelism's transfers
OPTIONAL_ROWS = ("io-cpu", "reduce", "exchange")
#: queues named in the bottleneck line beyond the resources: data parallelism's transports
QUEUE_LABELS = {"gloo": "gloo (the ranks' transfers through CPU memory)", "link": "NVLink (the gradient sums)",
                "between-ranks": "the bandwidth between ranks (gloo through CPU memory, NVLink)"}


def _si(x: float) -> str:
    for unit, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.2f}{unit}"
    return f"{x:.0f}"


#: The hardware what-ifs and the resource each one doubles (``search``'s what-ifs).
WHATIF_RESOURCE = {"twice the SSDs": "ssd", "twice the GPU throughput": "compute",
                   "twice the CPU Adam throughput": "cpu-adam", "twice the PCIe bandwidth": "pcie",
                   "twice the bandwidth between ranks": "between-ranks"}


def _bottleneck(plan: Plan, busiest: str, step: float, cpu: str) -> str:
    """The resource the step waits on: the one whose doubling shortens the step most (the what-ifs),
    when that gains more than 2 %; else the busiest queue. The busiest is not always it: at GPT-3 175B
    on a 4090 the GPU is busy 110 s of a 137 s step, but twice the SSDs gains 1.23x and a twice faster
    GPU 1.11x (the SSD's traffic sits on the critical path between the GPU's stages)."""
    gains = {r: step / t for k, t in plan.whatif.items() if (r := WHATIF_RESOURCE.get(k)) and t > 0}
    name = busiest
    if gains and max(gains.values()) > 1.02:
        name = max(gains, key=gains.get)
        if plan.hardware.device != "cuda" and name in ("compute", "cpu-adam"):
            name = "cpu"  # one queue: the cores run compute and Adam
    label = QUEUE_LABELS.get(name, name) if name != "cpu" else f"{cpu} (CPU cores: compute + Adam)"
    if gains and name != busiest and not (name == "cpu" and busiest == "cpu"):
        label += f" (doubling it: {max(gains.values()):.2f}x; busiest: {QUEUE_LABELS.get(busiest, busiest)})"
    return label


def _window(plan: Plan) -> tuple[float, float, list[Task]]:
    sim = plan.best.sim
    tasks = [t for t in sim.last_step_tasks(rank0=True) if t.queue != "marker"]
    start = sim.step_ends[-2] if sim.steps > 1 else 0.0
    return start, max(t.end for t in tasks), tasks


SHAPE_KEYS = ("family", "n_layer", "d_model", "n_head", "kv_heads", "ff_dim", "vocab_size")


def summary(plan: Plan) -> dict:
    w, hw, ev = plan.workload, plan.hardware, plan.best
    out = {"model": w.model.preset or f"{w.model.family} {w.model.n_layer}x{w.model.d_model}",
           "parameters": w.stage_model.num_params, "batch": w.batch, "seq": w.seq, "grad_accum": w.grad_accum,
           "packed": w.packed, "hardware": hw.source, "feasible": ev.feasible, "cpu_budget_bytes": ev.memory.cpu_budget,
           "cpu_given_bytes": plan.cpu_given,
           # what a run given this report as --act-policy compares with its own (``policy.planned_workload``)
           "model_shape": {k: getattr(w.model, k) for k in SHAPE_KEYS},
           "optim": {"master": w.fmt.master, "moments": w.fmt.moments}}
    if plan.split:
        out["split"] = {"global_batch": w.batch * w.grad_accum, "reason": plan.split_reason,
                        "tried": [{"micro_batch": b, "micro_batches": m, "step_s": t, "note": why}
                                  for b, m, t, why in plan.split]}
    if plan.batches:
        out["global_batches"] = [{"global_batch": g, "tokens_per_s": r} for g, r in plan.batches]
    if not ev.feasible:
        return {**out, "problems": ev.problems, "fixes": plan.fixes}
    sim = ev.sim
    cpu = "cpu" if hw.device == "cpu" else "compute"
    busy_gpu = sim.busy.get("compute", 0.0)
    step = ev.step_time  # commits amortized
    off = w.offload
    out.update({
        "ssd_bytes": ev.ssd_bytes, "cpu_peak_bytes": ev.memory.cpu_required + ev.memory.cache_bytes + ev.memory.resident_bytes,
        "ssd_state_bytes": state_ssd_bytes(w, ev.memory),
        "ssd_parts_bytes": ssd_parts(w, ev.memory, plan.costs, ev.policy, hw.device == "cuda"),
        "gpu_peak_bytes": ev.memory.device_required if hw.device == "cuda" else 0,
        "step_s": step, "tokens_per_s": w.tokens / step,
        "model_tflops": w.model_flops / step / 1e12, "gpu_busy": busy_gpu / step,
        "precision": "bf16" if w.csize == 2 else "fp32",  # (train.precision; auto resolved on the device)
        "grad_clip": w.grad_clip, "lora": w.lora_params is not None,
        "lora_base": w.lora.base if w.lora_params is not None else None, "base_bytes": sum(w.weight_bytes),
        "triggered_step_s": ev.triggered_step, "clipping_step_s": ev.clipping_step,
        "commit": off.commit if off.commit != "cow" else f"every {off.commit_every}" + (
            " step(s)" if off.commit_steps else ""),
        "commit_s_per_step": ev.commit_s, "commit_cost_s": ev.commit_cost_s, "steps_per_commit": ev.steps_per_commit,
        "bottleneck": (f"commits ({100 * ev.commit_s / step:.0f}% of the step amortized: see crash safety)"
                       if ev.commit_s > sim.step_time else _bottleneck(plan, sim.bottleneck, step, cpu)),
        "busy_s": {k: v for k, v in sim.busy.items()}, "whatif_step_s": plan.whatif,
        "stages": len(w.numels), "cached_stages": len(ev.memory.cached_stages),
        "resident_stages": len(ev.memory.resident_all), "spare_stages": len(ev.memory.spare_all),
        "handoff_stages": ev.memory.handoff,
        "resident_spare": off.resident_spare, "resident_mem": machine_cap(plan, "resident_mem"), "gpus": w.ranks,
        "clip_schedule": off.clip_schedule,
        "prefetch_depth": ev.policy.prefetch_depth,
        "evaluations": plan.evaluations})
    if w.ranks > 1:
        out["data_parallel"] = _data_parallel(plan)
    out.update(_wear(plan, step))
    if plan.tokens_goal:
        steps = math.ceil(plan.tokens_goal / w.tokens)
        out.update({"tokens_goal": plan.tokens_goal, "steps_for_tokens": steps, "time_for_tokens_s": steps * step})
    return out


def _data_parallel(plan: Plan) -> dict:
    """``--gpus N``: what each rank runs and owns, and what crosses between the ranks per step."""
    w, ev = plan.workload, plan.best
    d = {"gpus": w.ranks, "micro_batches_per_gpu": w.micro, "cpu_budget_per_rank_bytes": ev.memory.cpu_budget,
         "sharded": w.sharded}
    if w.sharded:
        d["stages_per_rank"] = [sum(1 for o in w.owners if o == r) for r in range(w.ranks)]
        d["state_share"] = [sum(n for n, o in zip(w.numels, w.owners) if o == r) / sum(w.numels)
                            for r in range(w.ranks)]
        # each rank's gradient of every stage, summed into its owner (a tied head's embedding gradient: once more)
        d["gradient_sum_bytes"] = w.gsize * (sum(w.numels) + (w.numels[0] if w.tied else 0))
        # each streamed stage's new weights, to N-1 ranks; a cached one is in the cache the ranks share: a token
        cached = set(ev.memory.cached_stages)
        d["exchange_bytes"] = w.csize * sum(n for i, n in enumerate(w.numels) if i not in cached) * (w.ranks - 1)
        d["shared_cache_stages"] = len(cached)
    busy = defaultdict(float)
    for t in ev.sim.last_step_tasks():
        if t.resource in ("reduce", "exchange") and t.queue != "marker" and not t.rank:
            busy[t.resource] += t.dur
    d["gradient_sum_s"], d["exchange_s"] = busy["reduce"], busy["exchange"]
    return d


def _data_parallel_lines(plan: Plan, s: dict) -> list[str]:
    d = s.get("data_parallel")
    if not d:
        return []
    hw = plan.hardware
    if not d["sharded"]:
        return [f"data parallel       {d['gpus']} GPUs, {d['micro_batches_per_gpu']} micro-batch(es) each; LoRA: the "
                f"adapters' gradients are all-reduced (small); every rank loads the whole base, the cached part from "
                f"one cache the ranks share"]
    shares = ", ".join(f"rank {r}: {n} stages, {100 * f:.0f}%" for r, (n, f)
                       in enumerate(zip(d["stages_per_rank"], d["state_share"])))
    link = ("over NVLink" if hw.gpu_link else "through host memory over PCIe") if hw.device == "cuda" else "gloo, CPU memory"
    return [f"data parallel       {d['gpus']} GPUs, {d['micro_batches_per_gpu']} micro-batch(es) each; optimizer state "
            f"sharded by stage ({shares})",
            f"  between GPUs      gradient sums {format_size(d['gradient_sum_bytes'])} per GPU per step ({link}, "
            f"{d['gradient_sum_s']:.3g} s busy); weight exchange {format_size(d['exchange_bytes'])} (gloo through CPU "
            f"memory, {d['exchange_s']:.3g} s busy" + (f"; the {d['shared_cache_stages']} cached stages are in one cache "
                                                         f"the ranks share, a token each" if d["shared_cache_stages"] else "")
            + "); every rank loads every stage's weights"]


def lora_line(w) -> str:
    """What LoRA trains and keeps (the report's optimizer-state line)."""
    from fuyou.models.lora import resolve_targets
    from fuyou.units import format_size

    names = resolve_targets(w.model.family, w.lora.targets)
    where = "on the GPU" if w.cuda else "in CPU memory, where the compute is"  # (a CPU profile's plan said GPU: a pass)
    return (f"LoRA rank {w.lora.rank} on {', '.join(names)}: {_si(w.lora_params)} adapter parameters "
            f"({format_size(16 * w.lora_params)} with gradients and AdamW moments, {where}); the base is read-only "
            f"(no master, moments or gradients), {base_line(w)}")


def base_line(w) -> str:
    """How LoRA's base is stored and streamed (``lora.base``)."""
    from fuyou.units import format_size

    from fuyou.models.quant import FORMATS

    total = format_size(sum(w.weight_bytes))
    if w.lora.base != "compute":
        plain = format_size(w.csize * sum(w.numels))
        return (f"stored and streamed as {FORMATS[w.lora.base].description} matmul weights: {total} (in the compute "
                f"dtype {plain})")
    return f"stored and streamed in the compute dtype: {total}"


def _wear(plan: Plan, step: float) -> dict:
    """The optimizer state's format and the SSD writes of a step (the simulated step's writes, the
    commits amortized), per hour, and with the drives' rated endurance how long they last at that rate."""
    w, ev, hw = plan.workload, plan.best, plan.hardware
    per_step = ev.sim.step_written()
    resident = sum(w.numels[i] for i in ev.memory.resident_all)
    if w.offload.commit == "cow" and w.offload.commit_steps != 1 and resident:
        per_step += w.fmt.state_bytes(resident) / max(ev.steps_per_commit, 1.0)  # the commit of resident state
    if w.offload.commit == "cow" and w.lora_params is not None:  # a commit writes the adapters and their moments
        # (fp32, three copies: the run's summary counted them, the plan said 0 B a step: a pass)
        # (every rank writes its own copy: a pass found --gpus 2's plan at one rank's)
        per_step += 12 * w.lora_params * w.ranks / max(ev.steps_per_commit, 1.0)
    per_hour = per_step * 3600 / step
    fmt = w.fmt.describe() if w.lora_params is None else lora_line(w)
    parts = {k: {"read": r, "written": wr} for k, (r, wr) in ev.sim.step_traffic().items()}
    amortized = per_step - ev.sim.step_written()  # commits between steps (and LoRA's adapter files)
    if amortized > 0.5:
        parts.setdefault("commits", {"read": 0.0, "written": 0.0})["written"] += amortized
    return {"state_format": fmt, "ssd_write_per_step_bytes": per_step, "ssd_write_per_hour_bytes": per_hour,
            "ssd_step_write_bytes": ev.sim.step_written(),
            "ssd_read_per_step_bytes": ev.sim.step_read(), "ssd_traffic_bytes": parts,
            "ssd_redo_read_bytes": ev.redo_read_bytes,
            "ssd_clipping_step_bytes": ({"read": ev.clipping_traffic[0], "written": ev.clipping_traffic[1]}
                                        if ev.clipping_traffic else None),
            "ssd_redo_write_bytes": ev.redo_write_bytes, "ssd_tbw_bytes": hw.ssd_tbw,
            "ssd_life_hours": hw.ssd_tbw / per_hour if hw.ssd_tbw and per_hour else None}


def _traffic_line(s: dict, ranks: int = 1) -> str:
    """What a step reads from and writes to the SSDs, by what moves (the engine's ``ssd r/w`` a step; with
    several ranks, the machine's, all ranks' together, where train's progress line shows rank 0's)."""
    parts = [f"{k} {format_size(v['read'])}/{format_size(v['written'])}" for k, v in s["ssd_traffic_bytes"].items()
             if v["read"] or v["written"]]
    clipping = s.get("ssd_clipping_step_bytes")
    keeps = (f"; a step after one that clipped, while the norm stays above train.grad_clip (a fine-tune's first "
             f"steps, often): {format_size(clipping['read'])} read, {format_size(clipping['written'])} written"
             if clipping and (clipping["read"], clipping["written"]) != (s["ssd_read_per_step_bytes"],
                                                                        s["ssd_step_write_bytes"]) else "")
    return (f"SSD traffic         {format_size(s['ssd_read_per_step_bytes'])} read, "
            f"{format_size(s['ssd_write_per_step_bytes'])} written per step"
            + (f", the {ranks} ranks' together" if ranks > 1 else "")
            + (f" (read/written: {', '.join(parts)})" if parts else "") + keeps)


def _wear_line(s: dict) -> str:
    line = (f"SSD wear            {format_size(s['ssd_write_per_step_bytes'])} written per step, "
            f"{format_decimal(s['ssd_write_per_hour_bytes'])} per hour")
    if s.get("ssd_redo_write_bytes"):  # (the exact clipping's redo, which the figures above leave out)
        line += f" (a step that redoes its updates for clipping writes {format_size(s['ssd_redo_write_bytes'])} more)"
    if s.get("ssd_life_hours"):
        h = s["ssd_life_hours"]
        line += (f"; rated {s['ssd_tbw_bytes'] / 1e15:.3g} PB written: the drives last {h:,.0f} hours of training "
                 f"({h / 24:,.0f} days) at this rate")
    elif not s["ssd_write_per_step_bytes"] and s.get("ssd_tbw_bytes"):
        line += f": training does not spend the drives' rated {s['ssd_tbw_bytes'] / 1e15:.3g} PB"
    else:
        line += " (give --ssd-tbw for how long the drives last)"
    return line


def _spilled(plan: Plan) -> dict[int, set[str]]:
    """By block stage, what the policy puts in the cpu tier that overflows to the SSD in some micro-batch (the
    share, offload.act_cpu_mem, full by then: ``cost.kept_in_forward``, as the engine's swapper does)."""
    from fuyou.engine.budget import ACT_SHARE
    from fuyou.planner.cost import FORWARD_ORDER, kept_in_forward

    w, mem = plan.workload, plan.best.memory
    if ACT_SHARE not in mem.cpu_items:
        return {}
    out: dict[int, set[str]] = defaultdict(set)
    kept = kept_in_forward(w, plan.costs, plan.best.policy, mem.cpu_items[ACT_SHARE], plan.hardware.device == "cuda")
    for (stage, _), items in kept.items():
        b = plan.best.policy.block(stage - 1)
        for what, tier, _ in items:
            if tier != "ssd":
                continue
            if what == "all":  # a block kept whole: its classes, in the cpu tier (shown as "cpu" before: a pass)
                out[stage].update(cls for cls in FORWARD_ORDER if getattr(b, cls) == "cpu")
            elif (b.checkpoint if what == "checkpoint" else getattr(b, what, None)) == "cpu":
                out[stage].add(what)
    return out


def schedule_rows(plan: Plan) -> list[dict]:
    """Per stage: the policy's placement, where weights come from, and each resource's busy time."""
    _, _, tasks = _window(plan)
    busy: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for t in tasks:
        busy[t.stage][t.resource] += t.dur
    cached = set(plan.best.memory.cached_stages)
    resident = set(plan.best.memory.resident_all)
    spilled = _spilled(plan)
    rows = []
    for c in plan.costs:
        row = {"stage": c.name, "weights": "cpu cache" if c.index in cached else "ssd",
               "optimizer state": "cpu (+ssd copy)" if c.index in resident else "ssd"}
        if plan.workload.sharded:  # data parallel: the rank that holds and updates it
            row["owner"] = plan.workload.owners[c.index]
        if c.kind == "block":
            b = plan.best.policy.block(c.index - 1)
            dtype = b.checkpoint_dtype or plan.workload.checkpoint_default
            row.update({"checkpoint": b.checkpoint, "checkpoint_dtype": dtype, **{k: getattr(b, k) for k in CLASSES}})
            if spilled.get(c.index):  # (all "cpu" while 11 of 14.5 MiB went to the SSD: a pass)
                row["overflow_to_ssd"] = sorted(spilled[c.index])  # (its own key: the tiers stay the policy's)
        row["busy_s"] = {r: busy[c.name].get(r, 0.0) for r in ROWS}
        rows.append(row)
    return rows


def timeline(plan: Plan, width: int = 100) -> str:
    """One step as text: a row per resource, one column per 1/width of the step."""
    t0, t1, tasks = _window(plan)
    span = max(t1 - t0, 1e-12)
    grid = {r: [0.0] * width for r in ROWS}
    mark = {r: [" "] * width for r in ROWS}
    for t in tasks:
        a, b = (max(t.start, t0) - t0) / span * width, (t.end - t0) / span * width
        for col in range(int(a), min(width, int(b) + 1)):
            cover = min(b, col + 1) - max(a, col)
            if cover > 0:
                grid[t.resource][col] += cover
                if t.resource == "compute":
                    mark[t.resource][col] = "F" if t.name.startswith("forward ") else (
                        "H" if "head" in t.name else "B")
    labels = _labels(plan)
    lines = [f"one step, {span:.3g} s from the end of the previous step's compute "
             f"(F forward, H head, B recompute+backward; # busy, + partly busy):"]
    for r in ROWS:
        if r in OPTIONAL_ROWS and not any(grid[r]):
            continue
        cells = "".join((mark[r][i] if r == "compute" and mark[r][i] != " " else "#") if v >= 0.5 else
                        ("+" if v > 0.02 else " ") for i, v in enumerate(grid[r]))
        lines.append(f"{labels[r]:>9} |{cells}|")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.3g} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    if seconds >= 60:
        return f"{seconds / 60:.3g} min"
    return f"{seconds:.3g} s"


PROBE_SHAPE_RATIO = 2  # a plan's block this far (d_model or tokens a micro-batch) from the probe's is flagged
# (at 2.7x the width the extrapolation was 4.4x off on the CPU: a new-user pass, GPT-3 1.3B from a 768-wide probe)


def _probe_shape_note(plan: Plan) -> str:
    """A probe times one block shape; its FLOP/s are extrapolated to the plan's. Small blocks run far
    below a machine's throughput (per-call overheads) and large ones near it, so a plan far from the
    probed shape can be off many times (a new-user pass: 42 s predicted, 0.41 s measured, from a
    probe of a 64-wide block at 128 tokens)."""
    w = plan.workload
    timed, planned = plan.hardware.compute_precision, "bf16" if w.csize == 2 else "fp32"
    slow = ("; this device has no native bf16, where bf16 runs tens of times slower than fp32"
            if planned == "bf16" and plan.hardware.bf16_native is False else "")
    dtype = (f"\nnote: the probe timed its block in {timed}, this plan computes in {planned} (train.precision): its "
             f"compute times are {timed}'s{slow}; for a faithful plan run `fuyou probe ... --precision {planned}`"
             if timed and timed != planned else "")
    probed = plan.hardware.compute_block
    if not probed:
        return dtype
    d, tokens = w.model.d_model, w.batch * w.seq
    far = max(d / probed[0], probed[0] / d, tokens / probed[1], probed[1] / tokens)
    if far < PROBE_SHAPE_RATIO:
        return dtype
    return dtype + (f"\nnote: the probe timed a block of width {probed[0]} at {probed[1]} tokens, this plan's is {d} "
                    f"wide at {tokens} tokens: its compute times are extrapolated and may be far off; for a faithful "
                    f"plan run `fuyou probe --model <this model> --batch {w.batch} --seq {w.seq}`")


def text(plan: Plan) -> str:
    s = summary(plan)
    labels = _labels(plan)
    w = plan.workload
    head = (f"fuyou plan: {s['model']} ({_si(s['parameters'])} parameters), batch {w.batch} x seq {w.seq}"
            + (f" x {w.grad_accum} micro-batches" if w.grad_accum > 1 else "")
            + (" (rows pack examples: attention takes a mask)" if w.packed else "")
            + (f" on {w.ranks} GPUs" if w.ranks > 1 else "") + f"\nhardware: {s['hardware']}"
            + _cpu_head(plan, s) + _probe_shape_note(plan))
    if not s["feasible"]:
        return (head + "\n" + "".join(line + "\n" for line in _split_lines(s)) + "\nDOES NOT FIT:\n"
                + "\n".join(f"  - {p}" for p in s["problems"])
                + "\nwhat would make it fit:\n" + "\n".join(f"  - {f}" for f in s["fixes"]) + "\n")
    out = [head, *_split_lines(s), "",
           f"predicted step      {s['step_s']:.3g} s   ({s['tokens_per_s']:.4g} tokens/s, {s['model_tflops']:.3g} model "
           f"TFLOPS, {labels['compute']} busy {100 * s['gpu_busy']:.0f}%)",
           f"bottleneck          {s['bottleneck']}   (busy per step: "
           + ", ".join(f"{labels.get(k, k)} {v:.3g} s" for k, v in s["busy_s"].items()) + ")",
           *([f"{_si(s['tokens_goal']) + ' tokens':<20}{_duration(s['time_for_tokens_s'])}   ({s['steps_for_tokens']} "
               f"step{'s' if s['steps_for_tokens'] != 1 else ''} of {_si(w.tokens)} tokens)"]
             if "tokens_goal" in s else []),
           *_data_parallel_lines(plan, s),
           _clip_line(s, "the GPU" if plan.hardware.device == "cuda" else "the CPU"),
           _commit_line(s),
           "what if             " + "; ".join(f"{k.replace('GPU', labels['compute'])}: {v:.3g} s "
                                                  f"({s['step_s'] / v:.2f}x)" for k, v in s["whatif_step_s"].items()),
           f"optimizer state     {s['state_format']}; compute in {s['precision']} (train.precision)",
           _traffic_line(s, plan.workload.ranks),
           _wear_line(s),
           f"SSD footprint       {format_size(s['ssd_bytes'])} (" + ", ".join(
               f"{k} {format_size(v)}" for k, v in s["ssd_parts_bytes"].items() if v) + ")",
           (f"CPU peak            {format_size(s['cpu_peak_bytes'])} (weight cache: {s['cached_stages']} of "
            if plan.workload.ranks == 1 else
            f"CPU peak per rank   {format_size(s['cpu_peak_bytes'])} (weight cache: {s['cached_stages']} of ")
           + f"{len(plan.costs)} stages; optimizer state resident: {s['resident_stages']}"
           + (" on their owners" if plan.workload.ranks > 1 else "")
           + (f"; {s['handoff_stages']} stages' weights kept from backward for their updates, which then read no "
              f"master" if s.get("handoff_stages") else "") + ")",
           f"GPU peak            {format_size(s['gpu_peak_bytes'])}" if plan.hardware.device == "cuda" else
           "GPU peak            - (CPU compute device: its memory is in the CPU figure)",
           f"prefetch depth      {s['prefetch_depth']}   ({s['evaluations']} configurations simulated)",
           _train_line(plan, s), "",
           plan.best.memory.describe(), "", "swap schedule (busy seconds per resource in one step):"]
    rows = schedule_rows(plan)
    shown = [x for x in ROWS if x not in OPTIONAL_ROWS or any(r["busy_s"][x] for r in rows)]
    hdr = f"{'stage':<10} {'ckpt':<8} " + " ".join(f"{c:<9}" for c in CLASSES) + f" {'weights':<9} {'adam st.':<8} " + \
        " ".join(f"{labels[r]:>9}" for r in shown)
    out += [hdr, "-" * len(hdr)]
    for r in rows:
        over = set(r.get("overflow_to_ssd", ()))
        cls = " ".join(f"{'cpu>ssd' if c in over else r.get(c, '-'):<9}" for c in CLASSES)
        state = "-" if plan.workload.lora_params is not None else "cpu" if r["optimizer state"].startswith("cpu") else "ssd"
        state += f"@r{r['owner']}" if "owner" in r else ""
        ckpt = ("cpu>ssd" if "checkpoint" in over else  # (with /bf16 it broke the column: the dtype is the rest's)
                r.get("checkpoint", "-") + ("/bf16" if r.get("checkpoint_dtype") == "bf16" else ""))
        out.append(f"{r['stage']:<10} {ckpt:<8} {cls} {r['weights']:<9} {state:<8} "
                   + " ".join(f"{r['busy_s'][x]:>9.3g}" for x in shown))
    if any(r.get("overflow_to_ssd") for r in rows):
        out.append("cpu>ssd: kept in the cpu tier while its share (offload.act_cpu_mem) has room; what does not fit "
                   "overflows to the SSD")
    out += ["", timeline(plan), ""]
    return "\n".join(out)


def _cpu_head(plan: Plan, s: dict) -> str:
    if not plan.cpu_given:
        return ""
    n = plan.workload.ranks
    if n == 1:
        return (f"; CPU memory {s['cpu_budget_bytes'] / 2**30:.2f} of {plan.cpu_given / 2**30:.2f} GiB planned "
                f"(--cpu-reserve; give fuyou train the planned figure)")
    return (f"; CPU memory {s['cpu_budget_bytes'] / 2**30:.2f} GiB planned for each of {n} ranks, of "
            f"{plan.cpu_given / 2**30:.2f} GiB for the machine (--cpu-reserve per rank; give fuyou train "
            f"{train_cpu_mem(n * s['cpu_budget_bytes'])}, which torchrun's ranks share)")


def train_cpu_mem(nbytes: int) -> str:
    """fuyou train's --cpu-mem for a planned budget: enough (188MiB was printed for a plan of 188.86 MiB; the
    header rounded to the nearest, 0.01 GiB under the "train as planned" line's: a pass), and no more than a KiB
    over, in the largest unit that says it exactly: the engine gives what a budget has spare to the weight cache
    and the resident state, so a budget rounded up to the MiB ran another layout than the plan's (a hostile pass:
    226.54 MiB planned one resident stage, 227MiB ran two)."""
    kib = -(-nbytes // 2**10)
    unit, size = next((u, f) for u, f in (("GiB", 2**20), ("MiB", 2**10), ("KiB", 1)) if kib % f == 0)
    return f"--cpu-mem {kib // size}{unit}"


def _split_lines(s: dict) -> list[str]:
    """The global batch and its split, when the planner chose them (``--global-batch``)."""
    lines = []
    if "global_batches" in s:
        rates = "; ".join(f"{d['global_batch']}: " + (f"{d['tokens_per_s']:.4g} tokens/s" if d["tokens_per_s"]
                                                        else "does not fit") for d in s["global_batches"])
        lines.append(f"global batches      {rates} (the most tokens/s is chosen)")
    if "split" in s:
        sp = s["split"]
        if s["feasible"]:
            lines.append(f"global batch        {sp['global_batch']} = {s['grad_accum']} micro-batch"
                         f"{'es' if s['grad_accum'] > 1 else ''} of {s['batch']}: {sp['reason']}")
        else:
            lines.append(f"global batch        {sp['global_batch']}: {sp['reason']}")
        lines.append("splits tried        " + "; ".join(
            f"{d['micro_batch']}x{d['micro_batches']} " + (f"{d['step_s']:.3g} s" if d["step_s"] is not None
                                                            else f"does not fit ({d['note']})")
            for d in sp["tried"]))
    return lines


def _train_line(plan: Plan, s: dict) -> str:
    """The fuyou train settings that run this plan (the ones that differ from train's defaults): without
    them train may need more memory than the plan (a new-user pass: the plan fitted at prefetch depth 1,
    train refused at its default 2)."""
    pol = plan.best.policy
    n = plan.workload.model.n_layer
    from fuyou.data.config import DataConfig
    from fuyou.train.config import TrainConfig

    # fuyou train's --cpu-mem is the machine's, which torchrun's ranks share (this plan is one rank's)
    opts = [train_cpu_mem(s["cpu_budget_bytes"] * plan.workload.ranks)]
    w = plan.workload
    if plan.split:  # the planner's split of --global-batch (following the line with train.global_batch was refused)
        opts += [f"train.micro_batch_size={w.batch}", f"train.grad_accum={w.grad_accum}"]
    else:  # the batch and sequence planned, where train's defaults differ (a new-user pass: the line left out
        # --batch 1 --seq 64, and train ran 16 x 128 at the same budget, refused)
        opts += [f"train.micro_batch_size={w.batch}"] * (w.batch != TrainConfig.model_fields["micro_batch_size"].default)
        opts += [f"train.grad_accum={w.grad_accum}"] * (w.grad_accum != 1)
    if w.seq != DataConfig.model_fields["seq_len"].default:
        opts.append(f"data.seq_len={w.seq}")
    if pol.prefetch_depth != 2:
        opts.append(f"offload.prefetch_depth={pol.prefetch_depth}")
    for k in ("resident_mem", "act_cpu_mem"):  # the plan's own caps (a pass: in --json, not on this line)
        v = machine_cap(plan, k)
        if v is not None:
            unit = next(((u, f) for u, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if v % f == 0), None)
            opts.append(f"offload.{k}=" + (f"{v // unit[1]}{unit[0]}" if unit else str(v)))  # (exact)
    # the settings given to plan (commit, clipping, state format, LoRA, caps): the plan's time and memory are theirs
    # (quoted for a shell where needed: lora.targets=[q_proj, v_proj] was two words)
    opts += [shlex.quote(o) for o in plan.train_settings
             if not any(x.startswith(o.partition("=")[0] + "=") for x in opts)]
    human = pol.describe(n)
    if human != "recompute":
        opts.append(f"--act-policy {shlex.quote(human)}" if len(human) <= 120 else "--act-policy FILE (fuyou plan ... "
                                                                                    "--json > FILE)")
    launch = (f"{launch_command(plan.workload.ranks)} ..." if plan.workload.ranks > 1
              else "fuyou train ...")  # (a pass: --gpus 2's line named no torchrun)
    auto = " (or --plan auto, which measures this machine)" if plan.workload.ranks == 1 else ""  # (one process's)
    return f"train as planned    {launch} " + " ".join(opts) + auto


def _clip_line(s: dict, device: str = "the GPU") -> str:
    if s.get("lora"):
        clip = "none" if s["grad_clip"] is None else f"exact at {s['grad_clip']:g}"
        return f"clipping            {clip}: the adapters' gradients and update are on {device}, after backward"
    if s["grad_clip"] is None:
        return "clipping            none (train.grad_clip=none): updates overlap backward"
    n, res = s["stages"], s["resident_stages"]
    unclipped = s["whatif_step_s"].get("train.grad_clip=none")
    # What exact clipping costs a step that does not clip: the saved gradients' SSD writes, the resident
    # stages' updates after backward.
    cost = (f"; a step that does not clip takes {s['step_s'] - unclipped:.3g} s more than with train.grad_clip=none"
            if unclipped and s["step_s"] > 1.02 * unclipped else "")
    line = f"clipping            exact at {s['grad_clip']:g}, "
    schedule = s.get("clip_schedule", "auto")
    if schedule == "defer":
        return line + (f"deferred (offload.clip_schedule=defer): every update waits for the norm, after backward, "
                       f"its gradient saved to the SSD or held in CPU memory until then{cost}")
    # A resident stage's state is updated in CPU memory; without a spare copy there is no previous copy to
    # redo the update from, so it waits for the norm (fuyou/engine/engine.py, Note: [Spare copies]).
    spare = s.get("spare_stages", 0)
    waits = res - spare
    cap = s.get("resident_mem")
    why = ("offload.resident_spare=false" if not s.get("resident_spare", True) else
           "the budget leaves no room for one" if cap is None else
           f"the budget, with resident state capped at offload.resident_mem={format_size(cap)}, leaves no room for one")
    if waits == n:
        return line + (f"no update overlaps backward: all {n} stages' state is resident in CPU memory, which keeps no "
                       f"previous copy to redo an update from (no spare copy: {why}), so every update waits for the "
                       f"norm ({s['step_s']:.3g} s a step whether or not it clips){cost}")
    parts = [f"the {n - res} of {n} stages whose state is on the SSD"] if n - res else []
    if spare:
        parts.append(f"the {spare} resident stage{'s' if spare != 1 else ''} with a spare copy in CPU memory")
    how = ("speculative: updates overlap backward" if not waits and not spare else
           f"speculative for {' and '.join(parts)}" if not waits else
           f"speculative for {' and '.join(parts)}; the {waits} resident stage{'s' if waits != 1 else ''} "
           f"without a spare copy ({why}) "
           f"{'waits' if waits == 1 else 'wait'} for the norm (no previous copy to redo from), "
           f"{'its update' if waits == 1 else 'their updates'} after backward")
    later = ("later ones while it keeps clipping defer them" if schedule == "auto" else
             "later ones redo them too (offload.clip_schedule=speculate)")
    return line + (f"{how}; the first step whose norm exceeds it redoes the speculative updates "
                   f"({s['triggered_step_s']:.3g} s), {later} ({s['clipping_step_s']:.3g} s){cost}")


def _commit_line(s: dict) -> str:
    if s["commit"] == "none":
        return "crash safety        none (offload.commit=none): a killed run cannot be resumed"
    per = s["commit_s_per_step"]
    if s["commit"] in ("every 1 step(s)", "every 1"):
        return "crash safety        commits every step: their writes are in the step time above"
    if not s["commit_cost_s"]:
        what = ("a commit writes the adapters and their moments" if s.get("lora") else
                "its writes of the resident state overlap the steps after it" if s["resident_stages"] else
                "no state is held in CPU memory: a commit writes its record, the state is on the SSD")
        return (f"crash safety        commits {s['commit']} (every {s['steps_per_commit']:,.0f} steps): no cost beyond "
                f"the step ({what})")
    return (f"crash safety        commits {s['commit']}: {per:.3g} s per step amortized ({100 * per / s['step_s']:.1f}% "
            f"of the step; one commit {s['commit_cost_s']:.3g} s, every {s['steps_per_commit']:,.0f} steps)")


def machine_cap(plan: Plan, key: str) -> int | None:
    """The plan's ``resident_mem`` or ``act_cpu_mem`` cap as train takes it: the machine's, which train divides
    among its ranks (``Dist.rank_config``; the plan is one rank's: --gpus 2's cap, given to train, was halved, and
    a quarter of the planned state stayed on the SSD: a pass)."""
    v = getattr(plan.best.policy, key)
    return None if v is None else v * plan.workload.ranks


def to_json(plan: Plan) -> dict:
    s = summary(plan)
    if not s["feasible"]:
        return s
    t0, _, tasks = _window(plan)
    policy = plan.best.policy.model_copy(update={k: machine_cap(plan, k) for k in ("resident_mem", "act_cpu_mem")})
    return {**s, "policy": policy.model_dump(mode="json"),
            "memory": {"cpu": plan.best.memory.cpu_items, "device": plan.best.memory.device_items,
                       "cache_bytes": plan.best.memory.cache_bytes,
                       "resident_bytes": plan.best.memory.resident_bytes},
            "schedule": schedule_rows(plan),
            "tasks": [{"name": t.name, "resource": t.resource, "start": t.start - t0, "end": t.end - t0} for t in tasks]}


def plot(plan: Plan, path: str) -> bool:
    """A Gantt chart of one step across the resources; False (and a note) when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t0, t1, tasks = _window(plan)
    colors = {"forward": "#4C72B0", "backward": "#DD8452", "head": "#8172B2", "weights": "#55A868",
              "act": "#C44E52", "grad": "#937860", "adam": "#DA8BC3"}

    def color(t: Task) -> str:
        for k in ("head", "forward", "backward", "act", "grad", "adam", "weights"):
            if k in t.name:
                return colors[k]
        return "#8C8C8C"

    fig, ax = plt.subplots(figsize=(14, 4.5))
    rows = [r for r in ROWS if r not in OPTIONAL_ROWS or any(t.resource == r for t in tasks)]
    for y, r in enumerate(reversed(rows)):
        for t in (t for t in tasks if t.resource == r):
            ax.broken_barh([(t.start - t0, t.dur)], (y + 0.1, 0.8), facecolors=color(t), edgecolor="none")
    ax.set_yticks([y + 0.5 for y in range(len(rows))], [_labels(plan)[r] for r in reversed(rows)])
    ax.set_xlim(0, t1 - t0)
    ax.set_xlabel("seconds into the step")
    s = summary(plan)
    ax.set_title(f"{s['model']}, batch {plan.workload.batch} x {plan.workload.seq}: step {s['step_s']:.3g} s, "
                 f"{s['model_tflops']:.3g} TFLOPS, bottleneck {s['bottleneck']}")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], loc="upper right", ncol=7, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
