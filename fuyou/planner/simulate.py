"""A discrete-event simulation of training steps as tasks on resources, mirroring the engine.

Tasks carry the engine's trace names and resources (``fuyou.engine.trace.RESOURCES``): ``compute``,
``h2d``, ``d2h``, ``ssd-read``, ``ssd-write``, ``cpu-adam``. Each task runs on a *queue* (a physical
device that serves one task at a time, first come first served by the time a task became ready):

* ``ssd``: the SSD reads and writes share one device (the drives of a RAID-0 act as one). A read of
  b bytes takes b / read bandwidth, a write b / write bandwidth, both times the profile's measured
  ``ssd_mixed_factor`` (1.0: pure time-sharing). Simplest honest model: the drives' measured
  sequential rates, time-shared.
* ``h2d`` and ``d2h``: PCIe, one queue per direction.
* ``compute``: the GPU; on a CPU-only profile ``compute`` and the AdamW kernels (``cpu-adam``) run on
  the same cores and share one queue ``cpu`` (both use every core; time-slicing them costs the sum).
* ``cpu-adam``: the optimizer worker's kernels (one worker thread, jobs in order).
* ``io-cpu`` (CPU profile only): the store's CPU time per byte (``ssd_cpu_s_per_gb``, probed) of
  every SSD transfer, on the shared ``cpu`` queue after the transfer.

The optimizer's streamed SSD tasks run at ``adam_io_efficiency`` of the store's rates: the probe
measures one out-of-core AdamW job of the model's block and ``simulate_job`` predicts the same job,
so the factor is what this model of a job leaves out (its fill and drain at low queue depth, its
per-request work), measured, not fitted to training runs.

What one step does (``fuyou/engine/engine.py``), for each position of the step's stage order
(forward 0..S-2, the embedding again for a tied head, the head, backward S-2..0), layer-major: a
stage's weights are loaded once and it computes every micro-batch (``grad_accum``) before the next:

* load: wait for the stage's update of the previous step (no stale weights), read its weights from
  SSD unless cached, copy them host->device (CUDA); a load starts when the compute ``depth + 1``
  positions earlier has finished (the prefetch window), and the window starts afresh each step;
* activations a policy swaps leave after the block's forward (D2H, then SSD write) and come back for
  its backward (SSD read, then H2D) inside the same window;
* compute: forward; the head's forward+backward; backward = recompute (less the kept classes) +
  backward, once per micro-batch; then the stage's gradient (summed over the micro-batches) D2H (CUDA)
  and one AdamW job;
* AdamW job: chunks pipelined as in ``OutOfCoreAdamW`` (read the state, 12 B/param in fp32; kernel at the
  format's rate, ``compressed.KERNEL_SPEED``; write the state and
  the compute copy when not cached), jobs one after another; backward blocks when
  ``max_pending_updates`` jobs wait (the queue's back-pressure). A stage whose optimizer state is
  resident in CPU memory runs kernels only and is *updated* when they (and its weight writes) are
  done; its state is written to SSD only by a commit;
* exact clipping (``Workload.grad_clip``): a stage's gradient is also written to SSD for a possible
  redo; a resident stage's job waits for the norm (the end of backward) with its gradient in CPU
  memory, unless it has a spare copy of its state (``spare``), when it speculates like the others,
  in CPU memory; when the norm exceeds the threshold every speculative job is redone after backward
  (``clip_mode='redo'``, reading state and gradient; a spare stage's kernels only), or, after a step
  that clipped, every job waits for the norm and reads its gradient back (``'defer'``);
* a commit (``commit=True``: every simulated step commits) is a job after the step's updates that
  writes the resident stages' state (its bytes); later jobs wait for it, as the engine's worker does.
"""

from __future__ import annotations

import gc
import heapq
import math
from dataclasses import dataclass, field

from fuyou.engine.budget import ACT_SHARE
from fuyou.planner.cost import StageCost, Workload, kept_in_forward
from fuyou.planner.hardware import HardwareProfile
from fuyou.policy import ActivationPolicy

