"""The three-tier engine: layer-streamed training with the CPU optimizer overlapped with backward.

One optimizer step (DESIGN.md, Execution model), **layer-major** over its ``grad_accum`` micro-batches:
each stage runs every micro-batch before the next stage starts, so its weights are loaded once per step
and its gradient is summed over the micro-batches in one buffer (GreedySnake's schedule, issue 21):

1. forward over the stages with weights streamed in (``WeightStreamer``), under ``no_grad``, each
   micro-batch's stage input kept as its checkpoint in the tier the activation policy names; between
   stages every micro-batch's residual stream is on the compute device;
2. the head's forward and backward at once, per micro-batch (loss -> gradient of its input and its
   parameters); the micro-batches' gradients of the head (and of a tied embedding) are summed;
3. backward over the blocks and the embedding in reverse: per micro-batch, recompute the stage from
   its checkpoint with autograd and back-propagate, adding its parameter gradients into the stage's
   one flat gradient (micro-batch order: the reference's summation order, so fp32 stays exact);
4. hand each stage's gradient to the ``OptimizerWorker`` *as soon as the stage's backward is done*:
   its AdamW runs on the CPU, against the SSD, while backward of the earlier stages continues. The
   next step's forward of a stage waits until its update is done. Weights and optimizer state move
   once per step whatever the number of micro-batches; only activations grow with it.

Note: [Tied gradient]
    A tied head's gradient of the embedding (``lm_head.weight`` is ``wte``) is made first in backward
    and needed last, by the embedding's sum. On an accelerator it waits in a pinned host buffer
    (``shared_pool``) through the blocks' backward instead of on the device (at GPT-3 175B that is
    2.4 GB of a 24 GB card for the whole backward) and comes back for the embedding's stage; while on
    the device it is one of the "gradients leaving the device". The copies are exact, the addition is
    the reference's (two addends), so results do not change.

Exact gradient clipping (``train.grad_clip``, default 1.0) needs the global norm before any update,
which would serialise the optimizer after backward. The engine **speculates** instead (DESIGN.md,
Numerics): each stage that is not resident is updated with its unclipped gradient as soon as its
backward is done, overlapped as above, into a state copy other than its source (Note: [State
copies] in ``layout``), while the gradient is also saved to the SSD (``<stage>/grad``). After backward
the global norm is known; if it exceeds the threshold, every speculated stage is **redone** from its
source copy with the saved gradient scaled by the clip factor, so the result is bit-identical to
clipping first. When the previous step clipped (``offload.clip_schedule='auto'``), the step is
expected to clip too, and the engine **defers** instead of speculating: gradients go to the SSD and
every update waits for the norm (no overlap, but no update done twice: on an SSD-bound machine a redo
costs a second pass over the state). Resident stages (updated last, in CPU memory) hold their
gradients in CPU memory beside their state (the memory plan counts them); those with a spare copy
speculate (Note: [Spare copies]), the others wait for the norm and are updated, in the order the next
forward needs them, once it is known. A non-finite norm stops the run before anything is committed.

Note: [Spare copies]
    A resident stage's update is made in CPU memory, where one copy of its state leaves nothing to
    redo from: it would wait for the norm, after backward, and the next forward would wait for it in
    turn (1.28x a step that does not clip, planned for 6.7B on a 4090 with 128 GiB). The memory plan
    gives what the resident state leaves over to a second copy of the last stages' state
    (``MemoryPlan.spare_stages``; ``offload.resident_spare``). Such a stage speculates like a
    streamed one: its update reads ``resident`` and writes ``spare`` (adamw.cpp, Note: [Out of
    place]: the same bits, the same memory traffic), and the two swap at once on the main thread, so
    ``resident`` names the newest state. A redo reads the old copy, now ``spare``, with the gradient
    still held in CPU memory, and writes ``resident`` again. In ``defer`` mode it waits and updates in
    place as the others do. A commit claims the tensors it flushes when it is queued: the next step's
    swap may come before the worker reaches it.

Note: [Master in memory]
    A master in the compute dtype is the compute weights (``StateFormat.master_is_compute``: a bf16 master
    under bf16, an fp32 master under fp32). Where it is in memory already as the weights of the copy an
    update reads, the update does not read it from the store (``OutOfCoreAdamW.update``'s ``master_in``):
    * a cached stage: the weight cache holds it, and its update wrote the cache anyway; it now updates the
      master in place there and writes it to the store from there. No memory, no read;
    * a stage neither cached nor resident: backward read it from the store as its weights. The streamer
      keeps that buffer (``WeightStreamer.release(take=True)``) and this stage's update takes it, updates
      it in place, writes it and frees it (on CUDA, once the buffer's copy to the GPU has completed). The
      weight pool holds ``budget.handoff_slots`` such buffers beyond the prefetch window, where the memory plan
      finds they save more SSD bytes than the cache and resident state they displace (``plan_memory``).
    Not for a redo (the cache then holds the speculative update, backward's copy is gone), nor for a
    streamed stage's update deferred to the norm (its buffer would be held through backward), nor LoRA
    (no master). A buffer read from a key other than the copy the update reads is freed and the store
    read (loads wait for a stage's updates, so none is). The arithmetic is the same: bit-identical.

Crash-safe commits (``offload.commit='cow'``) happen every ``offload.commit_every`` steps or minutes
(``commit.py``): the commit writes the resident stages' state to a store copy, fsyncs, and names the
copies in the commit record. A run commits when it ends or is stopped, too.

With several micro-batches the stage gradient is summed in fp32 (the reference's ``.grad``); only
one stage's sum is on the compute device at a time ("gradients leaving the device" in the plan).

Note: [Sync points] Every CUDA call goes through the device seam (``fuyou.engine.device``). The main
thread blocks only (a) in ``WeightStreamer.get`` until a stage's weights are loaded (the loader has
*launched* their H2D copy; compute waits for it on the GPU, not the host), (b) in
``OptimizerWorker.submit`` when ``max_pending_updates`` updates are queued, (c) at the end of a step
for the loss value (the step's device-event timings are read after it), (d) with exact clipping for
the global norm and the clip factor after backward (one transfer), (e) when every staging buffer of
the activation swapper is in use, or more than ``LEAVING`` outgoing activations have copies pending
(``ActivationSwapper._leave``), (f) before a stage's gradient is flattened on the device, until the
previous stage's gradient has been copied out (``D2H_DEPTH``; when the GPU runs behind the host this
is about one stage of backward, and it keeps the host from running further ahead), (g) for a pinned
buffer of the input batch, and (h) in ``ActivationSwapper.get`` until an activation read back from
SSD is on the device (the reader thread waits for each chunk's H2D copy before it reuses the
staging buffer). (c) and (d) wait on a blocking-sync event first, so the host thread sleeps instead of
spinning on the cores the CPU Adam needs. Loader threads wait too, off the main thread: before a
load, until the GPU is done with the stage ``prefetch_depth + 1`` positions back. Every copy between
host and device is from or to page-locked memory and asynchronous; the devices count any that is not
(``sync_copies``) and the tests require none. Every wait has a deadline (``fuyou.watchdog``) except a
GPU event's.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fuyou.config import FuyouConfig
from fuyou.data import TokenData
from fuyou.engine.budget import (D2H_DEPTH, MemoryPlan, act_cpu_share, activation_bytes, cpu_tier_need,
                                 device_working_bytes, exchange_buffer_bytes, handoff_slots, shared_cache_layout,
                                 offtier_bytes, plan_memory, policy_memory, saved_block_bytes)
from fuyou.engine.device import InFlight, make_device
from fuyou.engine.recompute import BlockState, backward_block, forward_block, leaves, weight_bases
from fuyou.engine.swapper import ActivationSwapper
from fuyou import watchdog
from fuyou.engine.malloc import bound_malloc, malloc_threshold, resident_bytes, trim_heap
from fuyou.engine.layout import StageState, build_states, copies_needed, dtype_size
from fuyou.engine.state import TrainingState, grad_key, refuse_committed_state
from fuyou.errors import BudgetError, ConfigError, FuyouError, NonFiniteError, StoreError
from fuyou.engine.commit import RECORD, DamagedStateError
from fuyou.faults import fault
from fuyou.distributed import resume_command
from fuyou.engine.trace import StepCounters, Tracer
from fuyou.engine.weights import Handed, WeightStreamer
from fuyou.engine.exchange import WeightExchange
from fuyou.engine.worker import OptimizerWorker, UpdateJob
from fuyou.models import StageModel
from fuyou.optim import adamw_backend
from fuyou.optim.adamw import grad_norm
from fuyou.optim.compressed import StateFormat
from fuyou.optim.out_of_core import OutOfCoreAdamW
from fuyou.policy import default_checkpoint_dtype, keep_policies
from fuyou.store import PinnedPool
from fuyou.store.shared import SHM_DIR, SHM_MARGIN, SharedSegment, shm_free, sweep_stale
from fuyou.store.aligned import huge_empty
from fuyou.units import format_size
from fuyou.data.batches import check_sequence_length, make_batches
from fuyou.models.precision import auto_fp32_clause, autocast
from fuyou.trainer import EvaluationStopped, StepStats
from fuyou.optim.schedule import lr_of
from fuyou.models.lora import attach, dropout_key
from fuyou.models.quant import FORMATS, PackedStage
from fuyou.engine.lora_state import LoRATrainingState
from fuyou import distributed


class Engine:
    """Trains ``cfg.model`` with fp32 weights and Adam moments on the SSDs (module docstring)."""

    def __init__(self, cfg: FuyouConfig, data: TokenData | None | Callable[[], TokenData | None], store_name: str,
                 init_values=None, resume: bool = False):
        """``data``: the tokens, or a function that loads them, called once the memory plan has passed
        its check (``fuyou train``: a budget that cannot fit is refused before a large dataset is
        tokenized). ``init_values(stage) -> {global key: fp32 tensor}`` gives each stage's initial weights
        (for example streamed from a Hugging Face checkpoint); default: ``stage.init_params(train.seed)``.
        ``resume``: open the existing state of ``store_name`` at its last commit instead."""
        check_sequence_length(cfg)  # a config mistake, not a budget: before planning memory for that length
        self.cfg = cfg
        self.init_values = init_values or (lambda stage: stage.init_params(cfg.train.seed))
        t = cfg.train
        self.dist = distributed.current()  # data parallelism (fuyou/distributed.py); one process: no-ops
        self.micro = self.dist.micro_batches(t.grad_accum)  # the step's micro-batches this rank runs
        self.dev = make_device(t.device, self.dist.local_rank if self.dist.enabled else None)  # the device seam
        try:
            self._build(data, store_name, resume)
        except BaseException:
            self._undo_build()
            raise

    def _build(self, data, store_name: str, resume: bool) -> None:
        """``__init__`` past the device: the model, its memory plan and check, the data, the state and the
        pipeline."""
        cfg, off, t = self.cfg, self.cfg.offload, self.cfg.train
        self.device = self.dev.torch
        self.model = StageModel(cfg.model)
        self.lora = attach(self.model, cfg.lora)  # LoRA: a frozen base, adapters on the device (lora_state.py)
        self.cdtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
        self.clipping = t.grad_clip is not None
        self.gdtype = torch.float32 if t.grad_accum > 1 else self.cdtype  # micro-batches are summed in fp32
        self.fmt = StateFormat.of(cfg.optim)  # how the optimizer state is stored (fuyou/optim/compressed.py)
        # the master is the compute weights: updates take it from memory where it is (Note: [Master in memory])
        self.master_is_weights = self.fmt.master_is_compute(self.cdtype) and not self.lora
        self.states = build_states(self.model.stages, cfg.optim.weight_decay, n_copies=3,
                                   int8=self.fmt.moments == "int8")
        if self.lora and cfg.lora.base != "compute":  # the blocks' base streams as int8 or NF4 codes and scales
            for st in self.states:
                st.packing = PackedStage.of(st.stage, dtype_size(self.cdtype), cfg.lora.base)
        # Data parallel with full fine-tuning: each stage's optimizer state on one rank (fuyou/engine/exchange.py).
        self.sharded = self.dist.enabled and not self.lora
        self.exchange = self.exchange_pool = self.shared_cache = None
        if self.sharded:
            if self.dist.world > len(self.states):
                raise FuyouError(f"{self.dist.world} ranks for a model of {len(self.states)} stages: each rank owns the "
                                 f"optimizer state of whole stages, so use at most {len(self.states)} ranks")
            for st, r in zip(self.states, distributed.stage_owners([st.numel for st in self.states], self.dist.world)):
                st.owner, st.owned = r, r == self.dist.rank
        watchdog.set_timeout(off.stall_timeout)
        self.failed = False                 # a step raised: close() must not wait for or write anything
        self.resumed = resume
        self.completed = False
        self.abandoned = False              # the state belongs to no run (its directory was taken): close removes it
        self.tied = bool(self.model.stages[-1].shared)
        self._activation_memory()
        self._load_fixed_overhead()
        self._plan_memory(store_name)  # Budgets are promises: refused here, before creating anything
        if not resume:  # an earlier run's committed state in the way: said before the data is tokenized too
            refuse_committed_state(self.store_dirs, cfg, store_name)
        data = data() if callable(data) else data
        self._agree_on_data(data)
        self.batches, self.eval_batches = make_batches(cfg, data)
        self.fixed_overhead = resident_bytes()  # with the data: it is not the engine's to budget
        if not self.dev.is_host:  # and kept: the device enforces the budget (the fake: item by item)
            self.dev.set_plan(self.plan.device_items, self.plan.device_budget)
        every_step = off.commit_steps == 1
        for st in self.states:  # Note: [State copies] in layout
            resident = st.index in self.plan.resident_stages
            st.copies = st.copies[:copies_needed(off.commit, every_step, self.clipping and not resident)]
            if (self.fmt.master_is_compute(self.cdtype) and not resident and st.index not in self.plan.cached_stages
                    and st.owned and not self.lora):  # (LoRA's base has no master: its weights are all it stores)
                st.read_weights_from_master()  # (a resident stage's master is in CPU memory: it keeps a copy)

        state_cls = LoRATrainingState if self.lora else TrainingState
        self.ts = state_cls(cfg, self.states, self.plan, self.store_dirs, self.store_cfg, self.chunk, self.cdtype,
                            self.gdtype, self.clipping, self.dev)
        if self.lora:  # the adapters and their optimizer, on the compute device (as the reference trainer's)
            o = cfg.optim
            self.adapters = self.ts.adapters = self.ts.new_adapters(t.seed, self.device, fresh=not resume)
            self.lora_opt = self.ts.optimizer = torch.optim.AdamW(
                [{"params": list(self.adapters.values()), "weight_decay": o.weight_decay}],
                lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
        else:
            self.adapters = {}
        self.ts.sharded = self.sharded
        self.store = self.ts.open_store(resume, store_name)
        self._start_pipeline(resume)
        self._pooled: dict[int, object] = {}    # stages' gradient-pool buffers (CPU device)
        self._leaving = InFlight()              # gradients on their way to the host
        self._held_events: dict[int, object] = {}  # resident stages' gradient copies into held_grad
        self._spans: list = []                  # compute spans timed by device events (read after the step)
        # On a device, references are dropped as soon as compute is done with them: each holds device
        # memory the plan does not count twice. On the CPU the tensors are heap memory that glibc reuses
        # for the next stage's (bound_malloc); freeing them early returns the heap to the OS and the next
        # stage faults it back in (measured: GPT d=768 8 blocks b4 s256, 1.10 -> 1.46 s per step).
        self._drop_early = not self.dev.is_host
        # One micro-batch on an accelerator: each parameter's gradient is copied to the host as autograd
        # made it, not flattened into a stage-sized device buffer first (that copy was a stage of memory).
        # (Data parallel: the stage's gradient is summed over the ranks in one flat buffer.)
        self._direct = not self.dev.is_host and t.grad_accum == 1 and not self.dist.enabled
        self._norms: dict[str, Tensor] = {}
        self._summing = None                    # data parallel: a stage's gradient being summed over the ranks
        self._handed: dict[int, Handed] = {}    # backward's weights on their way to their update (Note: [Master
        # in memory])
        self._speculated: list[tuple[StageState, int, int]] = []  # this step's speculative updates (stage,
        # source and target copy), redone if the norm exceeds the threshold
        self._waiting: list[StageState] = []    # this step's stages updated once the norm is known
        self.clipped = False                    # the last step's norm exceeded the threshold

    def _undo_build(self) -> None:
        """A failed ``__init__`` lets go of what outlives it: the device's thread (a CUDA device's lander, the
        fake device's timer: one per failed build in a long-lived process, as a run that retries a name another
        run took) and the page-locked memory, unless a loader abandoned by ``_start_pipeline`` may still copy
        from it."""
        busy = any(getattr(self, part, None) is not None and not getattr(self, part).idle()
                   for part in ("streamer", "swapper"))
        try:
            if not busy:
                self.dev.synchronize()
                if getattr(self, "ts", None) is not None:
                    self.ts.release_host_memory()
                for name in ("weight_pool", "grad_pool", "cache_pool", "input_pool", "act_pool", "act_cpu_pool",
                             "opt_pool", "shared_pool", "exchange_pool"):
                    if getattr(self, name, None) is not None:
                        getattr(self, name).close()
        except Exception:  # noqa: BLE001 - the build's own error is the one raised
            pass
        finally:
            with contextlib.suppress(Exception):
                self.dev.close()

    def _plan_memory(self, store_name: str) -> None:
        """The device budget, the store's settings and the memory plan (``_memory_plan``: data parallel, with
        the ranks' shared weight cache where /dev/shm holds it), checked: a configuration that cannot fit is
        refused before anything is created or the data is tokenized."""
        off = self.cfg.offload
        self.gpu_mem = off.gpu_mem
        # a GPU's budget: with the compute on the CPU it held that device plan (items the CPU budget counts too)
        # to a second figure, in silence (a pass); it is ignored there, and the startup says so
        self.gpu_mem_ignored = self.dev.kind == "cpu" and self.gpu_mem is not None
        if self.gpu_mem_ignored:
            self.gpu_mem = None
        if self.gpu_mem is None and not self.dev.is_host:  # default: what the device has free now
            self.gpu_mem = int(self.dev.memory()["free"] * 0.95)

        self.store_cfg = store_cfg = off.store_config()
        self.store_dirs = [Path(d) / store_name for d in off.ssd_dirs]
        # OutOfCoreAdamW rounds the chunk to the store's checksum block; plan with that size.
        self.chunk = self.fmt.chunk_elements(off.optimizer_chunk, store_cfg.checksum_block)
        # Data parallel on one machine: the ranks map one weight cache (fuyou/store/shared.py), each charged
        # its share; where /dev/shm cannot hold it, each keeps its own (rank 0 decides, for every rank).
        # (LoRA: the base is read-only and the same on every rank: rank 0 fills the one cache, the others read it)
        self.cache_share = (self.dist.local_world if self.dist.enabled and self.dist.world == self.dist.local_world
                            and off.cache_weights else 1)
        self.plan = self._memory_plan()
        self.shm_note = ""
        if self.cache_share > 1:
            self._cache_layout = shared_cache_layout([s.wnumel for s in self.states], self.plan.cached_stages,
                                                     dtype_size(self.cdtype))
            total = self._cache_layout[1]
            free = self.dist.broadcast(shm_free(), "checking /dev/shm for the shared weight cache")  # rank 0's view
            if self.dist.broadcast(total + SHM_MARGIN > free, "deciding on the shared weight cache"):  # rank 0 decides
                self.shm_note = (f"{SHM_DIR} has {format_size(free)} free, less than the shared weight cache's "
                                 f"{format_size(total)} and {format_size(SHM_MARGIN)} to spare: each rank keeps its "
                                 f"own cache (enlarge {SHM_DIR}, e.g. a container's --shm-size, to share one)")
                self.cache_share = 1
                self.plan = self._memory_plan()
        self.plan.local_ranks = self.dist.local_world if self.dist.enabled else 1  # (in the refusal's figures)
        try:
            self.plan.check()  # Budgets are promises: refuse before creating anything (or tokenizing the data).
        except BudgetError as e:
            raise BudgetError(f"{e}{auto_fp32_clause(self.cfg.train)}") from None

    def _activation_memory(self) -> None:
        """The activation policy of each block, the cpu tier's share of the budget and the allocator's bounds
        that follow from them."""
        cfg, off, t = self.cfg, self.cfg.offload, self.cfg.train
        self.act = keep_policies(off.act_policy, cfg.model.n_layer,
                                 default_checkpoint_dtype(off.checkpoint_dtype, t.precision))
        # what a block kept whole saves (budget.saved_block_bytes)
        self.whole_block = saved_block_bytes(cfg.model, t.micro_batch_size, cfg.data.seq_len, dtype_size(self.cdtype),
                                             cfg.lora, cfg.data.may_pack, self.device.type == "cuda")
        self.act_cpu_mem, self.act_offtier = act_cpu_share(self.act, off, cpu_tier_need(
            cfg.model, self.act, t.micro_batch_size, cfg.data.seq_len, dtype_size(self.cdtype), len(self.micro),
            self.whole_block))
        # Activations swapped to the cpu/ssd tiers are freed out of order, mid-heap, where glibc cannot
        # return them: with such a policy every large block stays an mmap (bound_malloc's docstring).
        if self.act_offtier:
            bound_malloc(256 * 1024)
        else:
            blocks, gsize = self.model.stages[1:-1], dtype_size(self.cdtype)
            if self.lora:  # no weight gradients: a block's temporaries are its activations only
                gsize = 0
            largest = max((p.numel for b in blocks for p in b.params.values()), default=0)
            thr = malloc_threshold(cfg.model, t.micro_batch_size, cfg.data.seq_len, gsize * largest)
            bound_malloc(thr, thr + gsize * max((b.num_params for b in blocks), default=0))

    def _load_fixed_overhead(self) -> None:
        """What a run holds whatever its budget, loaded before the budget is measured against the process: the
        AdamW kernel library, torch.optim's machinery (LoRA), and on CUDA the context, cuBLAS and a block's kernels."""
        adamw_backend()  # load (or build) the kernel library now: part of the fixed overhead
        if self.lora:  # torch.optim imports its machinery on first use (~70 MiB): fixed overhead too
            _warm_torch_optim(self.device)
        if self.dev.kind == "cuda":
            try:
                self._warm_up()  # the CUDA context, cuBLAS and the kernels of a block: fixed overhead too
            except torch.cuda.OutOfMemoryError:
                pass  # one block does not fit at all: the memory plan refuses it below
            torch.cuda.empty_cache()  # outside the except: its traceback no longer holds the tensors

    def _start_pipeline(self, resume: bool) -> None:
        """The buffers, threads and pipelines of a step, over the opened store: the pinned pools, the
        out-of-core AdamW, the activation swapper, the weight streamer, the optimizer worker and (data parallel)
        the weight exchange; the initial state written, or the committed one resumed. A failure stops the threads
        started so far and closes the store."""
        cfg, off, t = self.cfg, self.cfg.offload, self.cfg.train
        try:
            dev = None if self.dev.is_host else self.dev  # pools whose buffers the device copies from are pinned
            self.opt_pool = PinnedPool(max(self.plan.cpu_items["optimizer buffers"], 4096))  # never reaches the device
            self.weight_pool = PinnedPool(max(self.plan.cpu_items.get("weight buffers", 0), 4096), device=dev)
            self.grad_pool = PinnedPool(max(self.plan.cpu_items["gradients in flight"], 4096), device=dev)
            self.cache_pool = PinnedPool(max(self.plan.cache_bytes, 4096), device=dev)
            self.input_pool = PinnedPool(max(self.plan.cpu_items.get("input batch staging", 0), 4096), device=dev)
            # a tied head's gradient of the embedding waits here through backward (Note: [Tied gradient])
            self.shared_pool = (PinnedPool(self.plan.cpu_items["tied embedding gradient"], device=dev)
                                if "tied embedding gradient" in self.plan.cpu_items else None)
            self.ts.cache_pool, self.ts.opt_pool = self.cache_pool, self.opt_pool
            self.opt = OutOfCoreAdamW(self.store, self.opt_pool, cfg.optim, chunk_numel=self.chunk,
                                      depth=off.optimizer_depth, num_threads=off.optimizer_threads, seed=t.seed)
            self.tracer = Tracer()
            self.counters = StepCounters()
            ref = lambda: self.counters  # noqa: E731 - the current step's counters, read by the threads
            self.ts.counters = ref
            self.act_pool = PinnedPool(max(self.plan.cpu_items.get("activation staging", 0), 4096), device=dev)
            self.act_cpu_pool = (PinnedPool(self.act_cpu_mem, device=dev)
                                 if self.act_cpu_mem and not self.dev.is_host else None)
            self.swapper = ActivationSwapper(self.store, self.dev, self.act_cpu_pool, self.act_pool,
                                             self.cfg.offload.act_chunk, self.tracer, ref)
            if self.dev.is_host:
                self.swapper.cpu_bytes = self.act_cpu_mem
            self.shared_cache = self._shared_cache()
            if resume:
                self._agree_on_commit()
                self.ts.resume()
                self._check_ranks_commits()
            else:
                self.ts.initialise(self.init_values)
            if self.lora and self.shared_cache is not None:  # rank 0 filled the base's cache: read it after that
                self.dist.barrier("filling the shared weight cache")
            # a quantised base: each block is dequantised into this one buffer before its forward and backward
            n = max((s.packing.dequant_numel for s in self.states if s.packing is not None), default=0)
            self._dequant = None
            if n and self.dev.is_host:  # on huge pages, as the cache the plain base is read from: 4 KiB pages made
                # the matmuls reading a dequantised stage measurably slower (TLB misses)
                self._dequant = huge_empty(n * dtype_size(self.cdtype)).view(self.cdtype)[:n]
            elif n:
                self._dequant = self.dev.empty(n, self.cdtype, "quantised base, a stage dequantised")
            self.streamer = WeightStreamer(self.states, self.store, self.weight_pool, self.dev, self.cdtype,
                                           off.prefetch_depth, self.tracer, ref)
            self.worker = OptimizerWorker(self.opt, self.cdtype, off.max_pending_updates, self.tracer, ref)
            self.ts.worker = self.worker
            if self.sharded:  # every stage this rank does not own gets its owner's weights (first: the initial ones)
                self.exchange_pool = PinnedPool(self.plan.cpu_items["weight exchange buffer"])
                self.exchange = WeightExchange(self.dist, self.store, self.exchange_pool, self.cdtype, self.chunk,
                                               self.tracer, ref, shared_cache=self.shared_cache is not None)
                self.exchange.schedule(self.states)
            if not self.dev.is_host:
                self.d2h_stream = self.dev.new_stream("grad-d2h")
        except BaseException:
            # the threads started so far stop (the loaders' start with their pool: a failed start left them idle
            # in a long-lived process, the review)
            for part in ("exchange", "worker", "streamer", "swapper"):
                obj = getattr(self, part, None)
                if obj is not None:
                    try:
                        obj.close(timeout=1.0) if part in ("exchange", "worker") else obj.close(wait=False)
                    except Exception:  # noqa: BLE001 - the first error is the one raised
                        pass
            self.store.close(sync=not resume)  # a refused resume leaves the state exactly as it found it
            raise

    def _agree_on_data(self, data) -> None:
        """Data parallel: every rank reads the same data (each machine its own data.path; the settings the ranks
        compare name the paths, not what is there). Ranks that read different files trained on each's own, or
        with train.epochs ran different numbers of steps: refused on every rank before the first step."""
        if not self.dist.enabled:
            return
        from fuyou.data.dataset import content_fingerprint

        f = content_fingerprint(data)
        lo, hi = self.dist.min_max(f, "comparing the ranks' data")
        if lo != hi:
            raise ConfigError(f"the ranks read different data (rank {self.dist.rank}'s fingerprint {f:x}; data.path "
                              f"{', '.join(self.cfg.data.path) or self.cfg.data.source}): give every rank the same "
                              f"files (each machine's data.path must hold the same data, and tokenize it the same way)")

    def _agree_on_commit(self) -> None:
        """Data parallel: a run killed between two ranks' record renames left some ranks' records a
        commit behind the others'. Every rank's state of the newer commit is durable (no record is
        written before every rank has synced it: ``commit_barrier``), so a rank behind rewrites its
        record for that commit from its store's tags (``roll_forward``) and the run resumes there."""
        if not self.dist.enabled or self.ts.cfg.offload.commit != "cow":
            return
        mine = self.ts.recorded_step()
        lo, hi = self.dist.min_max(mine, "comparing the ranks' last commits")
        if lo == hi:
            return
        f = self.ts.commit_fingerprint(hi)  # (LoRA: the adapters' file of step hi must be the same on every rank)
        a, b = self.dist.min_max(f, "comparing the ranks' states of the newer commit")
        # a rank whose record is invalid (-1) is not repaired: the resume refuses it with the steps found; one
        # with none was killed writing its first (step 0's, every rank's state of it synced)
        missing = not (self.ts.store_dirs[0] / RECORD).exists()
        if (0 <= mine or missing) and mine < hi and a == b and a >= 0 and self.ts.roll_forward(hi):
            print(f"fuyou: rank {self.dist.rank}: the run stopped between the ranks' commit records of step "
                  f"{hi}; this rank's state of that step is complete, its record was rewritten", file=sys.stderr)

    def _check_ranks_commits(self) -> None:
        """Every rank resumes the same step (fuyou/distributed.py: commits are all or nothing; a crash
        between two ranks' record renames was repaired by ``_agree_on_commit``, so records that still
        differ mean a state that cannot be combined: refused with the steps found)."""
        if not self.dist.enabled:
            return
        s = self.ts.start_step
        lo, hi = self.dist.min_max(s, "comparing the ranks' last commits")
        if lo != hi:
            raise DamagedStateError(f"the ranks' last commits differ (steps {lo} to {hi}; this rank, "
                                    f"{self.dist.rank}, has step {s}), and the ranks behind do not hold the newer "
                                    f"step's state (a store replaced or damaged since); each rank holds only its own "
                                    f"part of the state, so the parts cannot be combined. Nothing was overwritten; "
                                    f"start a new run (from the run's last snapshot, if any)")

    def _warm_up(self) -> None:
        """Create what CUDA creates on first use before the fixed overhead is measured (audit item 2):
        the context, cuBLAS's handle and workspace, and the kernels of one block's forward and
        backward at this batch and sequence length, with random weights that are freed after."""
        t, i = self.cfg.train, min(1, len(self.states) - 2)
        st = self.states[i]
        flat = (torch.randn(st.numel, device=self.device) * 0.02).to(self.cdtype)
        params = leaves(st.views(flat))
        x = torch.randn(t.micro_batch_size, self.cfg.data.seq_len, self.cfg.model.d_model, device=self.device,
                        requires_grad=True)
        with torch.enable_grad(), self._autocast():
            out = self._stage_fn(i)(params, x) if i > 0 else self._stage_fn(0)(params, x.long().abs())
        torch.autograd.grad(out.float().sum(), [p for p in params.values()] + ([x] if i > 0 else []),
                            allow_unused=True)
        del flat, params, x, out
        self.dev.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    # -- planning --------------------------------------------------------------------------------
    def _memory_plan(self) -> MemoryPlan:
        """The plan from ``budget.plan_memory`` with the activation items of ``budget.policy_memory``:
        the same two functions the planner uses."""
        t, off = self.cfg.train, self.cfg.offload
        act = activation_bytes(self.cfg.model, t.micro_batch_size, self.cfg.data.seq_len, frozen=bool(self.lora))
        extra_cpu, extra_dev, ckpt, share_cap = policy_memory(self.cfg.model, self.act, off, t.micro_batch_size,
                                                              self.cfg.data.seq_len, dtype_size(self.cdtype),
                                                              self.store_cfg.checksum_block, len(self.micro),
                                                              self.whole_block)
        if self.sharded:  # one chunk of compute weights on its way between the ranks (exchange.py)
            extra_cpu["weight exchange buffer"] = exchange_buffer_bytes(self.chunk, dtype_size(self.cdtype))
        working = None
        if not self.dev.is_host:
            csize = dtype_size(self.cdtype)
            working = device_working_bytes(self.cfg.model, t.micro_batch_size, self.cfg.data.seq_len, csize,
                                           max(s.numel for s in self.states), len(self.micro), frozen=bool(self.lora),
                                           packed=self.cfg.data.may_pack)
        return plan_memory(
            [s.numel for s in self.states], self.cfg.offload, chunk=self.chunk,
            io_buffer_bytes=self.store_cfg.queue_depth * max(self.store_cfg.block_size, self.store_cfg.checksum_block),
            act=act, checkpoint_bytes=ckpt, working_bytes=working, extra_cpu=extra_cpu, extra_device=extra_dev,
            csize=dtype_size(self.cdtype), gsize=dtype_size(self.gdtype), deferred=self.clipping,
            micro_batches=len(self.micro), tied=self.tied, compute_on_cpu=self.dev.is_host,
            device_budget=self.gpu_mem, fmt=self.fmt, lora_params=self._adapter_numel() if self.lora else None,
            owned={st.index for st in self.states if st.owned} if self.sharded else None, cache_share=self.cache_share,
            weight_bytes=[s.wnumel * dtype_size(self.cdtype) for s in self.states],
            dequant_bytes=max((s.numel for s in self.states if s.packing is not None), default=0) * dtype_size(self.cdtype),
            offtier_bytes=offtier_bytes(self.cfg.model, self.act, t.micro_batch_size, self.cfg.data.seq_len,
                                        dtype_size(self.cdtype)),
            share_cap=share_cap, handoff=handoff_slots(off, self.master_is_weights, self.dist.enabled))

    def _shared_cache(self) -> SharedSegment | None:
        """The ranks' one weight cache (``cache_share`` > 1): rank 0 makes it, the others map it, then its
        name goes (fuyou/store/shared.py); every rank page-locks its mapping for the device copies."""
        if self.cache_share == 1:
            return None
        offsets, total = self._cache_layout  # (of this plan: the one kept when the cache is shared)
        d = self.dist
        # rank 0's name and layout: every rank must have planned the same cache (offsets into one file); a rank
        # whose budget caches nothing takes part too (one that returned here hung the others: a pass)
        path, ref = d.broadcast((str(SHM_DIR / f"fuyou-cache-{os.getpid()}-{uuid.uuid4().hex[:8]}"),
                                 (self.plan.cached_stages, total)), "naming the shared weight cache")
        unlike = ref != (self.plan.cached_stages, total)
        if d.any(unlike, "comparing the ranks' weight caches"):
            who = (f"rank {d.rank} planned a weight cache of {len(self.plan.cached_stages)} stages "
                   f"({format_size(total)}) and rank 0 one of {len(ref[0])} ({format_size(ref[1])})" if unlike else
                   "another rank planned another weight cache than rank 0 (its error says which)")
            raise BudgetError(f"{who}: the ranks of a machine share one cache, so they need the same budgets "
                              f"(--cpu-mem, offload.resident_mem, offload.act_cpu_mem)")
        if not self.plan.cached_stages:
            return None
        seg = err = None
        try:
            if d.rank == 0:
                sweep_stale()
                try:
                    seg = SharedSegment(path, total, create=True)
                except (OSError, BudgetError) as e:
                    err = e
            if d.any(err is not None, "making the shared weight cache"):  # every rank learns of a failure at once
                raise err or BudgetError(f"another rank could not make the ranks' shared weight cache under {SHM_DIR} "
                                         f"(its error says why)")
            if d.rank != 0:
                try:
                    seg = SharedSegment(path, total, create=False)
                except (OSError, StoreError) as e:
                    err = e
            fault("map_cache")  # (tests: a rank killed between making the cache and mapping it)
            if d.any(err is not None, "mapping the shared weight cache"):
                raise err or BudgetError(f"another rank could not map the ranks' shared weight cache under {SHM_DIR} "
                                         f"(its error says why)")
        finally:
            if d.rank == 0:  # by name: whatever happened above, nothing stays under /dev/shm
                Path(path).unlink(missing_ok=True)
        if not self.dev.is_host:
            self.dev.register_host(seg.tensor)
        self.ts.shared_cache, self.ts.cache_offsets, self.ts.rank = seg, offsets, d.rank
        return seg

    def _adapter_numel(self) -> int:
        return sum(spec.numel for st in self.model.stages for spec in st.adapters.values())

    def forward_order(self) -> list[int]:
        """Stage indices in the order the forward pass needs their weights (the embedding's again for a
        tied head, just before the head)."""
        S = len(self.states)
        return list(range(S - 1)) + ([0] if self.tied else []) + [S - 1]

    def step_order(self) -> list[int]:
        """Stage indices in the order their weights are needed in one step: each once in forward and
        once in backward, whatever the number of micro-batches (layer-major)."""
        return self.forward_order() + list(range(len(self.states) - 2, -1, -1))

    def _trim_heap(self) -> None:
        """``malloc.trim_heap`` where compute runs on the CPU: its temporaries are the heap's. On a GPU they are
        the device's, and the trim's cost (the walk, the pages faulted in again) buys nothing."""
        if self.dev.kind != "cuda":
            trim_heap()

    def train_step(self, step: int) -> StepStats:
        try:
            return self._train_step(step)
        except BaseException:
            self.failed = True
            raise
        finally:
            self._trim_heap()  # (malloc.trim_heap: the step's free heap would stay beside the next pass's)

    def _train_step(self, step: int) -> StepStats:
        t = self.cfg.train
        if self.exchange is not None:
            self.exchange.check()
        if self.counters.started:  # the previous step's counters were not read (step_counters): closed unread
            self._roll_counters()
        self.counters.started = True
        sched = self.cfg.offload.clip_schedule
        self._defer = self.clipping and (sched == "defer" or (sched == "auto" and self.clipped))
        self.counters.deferred = self._defer
        self.tracer.enabled = step == self.trace_step
        if self.store is not None:  # the SSD writes and the optimizer's reads of a traced step (a callback each)
            self.store.write_observer = self._trace_write if self.tracer.enabled else None
        if self.opt is not None:
            self.opt.read_observer = self._trace_read if self.tracer.enabled else None
        lr = lr_of(self.cfg, step)
        self._spans.clear()
        anchor, anchor_t = self.dev.event(timing=True).record(), time.perf_counter()  # device time -> host time
        self.streamer.plan(self.step_order(), step, keep=self._handoff_positions())
        self._pos = 0
        try:
            total = self._step(step, lr)
            self._drop_handed()  # (none is left: each stage kept for its update was updated)
        except BaseException as e:
            self._summing = None
            self._drop_handed()
            self.streamer.drain(patient=not isinstance(e, watchdog.StallError))
            raise
        if self.lora:
            self._step_index = step
            grad_norm = self._lora_update(lr)
        else:
            grad_norm = self._finish_clipping(lr, step) if self.clipping else None
        if self.sharded:  # every update of the step is submitted: the owners' new weights go to the others
            self.exchange.schedule(self.states)
        self._host_wait()
        if self.dist.enabled:  # the global batch's loss (each rank's share is already over its divisor)
            self.dist.all_reduce_(total, "summing the loss over the ranks")
        loss = float(total)  # see Note: [Sync points]
        self._read_spans(anchor, anchor_t)
        self.dev.check()
        if not math.isfinite(loss):
            raise non_finite(f"the loss of step {step + 1} is {loss}", step + 1, self.cfg.offload.commit == "cow",
                             self.cfg.optim.lr)
        due = self.ts.commit_due(step + 1)
        if self.dist.enabled and self.cfg.offload.commit_steps is None:  # a time interval: rank 0's clock decides
            due = self.dist.broadcast(due, "agreeing on a commit")
        if due:
            self.ts.submit_commit(step + 1)
        tokens = t.grad_accum * t.micro_batch_size * self.cfg.data.seq_len
        return StepStats(loss, lr, grad_norm, tokens, self._loss_tokens)

    def _handoff_positions(self) -> set[int]:
        """Positions of this step's loads whose weights go on to their stage's update (Note: [Master in
        memory]): each streamed stage's last load (its backward's; the head's only one) whose master is
        its weights, unless updates wait for the norm."""
        if self._defer or not self.plan.handoff:
            return set()
        last = {i: p for p, i in enumerate(self.step_order())}
        return {p for i, p in last.items()
                if self.states[i].cache is None and self.states[i].keys.weights == self.states[i].keys.master}

    def _drop_handed(self) -> None:
        for h in self._handed.values():
            h.drop(self.dev)
        self._handed.clear()

    def _master_in(self, st: StageState) -> dict:
        """``UpdateJob``'s master fields for a stage's update that reads its copy ``cur`` (Note: [Master in
        memory]): its weight cache, or the weights its backward read; none else."""
        handed = self._handed.pop(st.index, None)
        fields = {}
        if self.master_is_weights and st.resident is None and st.owned:
            if st.cache is not None:
                fields = {"master_in": st.cache}
            elif handed is not None and handed.key == st.keys.master:
                fields, handed = {"master_in": handed.tensor, "master_release": handed.release,
                                  "master_event": handed.event}, None
        if handed is not None:  # not the update's to take: back to the pool
            handed.drop(self.dev)
        return fields

    trace_step = 1  # which step's tasks ``--trace`` records (the second: the first warms caches)
    _evaluations = 0  # evaluations run by this process (faults.py's ``evaluation`` point)

    def _trace_write(self, key: str, nbytes: int, t0: float, t1: float) -> None:
        self.tracer.add(f"write {key}", "ssd-write", t0, t1, bytes=nbytes)

    def _trace_read(self, key: str, nbytes: int, t0: float, t1: float) -> None:
        self.tracer.add(f"read {key}", "ssd-read", t0, t1, bytes=nbytes)

    def _stage_fn(self, i: int, pos: Tensor | None = None, key: int | None = None):
        """Stage ``i`` as a function of (weights, input, activation context), for a micro-batch whose
        token positions are ``pos`` (packed documents; None: one document per row) and whose LoRA
        dropout key is ``key`` (None: no dropout)."""
        stage = self.model.stages[i]
        if i == 0:  # the residual stream is fp32, as in the reference trainer
            return lambda p, x, acts=None: stage.forward(p, x, pos=pos).float()
        return lambda p, x, acts=None: stage.forward(p, x, acts=acts, pos=pos, key=key)

    def _bind(self, i: int, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """A stage's weights with its LoRA adapters (by local name) added, when it has any."""
        st = self.model.stages[i]
        if not st.adapters:
            return params
        return {**params, **{local: self.adapters[st.key(local)] for local in st.adapters}}

    def _autocast(self):
        return autocast(self.device, self.cfg.train.precision)

    def _step(self, step: int, lr: float) -> Tensor:
        """One step's forward and backward, layer-major (module docstring); returns the summed loss."""
        S, G, M = len(self.states), self.cfg.train.grad_accum, len(self.micro)
        keys = [dropout_key(self.cfg.train.seed, step, j) if self.lora else None for j in self.micro]
        trainable = set(self.model.stages[1].adapters) if self.lora else None  # None: every weight trains
        batches = [self.batches.batch(step * G + j) for j in self.micro]
        # on the host: the loss's divisor (the global batch's, whichever micro-batches this rank runs)
        mine = dict(zip(self.micro, batches))  # the other ranks' micro-batches are read for their counts only
        n_loss = sum((mine.get(j) or self.batches.batch(step * G + j)).loss_tokens for j in range(G))
        self._loss_tokens = n_loss
        xs = [self._to_device(b.tokens, "input batch") for b in batches]
        ys = [self._to_device(b.targets, "input batch") for b in batches]
        ps = [None if b.positions is None else self._to_device(b.positions, "input batch") for b in batches]
        batches = None
        kept: list[dict[int, BlockState]] = [{} for _ in range(M)]
        h: list[Tensor | None] = list(xs)  # each micro-batch's residual stream between stages
        for i in range(S - 1):
            w = self.streamer.get(self._pos)
            t0 = self._begin()
            params = self._bind(i, self.states[i].weight_views(w.flat, self._dequant))
            bases = weight_bases(w.flat, params, self.states[i].packing)
            for j in range(M):
                if i == 0:
                    with torch.no_grad(), self._autocast():
                        h[j] = self._stage_fn(0, ps[j])(params, h[j])
                else:
                    h[j], kept[j][i] = forward_block(self.swapper, f"{i - 1}.{j}", self.act[i - 1],
                                                     self._stage_fn(i, ps[j], keys[j]), bases, params, h[j],
                                                     self._autocast, trainable)
            self._compute(f"forward {self.states[i].stage.name}", t0)
            # References go before the release: the next load may take the memory once the GPU is done
            # with it (weights.py), and a reference held here would keep it on the device.
            w = params = bases = None
            self.streamer.release(self._pos)
            self._pos += 1
            fault("forward", step)
        # Head: forward and backward at once, per micro-batch; h becomes the gradient of each one's output.
        head = self.states[-1]
        emb_pos = None
        if self.tied:
            emb_pos = self._pos
            emb = self.streamer.get(self._pos)
            self._pos += 1
        w = self.streamer.get(self._pos)
        t0 = self._begin()
        own = head.weight_views(w.flat)
        shared = {"lm_head.weight": self.states[0].weight_views(emb.flat)["wte"]} if self.tied else {}
        total = torch.zeros((), device=self.device)
        acc = shared_acc = None
        for j in range(M):
            o, sh = leaves(own, trainable), leaves(shared, trainable)  # LoRA: the head's weights are frozen
            h_in = h[j].detach().requires_grad_(True)
            h[j] = None
            with torch.enable_grad(), self._autocast():
                loss = head.stage.forward({**o, **sh}, h_in, ys[j], loss_tokens=n_loss)
            self._before_grad()
            grads = torch.autograd.grad(loss, [h_in, *(v for v in (*o.values(), *sh.values()) if v.requires_grad)])
            total += loss.detach()
            h[j] = grads[0]
            if self.lora:
                o = sh = h_in = grads = loss = None
                continue
            gmap = dict(zip([*o, *sh], grads[1:]))
            if self.tied:
                g = gmap.pop("lm_head.weight")
                if shared_acc is None:  # in the gradients' dtype: fp32 when micro-batches are summed
                    shared_acc = self.dev.track(g.to(self.gdtype), self._shared_item)
                else:
                    shared_acc.add_(g)
            acc = self._accumulate(head, gmap, acc)
            o = sh = h_in = grads = gmap = g = loss = None  # their graphs' leaves view the weights
        self._compute("forward+backward head", t0)
        self._trim_heap()  # the head's slices, a vocabulary wide, freed: the blocks' backward must not lie beside them
        own = shared = w = emb = None  # before the release, as above
        self._hand_on(head, self.streamer.release(self._pos, take=True))
        self._pos += 1
        if emb_pos is not None:
            self.streamer.release(emb_pos)
        if not self.lora:
            self._stage_grads(head, acc, lr, step)
        if self._drop_early:  # nothing of the head stays on the device through backward
            acc = None
        shared_out = self._shared_out(shared_acc) if shared_acc is not None and self.shared_pool else None
        if shared_out is not None:
            shared_acc = None
        # Backward over the blocks and the embedding; kept activations come back in the order used.
        units = [(i, j) for i in range(S - 2, 0, -1) for j in range(M)]
        ahead, u = self.cfg.offload.act_prefetch_blocks, 0
        for i in range(S - 2, -1, -1):
            st = self.states[i]
            w = self.streamer.get(self._pos)
            t0 = self._begin()
            acc = None
            params = self._bind(i, st.weight_views(w.flat, self._dequant)) if i > 0 else None  # (quantised base: dequantised once)
            bases = weight_bases(w.flat, params, st.packing) if i > 0 else None
            for j in range(M):
                if i > 0:
                    for bi, bj in units[u:u + ahead + 1]:
                        kept[bj][bi].prefetch(self.swapper)
                    u += 1
                    h[j], gmap = backward_block(self.swapper, kept[j].pop(i), self._stage_fn(i, ps[j], keys[j]),
                                                bases, params, h[j], self._autocast, self._before_grad, trainable)
                    if self.lora:  # the adapters' gradients, summed over the micro-batches in order
                        self._lora_grads(i, gmap)
                        continue
                elif self.lora:  # nothing of the embedding trains
                    h[j] = None
                    continue
                else:
                    emb = leaves(st.weight_views(w.flat))
                    with torch.enable_grad(), self._autocast():
                        out = self._stage_fn(0, ps[j])(emb, xs[j])
                    self._before_grad()
                    gmap = dict(zip(emb, torch.autograd.grad(out, list(emb.values()), h[j])))
                    h[j] = emb = out = None
                acc = self._accumulate(st, gmap, acc)
                gmap = None
            self._compute(f"backward {st.stage.name}", t0)
            w = params = bases = None  # before the release, as above
            self._hand_on(st, self.streamer.release(self._pos, take=True))
            self._pos += 1
            fault("backward", step)
            if i == 0 and shared_out is not None:
                shared_acc = self._shared_in(*shared_out)
                shared_out = None
            reduced = False
            if i == 0 and shared_acc is not None:
                # The head's and the embedding's sums over the micro-batches, added once (the reference
                # trainer's order; the order of two addends is exact). Data parallel: each is summed over
                # the ranks first, so two ranks of one micro-batch each add as one process does.
                if self.dist.enabled:
                    self._finish_sum()
                    self._sum_ranks(st, acc, "the embedding's gradient")
                    self._sum_ranks(st, shared_acc, "the tied head's gradient")
                    reduced = True
                (acc if isinstance(acc, dict) else st.views(acc))["wte"].add_(shared_acc)
                shared_acc = None
            if self.lora:
                continue
            self._stage_grads(st, acc, lr, step, reduced)
            if self._drop_early:
                acc = None
        self._finish_sum()  # the last stage's sum over the ranks
        return total

    def _hand_on(self, st: StageState, handed: Handed | None) -> None:
        """Backward's weights of ``st``, kept for its update (Note: [Master in memory]), until ``_master_in``."""
        if handed is not None:
            self._handed[st.index] = handed

    def _lora_grads(self, i: int, gmap: dict[str, Tensor]) -> None:
        """Add a micro-batch's adapter gradients of stage ``i`` into their ``.grad`` (the first assigned,
        later ones added: what autograd does across the reference's micro-batches)."""
        st = self.model.stages[i]
        for local, g in gmap.items():
            p = self.adapters[st.key(local)]
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

    def _lora_update(self, lr: float) -> float | None:
        """After backward: clip the adapters' global gradient norm and step their AdamW, as the
        reference trainer does (the same torch calls on the same tensors in the same order)."""
        params = list(self.adapters.values())
        if self.dist.enabled:  # the adapters' global gradient, in one flat sum over the ranks
            grads = [p.grad for p in params]
            flat = self.dist.all_reduce_(torch.cat([g.reshape(-1) for g in grads]), "summing the adapters' gradients")
            torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])
        norm = None
        if self.clipping:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip))
            # as clip_grad_norm_ scales: by max_norm / (norm + 1e-6), capped at 1
            self.counters.clipped = self.cfg.train.grad_clip / (norm + 1e-6) < 1.0
        fault("optimizer", self._step_index)
        for g in self.lora_opt.param_groups:
            g["lr"] = lr
        self.lora_opt.step()
        self.lora_opt.zero_grad(set_to_none=True)
        return norm

    @property
    def _shared_item(self) -> str:
        return "gradients leaving the device" if self.shared_pool is not None else "tied embedding gradient"

    def _shared_out(self, g: Tensor):
        """The tied head's gradient of the embedding, copied to its pinned host buffer for the blocks'
        backward (Note: [Tied gradient]): (the buffer, the copy's event)."""
        buf = watchdog.acquire(self.shared_pool, g.numel() * g.element_size(), g.dtype,
                               "the host buffer of the tied embedding's gradient")
        host = buf.tensor.view(g.shape)
        return buf, host, self._gradient_d2h([(host, g)], "tied embedding")

    def _shared_in(self, buf, host: Tensor, ev) -> Tensor:
        """Back on the device for the embedding's sum, on the compute stream (0.1 s at 175B's 2.4 GB,
        once a step); the host buffer is reused once the copy has landed."""
        self.dev.compute.wait_event(ev)
        g = self.dev.empty(host.numel(), host.dtype, "gradients leaving the device").view(host.shape)
        self.dev.to_device(g, host, self.dev.compute)
        self.dev.after(self.dev.event().record(self.dev.compute), buf.release)
        self.counters.add(h2d_bytes=host.numel() * host.element_size())
        return g

    def _before_grad(self) -> None:
        """Before autograd allocates a stage's parameter gradients on an accelerator with one micro-batch
        per step: the previous stage's must have left the device (``_direct``; sync point (f))."""
        if self._direct:
            self._bound_leaving(D2H_DEPTH - 1)

    def _accumulate(self, st: StageState, grads: dict[str, Tensor], acc: Tensor | dict | None) -> Tensor | dict:
        """A micro-batch's gradients of a stage added into the stage's one flat gradient: the first
        micro-batch's are copied into a new buffer (``_grad_buffer``), later ones added in place, in
        micro-batch order (the reference's sums: ``.grad`` accumulated over micro-batches). With one
        micro-batch on an accelerator the gradients stay as autograd made them (``_direct``)."""
        if self._direct:
            return {n: self.dev.track(grads[n], "gradients leaving the device") for n in st.slots}
        if acc is None:
            return st.flatten_grads(grads, self._grad_buffer(st))
        views = st.views(acc)
        for name in st.slots:
            views[name].add_(grads[name])  # promoted to the gradient dtype, as autograd adds into .grad
        return acc

    def _host_wait(self) -> None:
        """Wait for the compute stream on a blocking-sync event: the host thread sleeps (a stream
        synchronise, which ``float()`` of a device tensor does, spins a core the CPU Adam needs)."""
        if not self.dev.is_host:
            self.dev.event().record(self.dev.compute).synchronize()

    def _begin(self):
        """An event on the compute stream where a timed span of compute starts."""
        return self.dev.event(timing=True).record()

    def _compute(self, name: str, t0) -> None:
        """A span of compute from ``t0``: timed by device events, read after the step's sync point
        (``_read_spans``), as a CUDA kernel launch returns long before the GPU has run it."""
        self._spans.append((name, t0, self.dev.event(timing=True).record()))

    def _read_spans(self, anchor, anchor_t: float) -> None:
        """The step's compute time and trace rows, once the compute stream has reached the sync point."""
        for name, ev0, ev1 in self._spans:
            dur = ev0.elapsed_s(ev1)
            self.counters.add(compute_s=dur)
            if self.tracer.enabled:
                start = anchor_t + anchor.elapsed_s(ev0)
                self.tracer.add(name, "compute", start, start + dur)
        self._spans.clear()
        self.tracer.resolve_device(anchor, anchor_t)

    def _to_device(self, t: Tensor, item: str) -> Tensor:
        """A host tensor (the input batch) on the compute device: through a pinned pool buffer and an
        asynchronous copy on the compute stream, so the host does not stall on a pageable copy."""
        if self.dev.is_host:
            return t
        nbytes = t.numel() * t.element_size()
        buf = watchdog.acquire(self.input_pool, nbytes, t.dtype, "a buffer for the input batch")
        buf.tensor.copy_(t.reshape(-1))
        out = self.dev.empty(t.numel(), t.dtype, item)
        self.dev.to_device(out, buf.tensor, self.dev.compute)
        self.dev.after(self.dev.event().record(), buf.release)
        return out.view(t.shape)

    def _holds_grad(self, st: StageState) -> bool:
        """A resident stage under exact clipping: its gradient is held in CPU memory (``held_grad``) until
        the global norm is known, for its update then or for a redo (Note: [Spare copies])."""
        return self.clipping and st.resident is not None

    def _waits_for_norm(self, st: StageState) -> bool:
        """A resident stage under exact clipping without a spare copy, or with one in ``defer`` mode:
        its update waits for the global norm."""
        return self._holds_grad(st) and (st.spare is None or self._defer)

    def _grad_buffer(self, st: StageState) -> Tensor:
        """Where a stage's gradient is gathered (its micro-batches' sum): on a CPU device the CPU
        buffer it is handed over in, straight away (a resident stage's ``held_grad`` or a gradient-pool
        buffer); on an accelerator a new device buffer, copied out by ``_to_host``."""
        if self.dev.is_host and self._holds_grad(st):
            return st.held_grad
        if self.dev.is_host:
            # Reused pool memory (huge pages), not a fresh allocation per stage: a new 25 MB tensor
            # costs its page faults every time (measured: ~10 ms per GPT-3 350M block on 2 cores).
            pooled = watchdog.acquire(self.grad_pool, st.numel * dtype_size(self.gdtype), self.gdtype,
                                      f"a gradient buffer for {st.stage.name}")
            self._pooled[st.index] = pooled
            return pooled.tensor
        self._finish_sum()  # the previous stage's gradient leaves the device before this one is made
        self._bound_leaving(D2H_DEPTH - 1)  # sync point (f)
        return self.dev.empty(st.numel, self.gdtype, "gradients leaving the device")

    def _stage_grads(self, st: StageState, flat: Tensor | dict[str, Tensor], lr: float, step: int,
                     reduced: bool = False) -> None:
        """Hand a stage's gradient (summed over the micro-batches, ``_grad_buffer``; or, ``_direct``, the
        parameters' gradients by name) to the optimizer: an update now (speculative under exact
        clipping), or, for a resident stage under exact clipping, into its CPU buffer until the global
        norm is known (module docstring)."""
        if self.dist.enabled and not reduced:
            # Data parallel: start the sum over the ranks and finish this hand-off when the next stage's
            # gradient is ready (or backward ends), so the sum overlaps that stage's backward.
            self._finish_sum()
            self._summing = (st, flat, lr, step, self._start_sum(st, flat, f"{st.stage.name}'s gradient"))
            return
        pooled = self._pooled.pop(st.index, None)
        if self.sharded and st.owned:  # its last weights must have gone to the other ranks (exchange.py)
            watchdog.wait_event(st.exchanged, f"the exchange of {st.stage.name}'s weights (before its next update)")
        if not st.owned:  # data parallel, sharded: its owner updates it; this rank's share of the norm is 0
            if self.clipping:
                for n in st.slots:
                    self._norms[st.stage.key(n)] = torch.zeros((), device=self.device)
            if pooled is not None:
                pooled.release()
            elif not self.dev.is_host:  # a device buffer the reduce read: held until the compute stream is past
                # it, and counted as a gradient leaving the device until then (the next one waits: sync point (f))
                self._leaving.add(self.dev.event().record(self.dev.compute))
            return
        if self.clipping:
            views = flat if isinstance(flat, dict) else st.views(flat)
            # In the reference's memory order: its .grad is laid out as the parameter (contiguous), while
            # a gradient here may come out transposed (a matmul over an activation the swapper brought
            # back), and a norm sums in memory order: 1 ulp apart, found on fc2 with fc2=cpu
            if self.dev.is_host and self.gdtype != torch.float32:  # one read (adamw.cpp, Note: [Gradient norm on the CPU])
                norms = [grad_norm(views[n]) for n in st.slots]
            else:
                norms = torch._foreach_norm([views[n].float().contiguous() for n in st.slots], 2)
            for n, v in zip(st.slots, norms):
                self._norms[st.stage.key(n)] = v
        if self._holds_grad(st):
            event = None
            if flat is not st.held_grad:
                _, _, event = self._to_host(st, flat, into=st.held_grad)
            if self._waits_for_norm(st):
                self._held_events[st.index] = event
                self._waiting.append(st)
                return
            # Note: [Spare copies]: read one copy, write the other; the newest is ``resident`` from now on
            job = UpdateJob(st, st.held_grad, self.gdtype, lr, step + 1, 1.0, src=st.cur, dst=st.cur, event=event,
                            state_in=st.resident, state_out=st.spare)
            st.resident, st.spare = st.spare, st.resident
            st.dirty = True
            self._speculated.append((st, job.src, job.dst))
            self.worker.submit(job)
            return
        host, release, event = self._to_host(st, flat)
        if pooled is not None:
            release = pooled.release
        if self._defer and st.resident is None:
            # Deferred: the worker only saves the gradient now; the update follows the norm.
            self.worker.submit(UpdateJob(st, host, self.gdtype, lr, step + 1, 1.0, src=st.cur, dst=st.cur,
                                         release=release, event=event, save_grad=grad_key(st), update=False))
            self._waiting.append(st)
            return
        # A resident stage is updated in CPU memory; its store copy is chosen when it is flushed.
        dst = st.cur if st.resident is not None else st.target(keep_source=self.clipping)
        # (the hand-off taken here, where nothing but the submit comes before the worker has it: a stage without
        # one leaves nothing, and one left by an error on the way is dropped with the step)
        job = UpdateJob(st, host, self.gdtype, lr, step + 1, 1.0, src=st.cur, dst=dst, release=release,
                        event=event, save_grad=grad_key(st) if self.clipping else None, **self._master_in(st))
        st.dirty = st.resident is not None
        if self.clipping:
            self._speculated.append((st, job.src, job.dst))
        self.worker.submit(job)
        st.cur = dst  # after submit's begin_update: a load reading copies[cur] (the master as weights) waits for it

    def _start_sum(self, st: StageState, t: Tensor, what: str):
        """Start summing a gradient of stage ``st`` over the ranks: into its owner (sharded state), or
        into every rank (replicated: LoRA's frozen base has no state to shard). ``_complete_sum`` of
        the returned handle finishes it."""
        # NCCL sums device memory in place; the fake device's memory goes through gloo, whose worker
        # thread drops its reference to the tensor a moment after the call returns, which the device's
        # accounting would charge to the next stage: an untracked copy stands in for the device buffer.
        tmp = t.clone() if self.dev.kind == "fake" else t
        dst = st.owner if self.sharded else None
        what = f"summing {what} " + (f"into rank {dst}" if self.sharded else "over the ranks")
        return self.dist.start_sum(tmp, dst, what), tmp, t

    def _complete_sum(self, handle) -> None:
        work, tmp, t = handle
        self.dist.finish(work)
        if tmp is not t:
            t.copy_(tmp)

    def _sum_ranks(self, st: StageState, t: Tensor, what: str) -> None:
        """``_start_sum`` and wait for it."""
        self._complete_sum(self._start_sum(st, t, what))

    def _finish_sum(self) -> None:
        """Complete the pending sum of a stage's gradient over the ranks and hand the gradient on."""
        if self._summing is None:
            return
        st, flat, lr, step, handle = self._summing
        self._summing = None
        self._complete_sum(handle)
        self._stage_grads(st, flat, lr, step, reduced=True)

    def _to_host(self, st: StageState, flat: Tensor | dict[str, Tensor], into: Tensor | None = None):
        """The stage's gradient in one flat CPU buffer (a grad-pool buffer, or ``into``), a release
        callback and the copy's event; see Note: [Gradient hand-off]. ``flat`` is the flat device
        gradient, or the parameters' gradients by name (each copied to its place). Device memory is
        freed once the copy has run (``record_stream``), not when the worker is done with the host copy."""
        if self.dev.is_host:
            if into is not None:
                into.copy_(flat)
                return into, None, None
            return flat, None, None
        release = None
        parts = ([(flat, 0)] if not isinstance(flat, dict) else
                 [(flat[n].reshape(-1), s.offset) for n, s in st.slots.items()])
        if into is None:
            buf = watchdog.acquire(self.grad_pool, st.numel * dtype_size(self.gdtype), self.gdtype, "a gradient buffer")
            into, release = buf.tensor, buf.release
        ev = self._gradient_d2h([(into[offset:offset + part.numel()], part) for part, offset in parts], st.stage.name)
        return into, release, ev

    def _gradient_d2h(self, copies: list[tuple[Tensor, Tensor]], name: str):
        """Copy device gradients to pinned host memory ((host, device) pairs) on the D2H stream, after
        the compute that made them; the copy is one of the gradients leaving the device (``_leaving``).
        Returns its event."""
        self.d2h_stream.wait_stream(self.dev.compute)
        timed = self.tracer.enabled
        start = self.dev.event(timing=True).record(self.d2h_stream) if timed else None
        for host, part in copies:
            self.dev.record_stream(part, self.d2h_stream)
            self.dev.to_host(host, part, self.d2h_stream)
        ev = self.dev.event(timing=timed).record(self.d2h_stream)
        self._leaving.add(ev)
        nbytes = sum(part.numel() * part.element_size() for _, part in copies)
        self.counters.add(d2h_bytes=nbytes)
        if timed:  # the copy's own time on the device (as the weights' H2D rows)
            self.tracer.add_gpu(f"d2h gradient {name}", "d2h", start, ev, bytes=nbytes)
        return ev

    def _bound_leaving(self, n: int) -> None:
        """At most ``n`` gradients on their way to the host (the plan's "gradients leaving the device"):
        the main thread waits for older copies beyond that, sync point (f)."""
        self._leaving.bound(n)

    def _finish_clipping(self, lr: float, step: int) -> float:
        """Exact clipping after backward: the global norm over every parameter (in the reference's
        order), then the resident stages' updates and, when the norm exceeds the threshold, the redo
        of every speculative update from its source copy with the clipped gradient (module docstring)."""
        order = list(self.model.param_specs())
        norms = torch.stack([self._norms[k] for k in order])
        if self.sharded:  # each parameter's norm is its owner's; the others hold 0 (an exact sum)
            self.dist.all_reduce_(norms, "summing the gradient norms over the ranks")
        total = torch.linalg.vector_norm(norms, 2)
        self._norms.clear()
        both = torch.stack([total, torch.clamp(self.cfg.train.grad_clip / (total + 1e-6), max=1.0)])
        self._host_wait()
        norm, clip = both.tolist()  # sync point (d): one transfer for the norm and the clip factor
        if not math.isfinite(norm):
            raise non_finite(f"the gradient norm of step {step + 1} is {norm}", step + 1,
                             self.cfg.offload.commit == "cow", self.cfg.optim.lr)
        self.clipped = clip < 1.0
        self.counters.clipped = self.clipped
        # Stages in the order the next forward needs them: the resident ones (0, 1, ...) first.
        for st in sorted(self._waiting, key=lambda s: s.index):
            if st.resident is not None:
                self.worker.submit(UpdateJob(st, st.held_grad, self.gdtype, lr, step + 1, clip, src=st.cur,
                                             dst=st.cur, event=self._held_events.pop(st.index, None),
                                             state_out=st.resident))
                st.dirty = True
            else:  # deferred: its gradient is on the SSD (a cached master is read from the cache)
                dst = st.target(keep_source=False)
                self.worker.submit(UpdateJob(st, grad_key(st), self.gdtype, lr, step + 1, clip, src=st.cur,
                                             dst=dst, **self._master_in(st)))
                st.cur = dst
        if self.clipped:
            for st, src, dst in sorted(self._speculated, key=lambda j: j[0].index):
                if st.resident is not None:  # from its spare copy, with the gradient it holds (Note: [Spare copies])
                    self.worker.submit(UpdateJob(st, st.held_grad, self.gdtype, lr, step + 1, clip, src=src, dst=dst,
                                                 redo=True, state_in=st.spare, state_out=st.resident))
                    continue
                self.worker.submit(UpdateJob(st, grad_key(st), self.gdtype, lr, step + 1, clip, src=src, dst=dst,
                                             redo=True))
        self._waiting.clear()
        self._speculated.clear()
        return norm

    # -- evaluation and state --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, should_stop=None) -> float | None:
        if self.eval_batches is None:
            return None
        self.worker.wait_all()  # the step's tail lands in its counters; the evaluation's reads in none
        counted, self.counters = self.counters, StepCounters()
        try:
            return self._evaluate(should_stop)
        finally:
            self.counters = counted
            self._trim_heap()

    @torch.no_grad()
    def _evaluate(self, should_stop=None) -> float:
        S = len(self.states)
        every = list(self.eval_batches)
        batches = every[self.dist.rank::self.dist.world]  # each rank its share
        self.streamer.plan(self.forward_order() * len(batches))
        pos, total, count = 0, 0.0, 0
        try:
            # asked as often on every rank (a rank with a batch fewer too): the answer may be agreed over them
            rounds = -(-len(every) // self.dist.world)
            for k in range(rounds):
                if k == min(1, rounds - 1):
                    fault("evaluation", self._evaluations)  # tests: a stop or a kill in the middle of an evaluation
                if should_stop is not None and should_stop():
                    raise EvaluationStopped
                if k >= len(batches):
                    continue
                b = batches[k]
                h = self._to_device(b.tokens, "input batch")
                p = None if b.positions is None else self._to_device(b.positions, "input batch")
                for i in range(S - 1):
                    w = self.streamer.get(pos)
                    with autocast(self.device, self.cfg.train.precision):
                        h = self._stage_fn(i, p)(self._bind(i, self.states[i].weight_views(w.flat, self._dequant)), h)
                    w = None  # dropped before the release (Engine._step)
                    self.streamer.release(pos)
                    pos += 1
                params = {}
                if self.tied:
                    params["lm_head.weight"] = self.states[0].weight_views(self.streamer.get(pos).flat)["wte"]
                    pos += 1
                params.update(self.states[-1].weight_views(self.streamer.get(pos).flat))
                with autocast(self.device, self.cfg.train.precision):  # the batch's summed loss
                    total += float(self.states[-1].stage.forward(params, h, self._to_device(b.targets, "input batch"),
                                                                 loss_tokens=1))
                count += b.loss_tokens
                params = None
                self.streamer.release(pos)
                if self.tied:
                    self.streamer.release(pos - 1)
                pos += 1
        except BaseException as e:
            self.streamer.drain(patient=not isinstance(e, watchdog.StallError))
            raise
        finally:
            self._evaluations += 1
        if self.dist.enabled:
            both = self.dist.all_reduce_(torch.tensor([total, float(count)], dtype=torch.float64, device=(
                self.device if self.dist.backend == "nccl" else "cpu")), "summing the evaluation loss")
            total, count = both.tolist()
        return total / count  # a mean over the held-out tokens with a target, as in training

    # -- the Trainer protocol (fuyou.trainer) beyond stepping and evaluating -----------------------------
    def startup_lines(self) -> list[str]:
        off, t = self.cfg.offload, self.cfg.train
        lines = [self.plan.describe() + f"\nfixed overhead before the engine: {format_size(self.fixed_overhead)}"]
        if self.gpu_mem_ignored:
            lines.insert(0, "note: offload.gpu_mem (--gpu-mem) is a GPU's budget and is ignored: the compute runs on "
                            "the CPU (train.device), whose memory the CPU budget counts")
        if self.dev.kind == "fake":
            lines.insert(0, "device: fake (train.device=fake): CPU compute through the engine's CUDA code paths, with "
                            "CUDA's asynchrony modelled and its stream and memory rules checked")
        if self.dist.enabled:
            d = self.dist
            line = (f"{d.describe()}: each rank runs {len(self.micro)} of the step's {t.grad_accum} micro-batches; ")
            if self.sharded:
                mine = [st for st in self.states if st.owned]
                share = sum(st.numel for st in mine) / self.model.num_params
                line += (f"the optimizer state is sharded by stage: this rank owns {', '.join(st.stage.name for st in mine)} "
                         f"({100 * share:.0f}% of the parameters) in {self.state_location()}, receives every stage's "
                         f"gradient sum when its backward ends and sends the stage's new weights to the other ranks")
            else:
                line += ("each stage's gradient is summed over the ranks as its backward ends, and the adapters are "
                         "replicated")
            line += f"; the CPU budget above is this rank's share of the machine's (1/{d.local_world})"
            if self.cache_share > 1:
                line += (f"; the weight cache is one for the {self.cache_share} ranks of this machine ({SHM_DIR}), "
                         f"each charged its share" + (", filled by rank 0" if self.lora else
                                                      ", and the exchange sends a token for each cached stage"))
            lines.append(line + (f"; {self.shm_note}" if self.shm_note else ""))
        if self.lora:
            n = self._adapter_numel()
            lines.append(f"LoRA: rank {self.cfg.lora.rank} adapters on {', '.join(self.lora)} of every block, "
                         f"{n:,} trainable parameters ({100 * n / self.model.num_params:.2f}% of the "
                         f"{self.model.num_params:,} base parameters, which are read-only: no master, moments or "
                         f"gradients); adapters, gradients and AdamW moments on {self.device}")
            if self.cfg.lora.base != "compute":
                packed = sum(s.wnumel for s in self.states) * dtype_size(self.cdtype)
                how = FORMATS[self.cfg.lora.base].description
                lines.append(f"{self.cfg.lora.base} base: the blocks' matmul weights stored and streamed as {how}, "
                             f"{format_size(packed)} (in {t.precision}: "
                             f"{format_size(self.model.num_params * dtype_size(self.cdtype))}); dequantised on "
                             f"{self.device} a stage at a time")
            if self.clipping:
                lines.append(f"exact clipping at {t.grad_clip} of the adapters' gradients, after backward")
        elif self.clipping:
            lines.append(self._clipping_line())
        if self.master_is_weights and any(st.owned and st.resident is None for st in self.states):
            lines.append(self._master_line())
        if off.act_cpu_mem and not self.act_cpu_mem:
            lines.append(f"note: offload.act_cpu_mem={format_size(off.act_cpu_mem)} is unused: the activation policy "
                         f"keeps nothing in the cpu tier (offload.act_policy), so the budget holds no share for it")
        lines.append("crash-safe commits: " + (
            "none (offload.commit=none: the run cannot be resumed)" if off.commit != "cow" else
            f"every {off.commit_every} step(s)" if off.commit_steps else f"every {off.commit_every}") +
            ("" if off.commit != "cow" else ", and when the run ends or is stopped"))
        return lines

    def _master_line(self) -> str:
        """Where the updates take a master that is the compute weights from (Note: [Master in memory])."""
        mine = [st for st in self.states if st.owned and st.resident is None]
        cached = sum(st.cache is not None for st in mine)
        streamed = sum(st.cache is None for st in mine)
        parts = [f"{cached} from the weight cache"] if cached else []
        if streamed and self.plan.handoff:
            parts.append(f"{streamed} from the weights their backward read (the weight buffers hold "
                         f"{self.plan.handoff} stages more for them)")
        elif streamed:
            parts.append(f"{streamed} from the SSD (holding backward's weights for them would take cache that "
                         f"saves more)")
        line = (f"{self.fmt.master} master = the compute weights: the updates of the {len(mine)} stages whose state is "
                f"on the SSD take it: " + ", ".join(parts))
        return line + ("; a redo reads it from the SSD" + (", as does a streamed stage's update deferred to the norm"
                                                           if self.plan.handoff else "") if self.clipping else "")

    def _clipping_line(self) -> str:
        """What exact clipping does to this run's updates (Note: [Spare copies]): which stages speculate,
        which wait for the norm and why."""
        off, clip = self.cfg.offload, self.cfg.train.grad_clip
        n = sum(st.owned for st in self.states)  # the stages this rank updates (data parallel: those it owns)
        res, spare = len(self.plan.resident_stages), len(self.plan.spare_stages)
        waits = res - spare
        whose = "" if n == len(self.states) else f" (of the {n} stages this rank updates)"
        if off.clip_schedule == "defer":
            return (f"exact clipping at {clip}: every update waits for the gradient norm, after backward "
                    f"(offload.clip_schedule=defer)")
        why = ("offload.resident_spare=false" if not off.resident_spare else "the budget left no room for one"
               if off.resident_mem is None else f"the budget, with resident state capped at offload.resident_mem="
               f"{format_size(off.resident_mem)}, left no room for one")
        if waits == n:
            return (f"exact clipping at {clip}: every stage's state{whose} is resident in CPU memory, which keeps no "
                    f"previous copy to redo an update from, so the updates wait for the gradient norm, after "
                    f"backward (no spare copy: {why}; fuyou plan says what that costs)")
        parts = []
        if n - res:
            parts.append(f"{'the ' if res else ''}{n - res} stage{'s' if n - res != 1 else ''}{whose} whose state is "
                         f"on the SSD")
        if spare:
            parts.append(f"the {spare} resident stage{'s' if spare != 1 else ''} with a spare copy in CPU memory")
        line = (f"exact clipping at {clip}: {' and '.join(parts)} {'is' if n - res + spare == 1 else 'are'} updated "
                f"speculatively during backward and redone from the previous state on steps whose gradient norm "
                f"exceeds it (after such a step, updates wait for the norm instead: "
                f"offload.clip_schedule={off.clip_schedule})")
        if waits:
            line += (f"; the {waits} resident stage{'s' if waits != 1 else ''} without a spare copy ({why}) "
                     f"{'waits' if waits == 1 else 'wait'} for the norm")
        return line

    def step_counters(self) -> dict | None:
        """The last step's counters; what its background work (optimizer tail, a commit's writes) adds after
        this read counts into the next step's, so no byte is lost or counted twice. Read after the run's
        final commit, the commit's own bytes."""
        return self._roll_counters().as_dict()

    def _roll_counters(self) -> StepCounters:
        old, self.counters = self.counters, StepCounters()
        old.close(self.counters)
        return old

    def write_trace(self, path) -> None:
        self.worker.wait_all()  # the step's optimizer tasks belong in its trace
        self.tracer.write(path)
        self.tracer.enabled = False

    def state_location(self) -> str | None:
        return ", ".join(map(str, self.store_dirs))

    # -- the state (state.py) --------------------------------------------------------------------
    @property
    def start_step(self) -> int:
        return self.ts.start_step

    @property
    def last_commit_step(self) -> int | None:
        return self.ts.last_commit_step

    @property
    def durable_commit_step(self) -> int | None:
        """The step of the last commit written whole (a resume's starting point), None before any."""
        return self.ts.durable_step

    @property
    def pending_commit_step(self) -> int | None:
        """The step of a commit queued and neither written nor failed yet (it may still be written), else None."""
        queued, ts = self.ts.last_commit_step, self.ts
        pending = queued is not None and queued != ts.durable_step and queued != ts.failed_commit_step
        return queued if pending else None

    def commit(self, steps_done: int) -> None:
        """Commit now unless the last commit is this state (the end of a run, a stop); waits for it."""
        try:
            self.ts.commit(steps_done)
        except BaseException:
            self.failed = True
            raise

    def master_chunks(self):
        """Every stage's fp32 master weights in order, in chunks of pool memory (bounded). Sharded data
        parallel: every rank must iterate it (the owners send their stages); rank 0 gets the chunks."""
        if self.exchange is not None:
            self.worker.wait_all()
            self.exchange.wait_all()  # its group carries the masters now
        return self.ts.master_chunks()

    def weights_settled(self) -> bool:
        """Every submitted update finished without error (``TrainingState.settled``)."""
        return self.ts.settled()

    def master_chunks_now(self):
        """The master weights as the last update left them, writing nothing first (``TrainingState.
        master_chunks_now``): what a run whose final commit failed still saves."""
        return self.ts.master_chunks_now()

    def adapter_state(self) -> dict[str, Tensor]:
        """LoRA's adapters by global key (fp32, on the CPU)."""
        return {k: p.detach().cpu() for k, p in self.adapters.items()}

    def state(self) -> dict[str, Tensor]:
        """fp32 master weights by global key (materialises the model: for tests and small models)."""
        return self.ts.state_dict()

    def optimizer_state(self) -> dict[str, dict[str, Tensor]]:
        return self.ts.optimizer_state()

    def close(self) -> None:
        """Finish pending updates, stop the threads, close the store. The SSD state is deleted only
        after a completed run (``completed``) without ``keep_state``: a stopped or failed run keeps it
        for ``--resume``. After a failed step nothing is waited for or written: the last commit is
        the state of record, and a stuck thread must not keep the process alive."""
        if self.failed:
            for st in self.states:  # loads waiting for an update that will not come give up
                st.error = st.error or FuyouError("the run stopped")
                st.updated.set()
            self.worker.close(timeout=1.0)
            if self.exchange is not None:
                self.exchange.close(timeout=1.0)
            self.streamer.close(wait=False)
            self.swapper.close(wait=False)  # (it joined its reader: one stuck held the failed run's exit, review)
            if not self.worker.alive:  # nothing uses the store any more: free it and its locks, writing nothing
                self.store.close(sync=False)
                if self.abandoned:
                    self._remove_state()
                if self.streamer.idle() and self.swapper.idle():  # a load or read still running may copy from
                    self._release_host_memory()                     # pinned memory: leave it be
            return
        try:
            self.ts.write_back()
            if self.exchange is not None:
                self.exchange.wait_all()
        finally:
            if self.exchange is not None:
                self.exchange.close()
            self.worker.close()
            self.streamer.close()
            self.swapper.close()
            self.store.close()
            self._release_host_memory()
            if self.completed and not self.cfg.offload.keep_state:
                self._remove_state()

    def _remove_state(self) -> None:
        """Delete the SSD state (a finished run's, or one made for a run that never was)."""
        for d in self.store_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def _release_host_memory(self) -> None:
        """Unregister and free what the engine page-locked, once no copy can still use it."""
        try:
            self.dev.synchronize()
        finally:
            self.ts.release_host_memory()
            for pool in (self.weight_pool, self.grad_pool, self.cache_pool, self.input_pool, self.act_pool,
                         self.act_cpu_pool, self.opt_pool, self.shared_pool, self.exchange_pool):
                if pool is not None:
                    pool.close()
            if self.shared_cache is not None:
                if not self.dev.is_host:
                    self.dev.unregister_host(self.shared_cache.tensor)
                self.ts.shared_cache = None
                self.shared_cache.close()
                self.shared_cache = None
            self.dev.close()


def _warm_torch_optim(device: torch.device) -> None:
    """One step of a throwaway fused AdamW and a clip, so that the code torch loads for them lazily is
    resident before the fixed overhead is measured (it is the library's, not the plan's)."""
    p = torch.zeros(8, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    torch.optim.AdamW([p], fused=True).step()


def non_finite(what: str, step: int, commits: bool, lr: float | None = None) -> NonFiniteError:
    """The engine's error for a step whose loss or gradient norm is not finite: nothing of it is committed.
    ``lr``: the run's optim.lr, which the advice's resume lowers (a plain resume reads the run's config.toml,
    and after a resume that raised the rate, followed the advice into the same failure: a pass)."""
    if not commits:  # (offload.commit=none: there is no commit to be intact, nor any resume)
        return NonFiniteError(f"{what}: the run stopped; offload.commit=none keeps no resumable state (its state "
                              f"was updated in place). Lower optim.lr or check the data, and start again (from a "
                              f"snapshot, with --init-from, if the run wrote one)", step)
    if step == 1:  # before any update
        return NonFiniteError(f"{what}: {NonFiniteError.BEFORE_ANY_UPDATE}", step)
    if not lr:
        return NonFiniteError(f"{what}: the run stopped before committing that step (the last commit is intact). "
                              f"Lower optim.lr, check the data, or resume with `{resume_command()}`", step)
    again = resume_command(extra=f" optim.lr={lr / 10:.3g}")
    return NonFiniteError(f"{what}: the run stopped before committing that step (the last commit is intact). Resume "
                          f"with a lower learning rate (`{again}`; it is {lr:.3g} now), or check the data first", step)