MAX_ADAM_CHUNKS = 4  # chunks per AdamW job in the simulation (enough to show the pipeline's fill/drain)


@dataclass
class Task:
    name: str
    resource: str
    queue: str
    dur: float
    deps: list[int]
    step: int
    stage: str
    start: float = 0.0
    end: float = 0.0
    nbytes: float = 0.0  # bytes an SSD task moves
    rank: int | None = None  # data parallel: the rank whose GPU or link a task uses (None: the machine's)


@dataclass
class SimResult:
    tasks: list[Task]
    steps: int
    step_ends: list[float]                   # end of each step's last compute task
    makespan: float                          # every task of every step done (optimizer included)
    step_time: float                         # steady state: step_ends[-1] - step_ends[-2]
    busy: dict[str, float] = field(default_factory=dict)        # seconds per resource in the last step
    queue_busy: dict[str, float] = field(default_factory=dict)  # seconds per queue in the last step

    @property
    def bottleneck(self) -> str:
        return max(self.queue_busy, key=self.queue_busy.get)

    def last_step_tasks(self, rank0: bool = False) -> list[Task]:
        """The last step's tasks; ``rank0``: only rank 0's GPU and link tasks with the machine's (data parallel)."""
        return [t for t in self.tasks if t.step == self.steps - 1 and not (rank0 and t.rank)]

    def step_written(self) -> int:
        """Bytes the last step writes to the SSDs (every rank's)."""
        return sum(t.nbytes for t in self.last_step_tasks() if t.resource == "ssd-write")

    def step_read(self) -> int:
        """Bytes the last step reads from the SSDs (every rank's)."""
        return sum(t.nbytes for t in self.last_step_tasks() if t.resource == "ssd-read")

    def step_traffic(self) -> dict[str, tuple[float, float]]:
        """The last step's SSD bytes (read, written) by what moves: the optimizer's updates (their state, with
        the compute weights an update writes and the gradients a deferred or redone one reads back), the
        weights streamed in, swapped activations, gradients saved for exact clipping, a commit's resident
        state (every rank's)."""
        parts: dict[str, list[float]] = {}
        for t in self.last_step_tasks():
            if t.resource not in ("ssd-read", "ssd-write"):
                continue
            what = next((v for k, v in _TRAFFIC if t.name.startswith(k)), "other")
            parts.setdefault(what, [0.0, 0.0])[t.resource == "ssd-write"] += t.nbytes
        order = [v for _, v in _TRAFFIC] + ["other"]
        return {k: (r, w) for k, (r, w) in sorted(parts.items(), key=lambda kv: order.index(kv[0]))}


# Task names' prefixes by what an SSD task moves (``SimResult.step_traffic``)
_TRAFFIC = (("adam ", "updates"), ("read weights", "weights"), ("exchange:", "weights"),
            ("read act", "activations"), ("write act", "activations"), ("write grad", "gradients"),
            ("commit", "commits"))


class _Graph:
    def __init__(self):
        self.tasks: list[Task] = []

    def add(self, name, resource, queue, dur, deps, step, stage, rank: int | None = None) -> int:
        self.tasks.append(Task(name, resource, queue, max(0.0, dur), [d for d in deps if d is not None], step, stage,
                               rank=rank))
        return len(self.tasks) - 1

    def io(self, name, resource, nbytes, deps, step, stage, hw: HardwareProfile, efficiency: float = 1.0) -> int:
        """An SSD transfer of ``nbytes`` (``resource`` ssd-read or ssd-write) on the ``ssd`` queue, at
        ``efficiency`` of the profile's rates, times its mixed factor."""
        bw = hw.ssd_read if resource == "ssd-read" else hw.ssd_write
        k = self.add(name, resource, "ssd", nbytes / bw * hw.ssd_mixed_factor / efficiency, deps, step, stage)
        self.tasks[k].nbytes = nbytes
        return k

    def run(self) -> None:
        """List scheduling on FIFO queues: repeatedly start the task that can start earliest."""
        tasks = self.tasks
        n = len(tasks)
        pending = [len(t.deps) for t in tasks]
        ready_at = [0.0] * n
        users: list[list[int]] = [[] for _ in range(n)]
        for i, t in enumerate(tasks):
            for d in t.deps:
                users[d].append(i)
        # each queue's waiting tasks by (ready, index); ``cand`` holds each queue's earliest start
        # (max of its free time and its first task's ready time) keyed (start, queue order, version), stale
        # entries skipped: the same choice as scanning every queue for the earliest start, ties to the first queue
        order: dict[str, int] = {}
        for t in tasks:
            order.setdefault(t.queue, len(order))
        heaps: list[list] = [[] for _ in order]
        free = [0.0] * len(order)
        version = [0] * len(order)
        qof = [order[t.queue] for t in tasks]
        for i in range(n):
            if not pending[i]:
                heaps[qof[i]].append((0.0, i))
        cand: list = []
        for q, h in enumerate(heaps):
            heapq.heapify(h)
            if h:
                cand.append((max(free[q], h[0][0]), q, 0))
        heapq.heapify(cand)
        done = 0
        while done < n:
            if not cand:
                raise AssertionError("simulation deadlock: a dependency cycle in the task graph")
            s, q, ver = heapq.heappop(cand)
            if ver != version[q]:
                continue
            _, i = heapq.heappop(heaps[q])
            t = tasks[i]
            t.start, t.end = s, s + t.dur
            free[q] = t.end
            done += 1
            touched = {q}
            for u in users[i]:
                ready_at[u] = max(ready_at[u], t.end)
                pending[u] -= 1
                if not pending[u]:
                    heapq.heappush(heaps[qof[u]], (ready_at[u], u))
                    touched.add(qof[u])
            for r in touched:
                version[r] += 1
                if heaps[r]:
                    heapq.heappush(cand, (max(free[r], heaps[r][0][0]), r, version[r]))


def _streamed_job(g: _Graph, name: str, numel: int, n: int, wbytes: float, first: list, hw: HardwareProfile,
                  q_adam: str, depth: int, step: int, rbytes: float = 12, speed: float = 1.0) -> list[int]:
    """The tasks of one AdamW job whose state is on SSD, as ``OutOfCoreAdamW.update`` pipelines it:
    ``n`` chunks, each read (``rbytes``/param) -> kernel (at ``speed`` x the fp32 kernel's rate) -> write
    (``wbytes``/param), ``depth`` chunks read
    ahead and written behind. Its SSD tasks run at ``hw.adam_io_efficiency`` of the store's rates.
    ``first``: what the first reads wait for. Returns the write tasks."""
    per = numel / n
    eff = hw.adam_io_efficiency
    reads, kernels, writes = [], [], []
    for j in range(n):
        rd = list(first) if j < depth else [kernels[j - depth], writes[j - 2 * depth] if j >= 2 * depth else None]
        reads.append(g.io(f"adam read {name}", "ssd-read", rbytes * per, rd, step, name, hw, eff))
        kernels.append(g.add(f"adam {name}", "cpu-adam", q_adam, per / (hw.cpu_adam * speed),
                             [reads[j], kernels[-1] if kernels else None], step, name))
        writes.append(g.io(f"adam write {name}", "ssd-write", wbytes * per, [kernels[j]], step, name, hw, eff))
    return writes


def _add_io_cpu(g: _Graph, hw: HardwareProfile) -> None:
    """On a CPU compute device the store's I/O threads run on the cores that compute and AdamW share:
    each SSD transfer costs them its measured CPU time, after it (a descheduled compute thread holds
    up the whole parallel op, so the cost is counted whole, not divided by the cores)."""
    if hw.device == "cuda" or hw.ssd_cpu_s_per_gb <= 0:
        return
    for k in range(len(g.tasks)):
        t = g.tasks[k]
        if t.queue == "ssd" and t.nbytes > 0:
            g.add(f"io cpu {t.name}", "io-cpu", "cpu", t.nbytes * hw.ssd_cpu_s_per_gb / 1e9, [k], t.step, t.stage)


def _chunk_count(numel: int, chunk: int, max_chunks: int) -> int:
    """Chunks a job of ``numel`` parameters is simulated in (at most ``max_chunks``)."""
    return max(1, min(max_chunks, math.ceil(numel / chunk)))


def simulate_job(numel: int, hw: HardwareProfile, chunk: int, depth: int, max_chunks: int = MAX_ADAM_CHUNKS) -> float:
    """Predicted seconds of one AdamW job alone on an idle machine (state on SSD, compute weights
    kept in CPU memory): what ``fuyou probe`` compares with a measured job to find
    ``adam_io_efficiency``."""
    g = _Graph()
    q_adam = "cpu-adam" if hw.device == "cuda" else "cpu"
    _streamed_job(g, "probe", numel, _chunk_count(numel, chunk, max_chunks), 12, [], hw, q_adam, depth, 0)
    _add_io_cpu(g, hw)
    g.run()
    return max(t.end for t in g.tasks)


def _resident_job(g: _Graph, c: StageCost, w: Workload, hw: HardwareProfile, cached: set[int], first: list,
                  q_adam: str, max_chunks: int, step: int, job_ends: list, updated: dict) -> None:
    """A resident stage's update: kernels only (the next forward waits for them when the weights are
    cached, for the weight writes if not); its state stays in CPU memory until a commit."""
    n = _chunk_count(c.numel, w.chunk, max_chunks)
    per = c.numel / n
    kernels, writes = [], []
    for j in range(n):
        kernels.append(g.add(f"adam {c.name}", "cpu-adam", q_adam, per / (hw.cpu_adam * w.fmt.kernel_speed),
                             [first[0], kernels[-1] if kernels else first[1]] + first[2:], step, c.name))
        if c.index not in cached:
            writes.append(g.io(f"adam write weights {c.name}", "ssd-write", w.csize * per, [kernels[j]], step,
                               c.name, hw))
    ready = g.add(f"updated {c.name}", "cpu-adam", "marker", 0.0, [kernels[-1]] + writes, step, c.name)
    job_ends.append(ready)
    updated[c.index] = ready


def _streamed_update(g: _Graph, c: StageCost, w: Workload, hw: HardwareProfile, cached: set[int], first: list,
                     q_adam: str, max_chunks: int, step: int, job_ends: list, updated: dict,
                     extra_deps: list | None = None, grad_read: bool = False, master_read: bool = True) -> None:
    """An update whose state is on SSD (``grad_read``: a redo, which reads the saved gradient too;
    ``master_read`` false: its master is in memory, engine.py's Note: [Master in memory])."""
    n = _chunk_count(c.numel, w.chunk, max_chunks)
    wbytes = w.state_bpp + (0 if c.index in cached or w.master_is_weights else w.csize)
    rbytes = w.state_bpp - (0 if master_read else w.fmt.master_dtype.itemsize) + (w.gsize if grad_read else 0)
    writes = _streamed_job(g, c.name, c.numel, n, wbytes, first, hw, q_adam, w.offload.optimizer_depth, step,
                           rbytes=rbytes, speed=w.fmt.kernel_speed)
    end = g.add(f"updated {c.name}", "cpu-adam", "marker", 0.0, writes + (extra_deps or []), step, c.name)
    job_ends.append(end)
    updated[c.index] = end


def simulate(*args, **kwargs) -> SimResult:
    """``_simulate`` with the cyclic garbage collector paused: a simulation allocates tens of thousands
    of tasks (a 13B model at 64 micro-batches: ~26k per step), none of them in cycles, and each
    collection they trigger walks every task still alive in the planner's other evaluations (measured:
    a third of `fuyou plan --global-batch 64`'s time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _simulate(*args, **kwargs)
    finally:
        if enabled:
            gc.enable()


def simulate_plan(w: Workload, costs: list[StageCost], hw: HardwareProfile, policy: ActivationPolicy, plan,
                  **kwargs) -> SimResult:
    """``simulate`` for a memory plan (``fuyou.engine.budget.MemoryPlan``): its cached stages, resident
    stages and spare copies (every rank's), so that no caller simulates a plan other than the one it made."""
    return simulate(w, costs, hw, policy, set(plan.cached_stages), resident=set(plan.resident_all),
                    spare=set(plan.spare_all), act_share=plan.cpu_items.get(ACT_SHARE, 0),
                    handoff=plan.handoff > 0, **kwargs)


def _simulate(w: Workload, costs: list[StageCost], hw: HardwareProfile, policy: ActivationPolicy,
              cached: set[int], steps: int = 3, max_chunks: int = MAX_ADAM_CHUNKS,
              resident: set[int] | frozenset = frozenset(), commit: bool = False, clip_mode: str = "speculate",
              spare: set[int] | frozenset = frozenset(), act_share: int | None = None,
              handoff: bool = False) -> SimResult:
    """Simulate ``steps`` optimizer steps from an idle machine; see the module docstring.

    ``cached``: stages whose compute weights are in CPU memory (on every rank); ``resident``: stages
    whose optimizer state is (``MemoryPlan.resident_stages``; data parallel: on their owner);
    ``commit``: every step commits; ``clip_mode`` (exact clipping): 'speculate' (the norm stays below
    the threshold), 'redo' (it exceeds it: every speculative update is redone) or 'defer' (every
    update waits for the norm: the engine's schedule after a step that clipped); ``spare``: resident
    stages with a spare copy of their state, which speculate as streamed stages do but in CPU memory
    (engine.py, Note: [Spare copies]), and wait for the norm only in 'defer'; ``act_share``: the cpu
    tier's share of activations, what does not fit it going to the SSD (``cost.kept_in_forward``; None:
    unbounded); ``handoff``: streamed stages' updates take the master backward read (``MemoryPlan.handoff``:
    engine.py, Note: [Master in memory])."""
    g = _Graph()
    cuda = hw.device == "cuda"
    placed = kept_in_forward(w, costs, policy, act_share, cuda)
    adapted = w.lora_params is not None  # the blocks' rates (the head has no adapters)
    fwd_rate = (hw.lora_fwd_flops if adapted else None) or hw.fwd_flops
    bwd_rate = (hw.lora_bwd_flops if adapted else None) or hw.bwd_flops
    head_rate = (hw.lora_head_flops if adapted else None) or hw.head_flops or hw.bwd_flops
    R, owner, sharded = w.ranks, w.owners, w.sharded

    def q(name: str, r: int) -> str:  # a rank's own queue (its GPU, its PCIe link); rank 0's keeps the name
        return name if r == 0 else f"{name}{r}"

    def q_compute(r: int) -> str:
        return q("compute", r) if cuda else "cpu"  # a CPU device: every rank computes on the same cores

    def join(name: str, deps: list, step: int, stage: str) -> int:
        return deps[0] if len(deps) == 1 else g.add(name, "compute", "marker", 0.0, deps, step, stage)

    q_adam = "cpu-adam" if cuda else "cpu"
    S = len(costs)
    depth = policy.prefetch_depth
    off = w.offload
    fwd = list(range(S - 1)) + ([0] if w.tied else []) + [S - 1]
    order = fwd + list(range(S - 2, -1, -1))
    updated: dict[int, int | None] = {i: None for i in range(S)}   # last AdamW task of each stage (its owner's)
    # what a rank's next load of a stage waits for: its update, or (data parallel, not its owner) its weights' arrival
    ready: list[dict[int, int | None]] = [{i: None for i in range(S)} for _ in range(R)]
    exchanged: dict[int, int | None] = {i: None for i in range(S)}  # the broadcast of a stage's last weights
    job_ends: list[list[int]] = [[] for _ in range(R)]  # each rank's optimizer worker: the last task of each job
    prev_compute: list[int | None] = [None] * R
    step_last_compute: list[int] = []
    lora = w.lora_params is not None  # the adapters' update on the device is too small to model
    clipping = w.grad_clip is not None and not lora
    M = w.micro
    head_pos = len(fwd) - 1
    for step in range(steps):
        pos_ends: list[list[int]] = [[] for _ in range(R)]  # each rank's last compute task of each position
        waiting: list[tuple[int, int]] = []   # stages waiting for the norm: (stage, gradient in CPU memory or saved)
        speculated: list[int] = []
        swapped: dict[tuple, list[tuple[str, int, str]]] = {}   # (rank, stage, micro-batch) -> swapped out
        swap_done: dict[tuple, int | None] = {}
        sums: list[int] = []   # data parallel: each gradient's sum over the ranks, in backward order
        for pos, i in enumerate(order):
            c = costs[i]
            backward = pos > head_pos
            bind = w.tied and pos == head_pos - 1  # the head's second load (the embedding): no compute
            kept: set[str] = set()
            if c.kind == "block":
                kept = {what for what, _, _ in placed[(c.index, 0)] if what != "checkpoint"}
            ts = []
            for r in range(R):
                ends = pos_ends[r]
                window = ends[-(depth + 1)] if len(ends) >= depth + 1 else (prev_compute[r] if not ends else None)
                # -- load the stage's weights: once per step (layer-major)
                nbytes = w.weight_bytes[i]  # (a quantised base: its packed bytes)
                dep = [ready[r][i] if sharded and owner[i] != r else updated[i], window]
                if i not in cached:
                    dep = [g.io(f"read weights {c.name}", "ssd-read", nbytes, dep, step, c.name, hw)]
                if cuda:
                    dep = [g.add(f"h2d weights {c.name}", "h2d", q("h2d", r), nbytes / hw.h2d, dep, step, c.name, r)]
                if bind:
                    prev_compute[r] = g.add(f"bind {c.name} for head", "compute", q_compute(r), 0.0,
                                            dep + [prev_compute[r]], step, c.name, r)
                    ends.append(prev_compute[r])
                    continue
                # back-pressure of the optimizer queue (Engine: OptimizerWorker.submit blocks)
                k = len(job_ends[r]) - off.max_pending_updates - 1
                pressure = [job_ends[r][k]] if backward and k >= 0 else []
                # data parallel: a gradient's sum over the ranks is finished before this rank's next gradient
                # buffer is made: on a GPU, once this stage's first micro-batch is issued (the host blocks there;
                # the device overlaps the sum with it), so the second waits; on a CPU once the next stage's
                # gradient is ready, so the stage after waits
                summed = {}
                if backward and cuda and M > 1 and sums:
                    summed[1] = sums[-1]
                elif backward and len(sums) >= 2:
                    summed[0] = sums[-2]
                for mb in range(M):
                    deps = dep + [prev_compute[r]] + (pressure if mb == 0 else []) + [summed.get(mb)]
                    if c.kind == "block" and backward:  # bring swapped activations back, inside the same window
                        for cls, b, tier in swapped.pop((r, i, mb), []):
                            d = [swap_done.get((r, i, mb, cls, tier)), window]
                            if tier == "ssd":
                                d = [g.io(f"read act {c.name} {cls}", "ssd-read", b, d, step, c.name, hw)]
                            if cuda:
                                d = [g.add(f"h2d act {c.name} {cls}", "h2d", q("h2d", r), b / hw.h2d, d, step,
                                           c.name, r)]
                            deps += d
                    if pos < head_pos:
                        t = g.add(f"forward {c.name}", "compute", q_compute(r), c.fwd_flops / fwd_rate, deps,
                                  step, c.name, r)
                    elif pos == head_pos:
                        t = g.add("forward+backward head", "compute", q_compute(r),
                                  c.backward_flops(set(), lora) / head_rate, deps, step, c.name, r)
                    else:
                        t = g.add(f"backward {c.name}", "compute", q_compute(r),
                                  (0.0 if lora and c.kind == "embed" else c.backward_flops(kept, lora)) / bwd_rate,
                                  deps, step, c.name, r)
                    prev_compute[r] = t
                    if c.kind == "block" and not backward:  # swap out what the policy keeps off the device
                        out = []
                        for cls, tier, b in placed[(c.index, mb)]:
                            if tier in ("cpu", "ssd") and not (tier == "cpu" and not cuda):
                                d = [t]
                                if cuda:
                                    d = [g.add(f"d2h act {c.name} {cls}", "d2h", q("d2h", r), b / hw.d2h, d, step,
                                               c.name, r)]
                                if tier == "ssd":
                                    d = [g.io(f"write act {c.name} {cls}", "ssd-write", b, d, step, c.name, hw)]
                                swap_done[(r, i, mb, cls, tier)] = d[0]  # (a class split between the tiers: two)
                                out.append((cls, b, tier))
                        swapped[(r, i, mb)] = out
                ends.append(t)
                ts.append(t)
            if bind or lora or not (backward or pos == head_pos):  # LoRA: no gradient of the base, no AdamW job
                continue
            # -- the stage's gradient (summed over the micro-batches; data parallel: over the ranks, into its
            # owner) to the host, then the AdamW job on its owner
            o = owner[i]
            gdep = ts[:1]
            if sharded:
                gdep = [_sum_gradient(g, c, w, hw, ts, step, q)]
                sums.append(gdep[0])
            if cuda:
                gdep = [g.add(f"d2h grad {c.name}", "d2h", q("d2h", o), c.numel * w.gsize / hw.d2h, gdep, step,
                              c.name, o)]
            if clipping and i in resident and (i not in spare or clip_mode == "defer"):
                waiting.append((i, gdep[0]))  # its gradient waits in CPU memory for the norm
                continue
            gsave = None
            if clipping and i not in resident:  # the gradient is saved for a redo, or waits there for the norm
                gsave = g.io(f"write grad {c.name}", "ssd-write", c.numel * w.gsize, [gdep[0]], step, c.name, hw)
            if clipping and clip_mode == "defer":
                waiting.append((i, gsave))
                continue
            first = [gdep[0], job_ends[o][-1] if job_ends[o] else None, exchanged[i]]
            if clipping:
                speculated.append(i)
            if i in resident:  # (under exact clipping, one with a spare copy: speculative, from memory)
                _resident_job(g, c, w, hw, cached, first, q_adam, max_chunks, step, job_ends[o], updated)
                continue
            _streamed_update(g, c, w, hw, cached, first, q_adam, max_chunks, step, job_ends[o], updated,
                             extra_deps=[gsave], master_read=not w.master_from_memory(i, resident, cached, handoff))
        # End of backward: the global norm is known (exact clipping; data parallel: every rank's, summed).
        step_end = join("end of step", [ends[-1] for ends in pos_ends], step, "step")
        norm = join("global norm", [step_end] + sums[-1:], step, "step")
        for i, gdone in sorted(waiting):
            o = owner[i]
            first = [norm, job_ends[o][-1] if job_ends[o] else None, gdone, exchanged[i]]
            if i in resident:
                _resident_job(g, costs[i], w, hw, cached, first, q_adam, max_chunks, step, job_ends[o], updated)
            else:
                _streamed_update(g, costs[i], w, hw, cached, first, q_adam, max_chunks, step, job_ends[o], updated,
                                 grad_read=True, master_read=not w.master_from_memory(i, resident, cached, False))
        if clip_mode == "redo":
            for i in sorted(speculated):
                o = owner[i]
                if i in resident:  # from its spare copy, with the gradient still in CPU memory
                    _resident_job(g, costs[i], w, hw, cached, [norm, job_ends[o][-1]], q_adam, max_chunks, step,
                                  job_ends[o], updated)
                    continue
                _streamed_update(g, costs[i], w, hw, cached, [norm, job_ends[o][-1]], q_adam, max_chunks, step,
                                 job_ends[o], updated, grad_read=True)
        if commit and resident:
            state = g.io("commit: write resident state", "ssd-write", sum(w.fmt.state_bytes(costs[i].numel) for i in resident),
                         [jobs[-1] for jobs in job_ends if jobs], step, "commit", hw)
            for jobs in job_ends:
                jobs.append(state)
        if sharded:
            _exchange(g, costs, w, hw, cached, step_end, step, updated, exchanged, ready)
        step_last_compute.append(step_end)
    _add_io_cpu(g, hw)
    g.run()
    ends = [g.tasks[i].end for i in step_last_compute]
    makespan = max(t.end for t in g.tasks)
    step_time = ends[-1] - ends[-2] if steps > 1 else makespan
    busy: dict[str, float] = {}
    qbusy: dict[str, float] = {}
    for t in g.tasks:
        if t.step == steps - 1 and t.queue != "marker":
            if not t.rank:  # rank 0's GPU and PCIe link, and the machine's
                busy[t.resource] = busy.get(t.resource, 0.0) + t.dur
            qbusy[t.queue] = qbusy.get(t.queue, 0.0) + t.dur
    return SimResult(g.tasks, steps, ends, makespan, step_time, busy, qbusy)


def _sum_gradient(g: _Graph, c: StageCost, w: Workload, hw: HardwareProfile, ts: list[int], step: int, q) -> int:
    """Data parallel: the sum of a stage's gradient over the ranks into its owner, once every rank has
    computed it (``ts``). On GPUs NCCL's reduce moves (N-1)/N of the gradient over each GPU's link: a
    direct link (NVLink, ``gpu_link``) or, without one, through host memory over each GPU's PCIe link
    both ways. On a CPU device, gloo through CPU memory (``gloo_reduce``, measured for two ranks)."""
    R, nb = w.ranks, c.numel * w.gsize
    if c.kind == "head" and w.tied:  # a tied head's gradient of the embedding is summed with it (engine.py)
        nb += w.numels[0] * w.gsize
    if hw.device != "cuda":
        return g.add(f"sum grad {c.name}", "reduce", "gloo", nb * (R - 1) / hw.gloo_reduce, ts, step, c.name)
    if hw.gpu_link:
        return g.add(f"sum grad {c.name}", "reduce", "link", nb * (R - 1) / R / hw.gpu_link, ts, step, c.name)
    parts = []
    for r in range(R):
        parts.append(g.add(f"sum grad {c.name} out", "reduce", q("d2h", r), nb * (R - 1) / R / hw.d2h, ts, step,
                           c.name, r))
        parts.append(g.add(f"sum grad {c.name} in", "reduce", q("h2d", r), nb * (R - 1) / R / hw.h2d, ts, step,
                           c.name, r))
    return g.add(f"summed grad {c.name}", "reduce", "marker", 0.0, parts, step, c.name)


def _exchange(g: _Graph, costs: list[StageCost], w: Workload, hw: HardwareProfile, cached: set[int], step_end: int,
              step: int, updated: dict, exchanged: dict, ready: list[dict]) -> None:
    """Data parallel, sharded state (``fuyou/engine/exchange.py``): once the step's updates are submitted,
    one thread per rank broadcasts every stage's new compute weights from its owner, in forward order,
    a chunk at a time through one buffer: the owner reads them from its store, gloo carries them to
    the N-1 others (``gloo_broadcast``: the root sends to each), and each writes them to its store. A
    cached stage is in the one cache the ranks of the machine map: its broadcast is a token. A rank's
    next load of a stage it does not own waits for its copy; the owner's next update of the stage
    waits for the broadcast."""
    R = w.ranks
    prev = step_end
    for c in costs:
        i, o, nb = c.index, w.owners[c.index], c.numel * w.csize
        d = [updated[i], prev]
        if i in cached:  # the ranks map one cache (fuyou/store/shared.py): the owner wrote it; a token says so
            prev = exchanged[i] = g.add(f"exchange token {c.name}", "exchange", "gloo", 0.0, d, step, c.name)
        else:
            d = [g.io(f"exchange: read weights {c.name}", "ssd-read", nb, d, step, c.name, hw)]
            prev = exchanged[i] = g.add(f"exchange weights {c.name}", "exchange", "gloo",
                                        nb * (R - 1) / hw.gloo_broadcast, d, step, c.name)
            writes = [g.io(f"exchange: write weights {c.name}", "ssd-write", nb, [prev], step, c.name, hw)
                      for r in range(R) if r != o]
            prev = writes[0] if len(writes) == 1 else g.add(f"received {c.name}", "exchange", "marker", 0.0, writes,
                                                             step, c.name)
        for r in range(R):
            if r != o:
                ready[r][i] = prev
