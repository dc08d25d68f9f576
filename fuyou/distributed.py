"""Data parallelism on torch.distributed, launched with torchrun (issue 17, DESIGN.md "Outside this machine").

``torchrun --nproc_per_node=N fuyou train ...`` starts N processes; each one calls ``init()``, which
joins torchrun's process group (gloo on the CPU and the fake device, NCCL on GPUs; nothing home-made
for communication). What is shared and what each rank owns:

- **The global batch** of step ``s`` is the run's ``train.grad_accum`` micro-batches of
  ``train.micro_batch_size`` rows, as for one process: rank ``r`` runs the contiguous ``grad_accum / N``
  of them (``micro_batches``), so a run's model does not depend on how many ranks trained it, up to the
  order in which the ranks' gradients are summed (bit-identical when each rank runs one micro-batch and
  there are two ranks: a sum of two addends does not depend on their order; on the CPU also the same
  number of threads per process, as a matmul's sums depend on it and torchrun sets OMP_NUM_THREADS=1).
- **The optimizer state is sharded by stage**: each stage's master weights and moments live on one rank,
  its owner (``stage_owners``: largest stages first, each to the least-loaded rank), in that rank's
  store (rank 0's under the run's usual name, rank ``r``'s under ``...fuyou-state.rank{r}``). As a
  stage's backward ends its gradient is summed into its owner (``reduce``, started asynchronously and
  finished when the next stage's gradient is ready, so it overlaps that stage's backward; on a device
  the next gradient buffer is made only after it: the plan's one gradient leaving the device); the owner alone updates it
  (speculatively under exact clipping, as with one process) and afterwards sends the new compute
  weights to the others (``fuyou.engine.exchange``). So each rank reads and writes the optimizer state
  of about 1/N of the parameters per step, and receives the compute weights of the rest. The exact
  clipping norm is the sum over the ranks of each parameter's norm, which exactly one rank (its
  owner) contributes, so every rank sees the one-process norm.
  Sharding is by whole stages rather than by slices of every stage: the out-of-core optimizer, the
  commit and the state copies stay per stage as they are; the cost is balance when the ranks are
  nearly as many as the stages (refused beyond one stage per rank).
  LoRA (a frozen base, no optimizer state to shard) sums the adapters' gradients over every rank
  (``all_reduce``) and steps a replicated AdamW.
- **Budgets are per machine**: ``offload.cpu_mem`` (and its ``act_cpu_mem``/``resident_mem`` parts) is
  divided among the machine's ranks; ``offload.gpu_mem`` is per GPU. SSD directories are per machine:
  when a machine has at least as many as it has ranks, each rank takes its own share of them.
- **One run**: rank 0 chooses the run directory and writes config, metrics, progress, snapshots and the
  saved weights; the others print nothing but errors.
- **Commits are all or nothing**: each rank writes its part of the state and syncs its store, the ranks meet, and
  only then does each write its commit record. A crash between two ranks' record renames leaves some
  records a commit behind: the resume has every rank behind rewrite its record from its store (whose
  state of the newer commit was synced before the meeting: ``Engine._agree_on_commit``); records that
  still differ (a store damaged since) are refused with the steps found.
  A resume must use the run's world size (``distributed.json`` in the run directory records it), or
  another after ``fuyou reshard RUN_DIR --nproc M`` has rewritten the last commit for it (fuyou/reshard.py).
- **Failure**: every collective has a deadline (``offload.stall_timeout``); a rank that dies makes the
  others' next collective fail, and they stop with ``DistributedError`` naming the rank and the fix.
  A stop signal (Ctrl-C, SIGTERM) is agreed by all ranks at a step boundary, so all commit the same step.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from fuyou.errors import ConfigError, FuyouError
from fuyou import launch

WORLD_FILE = "distributed.json"
RESHARD_PENDING = "reshard.json"  # fuyou/reshard.py's decision, until its switch is done
MIN_COLLECTIVE_S = 60.0  # the least deadline of joining the ranks and of a collective (offload.stall_timeout above it)
JOIN_NOTE_S = 30.0  # a rank still waiting for the others to join says so after this long


class DistributedError(FuyouError):
    """A collective failed or timed out: another rank stopped (its own error says why)."""


class Dist:
    """This process's place in the job: ``world`` ranks, ``local_world`` of them on this machine. With
    one process every collective is a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, local_world: int = 1,
                 backend: str | None = None):
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world
        self.backend = backend
        self._commit_group = None
        self._exchange_group = None
        self.run_dir: Path | None = None  # once it has a commit to resume: the --resume an error gives

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"data parallel: rank {self.rank} of {self.world} ({self.local_world} on this machine), "
                f"torch.distributed {self.backend}")

    # -- the batch --------------------------------------------------------------------------------
    def micro_batches(self, grad_accum: int) -> range:
        """The global micro-batch indices of one step this rank runs (module docstring)."""
        per = grad_accum // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    # -- collectives -------------------------------------------------------------------------------
    @contextmanager
    def _collective(self, what: str, started: bool = True):
        """A collective whose failure (a peer that died) is a DistributedError; ``started``: the run has a
        state to resume (before it, a peer's refusal is all there is to say)."""
        try:
            yield
        except RuntimeError as e:  # gloo and NCCL report a dead peer or a timeout as RuntimeError
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not started:
                raise DistributedError(f"rank {self.rank}: {what} failed ({why}): another rank stopped (its own error "
                                       f"says why); nothing was started") from e
            if self.run_dir is None:  # no commit yet: nothing to resume
                raise DistributedError(f"rank {self.rank}: {what} failed ({why}): another rank stopped or is stuck "
                                       f"(its own error says why), before the run's first commit: fix the cause and "
                                       f"start it again") from e
            raise DistributedError(
                f"rank {self.rank}: {what} failed ({why}): another "
                f"rank stopped or is stuck (its own error says why; a rank killed outright, by SIGKILL or the "
                f"out-of-memory killer, prints none: its last commit stands, as a crash leaves it). This rank's last "
                f"commit is intact: fix the cause (the other rank's error says whether its state is damaged), then "
                f"continue with `{resume_command(self.run_dir, self)}` ({self.world} processes in all, as now)") from e

    def all_reduce_(self, t: torch.Tensor, what: str = "summing a gradient over the ranks") -> torch.Tensor:
        """Sum ``t`` over the ranks in place."""
        if self.enabled:
            import torch.distributed as td

            with self._collective(what):
                td.all_reduce(t)
        return t

    def any(self, flag: bool, what: str = "agreeing on a step boundary") -> bool:
        """True on every rank when it is true on any."""
        return bool(self.reduce_ints([int(flag)], what, op="max")[0]) if self.enabled else flag

    def reduce_ints(self, values: list[int], what: str, op: str = "sum") -> list[int]:
        if not self.enabled:
            return list(values)
        import torch.distributed as td

        t = torch.tensor(values, dtype=torch.int64)
        if self.backend == "nccl":
            t = t.cuda()
        with self._collective(what):
            td.all_reduce(t, op={"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX, "min": td.ReduceOp.MIN}[op])
        return [int(v) for v in t.tolist()]

    def min_max(self, value: int, what: str) -> tuple[int, int]:
        """The least and the greatest of ``value`` over the ranks (one all-reduce; equal when every rank has it)."""
        lo, neg_hi = self.reduce_ints([value, -value], what, op="min")
        return lo, -neg_hi

    def broadcast(self, obj, what: str, started: bool = True):
        """Rank 0's ``obj`` on every rank. A FuyouError rank 0 passes (its refusal) is raised on every rank,
        the others naming it as rank 0's (a peer left waiting on a rank that had refused told of a dead rank,
        and of a commit to resume that did not exist)."""
        from fuyou.errors import FuyouError

        if not self.enabled:
            if isinstance(obj, FuyouError):
                raise obj
            return obj
        import torch.distributed as td

        box = [obj if not isinstance(obj, FuyouError) else ("refused", str(obj))]
        with self._collective(what, started):
            td.broadcast_object_list(box, src=0)
        out = box[0]
        if isinstance(obj, FuyouError):
            raise obj
        if isinstance(out, tuple) and len(out) == 2 and out[0] == "refused":
            raise ConfigError(f"rank 0 refused the run ({what}): {out[1]}")
        return out

    def barrier(self, what: str) -> None:
        if self.enabled:
            self.reduce_ints([0], what)

    def commit_barrier(self, step: int) -> None:
        """All ranks have written and synced the state of ``step`` (called on the optimizer worker's
        thread, so on a group of its own: collectives of one group must be issued in one order)."""
        if not self.enabled:
            return
        import torch.distributed as td

        t = torch.tensor([step, -step], dtype=torch.int64)
        with self._collective(f"the commit of step {step} (waiting for every rank's state)"):
            td.all_reduce(t, op=td.ReduceOp.MIN, group=self._commit_group)
        if int(t[0]) != step or int(t[1]) != -step:
            raise DistributedError(f"rank {self.rank}: the ranks committed different steps ({int(t[0])} to "
                                   f"{-int(t[1])}; this rank {step}); the last commit is intact, resume with "
                                   f"`{resume_command()}`")

    def start_sum(self, t: torch.Tensor, dst: int | None, what: str):
        """Start summing ``t`` over the ranks (into rank ``dst``'s, or every rank's with ``dst=None``);
        returns the handle ``finish`` waits on. Collectives start in the same order on every rank."""
        import torch.distributed as td

        with self._collective(what):
            work = td.all_reduce(t, async_op=True) if dst is None else td.reduce(t, dst=dst, async_op=True)
        return work, what

    def finish(self, handle) -> None:
        work, what = handle
        with self._collective(what):
            work.wait()

    def broadcast_tensor(self, t: torch.Tensor, src: int, what: str) -> torch.Tensor:
        """Rank ``src``'s CPU tensor ``t`` into every rank's ``t``, on the group of the weight exchange
        (its own thread: ``fuyou.engine.exchange``; gloo, as the tensors are in CPU memory)."""
        if self.enabled:
            import torch.distributed as td

            with self._collective(what):
                td.broadcast(t, src=src, group=self._exchange_group)
        return t

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()

    # -- per-rank configuration ---------------------------------------------------------------------
    def rank_config(self, cfg):
        """This rank's share of a machine's budgets and SSD directories (module docstring)."""
        if not self.enabled:
            return cfg
        off = cfg.offload
        share = {}
        for field in ("cpu_mem", "act_cpu_mem", "resident_mem"):
            v = getattr(off, field)
            if v is not None:
                share[field] = v // self.local_world
        dirs = list(off.ssd_dirs)
        if len(dirs) >= self.local_world:
            per = len(dirs) // self.local_world
            share["ssd_dirs"] = dirs[self.local_rank * per:(self.local_rank + 1) * per]
        return cfg.model_copy(update={"offload": off.model_copy(update=share)})

    def store_name(self, name: str) -> str:
        """Rank 0's state keeps the run's usual name (export and every single-process tool read it)."""
        return rank_state_name(name, self.rank)


_DIST = Dist()


def current() -> Dist:
    return _DIST


def resume_command(run_dir=None, d: Dist | None = None, extra: str = "") -> str:
    """The command that resumes this run as it runs now (torchrun's under torchrun, ``fuyou launch``'s under
    it): errors' advice (a pass was told `fuyou train --resume`, which a run of several ranks refuses). ``d``:
    the ranks (this process's). ``extra``: overrides to add to the command (before any words about it)."""
    d = d or _DIST
    where = f"{run_dir or d.run_dir or 'RUN_DIR'}{extra}"
    if not d.enabled:
        return f"fuyou train --resume {where}"
    launcher = (launch.command(d.local_world) if launch.launched()  # (as it was launched)
                else f"torchrun --nproc_per_node={d.local_world} -m fuyou.cli train")
    return (f"{launcher} --resume {where}"
            + (" (on each machine, with its --nnodes and rendezvous)" if d.world > d.local_world else ""))


def launched_world() -> int:
    """The number of processes a launcher (torchrun) started this one among (1: none)."""
    w = os.environ.get("WORLD_SIZE", "1")
    return int(w) if w.isdigit() else 1


def init(cfg, resume_dir: Path | None = None, resumed_run: str | None = None) -> Dist:
    """Join torchrun's process group when this process is one of several (module docstring); refuse
    what data parallelism does not support yet, before anything is written. ``resume_dir``: a resume,
    whose world size is checked first (``check_world``); ``resumed_run``: what tells its run from another
    (its id), which every rank must share."""
    global _DIST
    world = launched_world()
    if resume_dir is not None:  # (before the batch's check below, whose advice a resume cannot take)
        check_world(resume_dir, world)
    if world <= 1:
        _DIST = Dist()
        return _DIST
    env = os.environ
    rank, local_rank = int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    t = cfg.train
    if cfg.offload.mode != "ssd":
        raise ConfigError(f"torchrun started {world} processes, but offload.mode={cfg.offload.mode}: data-parallel "
                          f"training runs the SSD-offloaded engine (--offload ssd --ssd DIR); offload.mode=none is the "
                          f"single-process reference")
    if t.grad_accum % world:
        g = t.global_batch  # (given alone it was split without the ranks, and the error named a grad_accum never given)
        fit = [d for d in range(1, min(g or 0, 16) + 1) if g % (d * world) == 0]
        how = (f"train.global_batch={g} was split as micro_batch_size {t.micro_batch_size} x grad_accum "
               f"{t.grad_accum}; "
               + (f"give train.micro_batch_size={fit[-1]} with it (grad_accum {g // fit[-1]})" if fit else
                  f"give a train.global_batch that is a multiple of {world}")
               if g is not None else f"set train.grad_accum to a multiple of {world}")
        raise ConfigError(f"train.grad_accum={t.grad_accum} is not a multiple of the {world} ranks: a step's global "
                          f"batch is grad_accum micro-batches of train.micro_batch_size rows whatever the number of "
                          f"ranks, and each rank runs grad_accum/{world} of them; {how}")
    dirs = cfg.offload.ssd_dirs
    if len(dirs) > local_world and len(dirs) % local_world:  # (rank_config: a pass's third went unused, in silence)
        raise ConfigError(f"{len(dirs)} --ssd directories among the {local_world} processes of this machine: each "
                          f"rank stripes its state over its own share of them, so give a multiple of {local_world} "
                          f"(or fewer directories than processes, which every rank shares; a run started with more "
                          f"resumes with the first {len(dirs) // local_world * local_world}: the others went unused)")
    device = t.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "nccl" if device == "cuda" else "gloo"
    import torch.distributed as td

    timeout = datetime.timedelta(seconds=max(MIN_COLLECTIVE_S, float(cfg.offload.stall_timeout)))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    # A rank that fails before joining (a refused setting, a path missing on its machine) leaves the others
    # waiting for it until the deadline: on one machine torchrun stops them, across machines nothing does (a
    # pass: ten minutes in silence). They say so while they wait.
    late = threading.Timer(JOIN_NOTE_S, lambda: print(
        f"fuyou: rank {rank}: still waiting for the other ranks to join after {JOIN_NOTE_S:.0f} s (every machine's "
        f"torchrun must be started); a rank that failed before joining (its own output, on its machine, says why) "
        f"leaves this one waiting until offload.stall_timeout ({timeout.total_seconds():.0f} s)",
        file=sys.stderr, flush=True))
    late.daemon = True
    if local_rank == 0:  # (one line a machine, not one a rank: a review)
        late.start()
    try:
        td.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DistributedError(f"rank {rank}: joining the {world} ranks failed ({why}): another rank failed before "
                               f"joining (its own output says why), or was never started, or the ranks do not reach "
                               f"each other (check torchrun's --master_addr/--master_port or --rdzv_endpoint)") from e
    finally:
        late.cancel()
    _DIST = Dist(rank, world, local_rank, local_world, backend)
    _DIST._commit_group = td.new_group(backend="gloo", timeout=timeout)
    _DIST._exchange_group = td.new_group(backend="gloo", timeout=timeout)
    _refuse_unlike_ranks(cfg, _DIST, resumed_run if resume_dir is not None else None)
    return _DIST


# What may differ between ranks: where things are on each machine, and how much of it there is (budgets, threads,
# queue depths, the activation policy: none changes the arithmetic or the ranks' collectives). Everything else
# must be the same on every rank (``_refuse_unlike_ranks``); offload.optimizer_chunk too: the weight exchange
# sends a stage chunk by chunk (a review: two chunk sizes passed, then hung in the exchange).
PER_MACHINE = {"model.init_from", "data.path", "data.eval_path", "data.tokenizer", "train.threads", "lora.init_from",
               "run.out_dir", "run.name", "run.tensorboard", "run.wandb", "run.wandb_project", "run.wandb_entity"}
SHARED_OFFLOAD = ("mode", "commit", "commit_every", "clip_schedule", "checkpoint_dtype", "replace_state", "keep_state",
                  "optimizer_chunk", "cache_weights")  # (the ranks of a machine map one weight cache or none: a pass
# with offload.cache_weights=false on one rank hung where the other waited for it at the cache)


def agreed_settings(cfg) -> dict:
    """The settings every rank must share, flat (``section.key``: value), as they act: a commit interval by
    its steps or seconds (``600s`` is ``10min``), ``train.device=auto`` by the device it picks."""
    out = {}
    for section, values in cfg.model_dump(mode="json").items():
        if section == "hardware":
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            if name in PER_MACHINE or (section == "offload" and key not in SHARED_OFFLOAD):
                continue
            out[name] = value
    if "offload.commit_every" in out:
        out["offload.commit_every"] = cfg.offload.commit_steps or f"{cfg.offload.commit_secs:g}s"
    if out.get("train.device") == "auto":
        out["train.device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return out


def _refuse_unlike_ranks(cfg, dist: Dist, resumed_run: str | None = None) -> None:
    """Ranks started with different settings (each machine its own command line or config file) trained in
    silence to other weights (each rank updates the stages it owns with its own settings), or hung (another
    model: a stage one rank waits for, the other never sends): a hostile pass. Refused on every rank alike,
    naming the settings, before anything is written."""
    import torch.distributed as td

    mine = agreed_settings(cfg)
    # every rank resumes one run (each from its machine's path): a pass resumed two runs' states as one, and
    # a rank resuming beside ranks starting afresh broadcast past them
    mine["--resume"] = resumed_run
    gathered: list = [None] * dist.world  # each rank's settings, and whether auto chose its precision (said below)
    with dist._collective("comparing the ranks' settings", started=False):  # (a peer gone: a sentence)
        td.all_gather_object(gathered, (mine, cfg.train.precision_chosen), group=dist._commit_group)
    every, chosen = [s for s, _ in gathered], any(c for _, c in gathered)
    unlike = [f"rank {r}: " + ", ".join(f"{k}={theirs.get(k)!r} (rank 0: {every[0].get(k)!r})"
                                        for k in sorted(set(theirs) | set(every[0]))
                                        if theirs.get(k) != every[0].get(k))
              for r, theirs in enumerate(every) if theirs != every[0]]
    if unlike:
        runs = any(theirs.get("--resume") != every[0].get("--resume") for theirs in every)
        raise ConfigError("the ranks were started with different settings: " + "; ".join(unlike) + ". Give every "
                          "rank the same command line and config (paths, budgets and threads may differ)"
                          + ("; every rank resumes the same run (--resume RUN_DIR, each machine's copy of it), or none"
                             if runs else "")
                          # (ranks given the same command on machines of other kinds were told they were not: a pass)
                          + ("; train.precision=auto chooses by each machine's device (bf16 where it computes it "
                             "natively, else fp32): give every rank train.precision=bf16 or fp32" if chosen and any(
                                 t.get("train.precision") != every[0].get("train.precision") for t in every) else ""))


def stage_owners(numels: list[int], world: int) -> list[int]:
    """The rank that owns each stage's optimizer state: largest stages first, each to the rank with
    the fewest parameters so far (ties: the lower rank). A pure function of the shapes and the world
    size, so every rank computes the same."""
    load, owner = [0] * world, [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += numels[i]
    return owner


def rank_state_name(name: str, rank: int) -> str:
    """The name of rank ``rank``'s state: rank 0's is the run's usual one (``Dist.store_name``)."""
    return name if rank == 0 else f"{name}.rank{rank}"


def check_reshard_pending(run_dir: Path) -> None:
    """Refuse a run whose ``fuyou reshard`` stopped after its decision (fuyou/reshard.py)."""
    p = Path(run_dir) / RESHARD_PENDING
    if p.is_file():
        try:
            to = json.loads(p.read_text())["world_to"]
        except (OSError, ValueError, KeyError, TypeError):
            to = "N"
        raise ConfigError(f"{run_dir} was being resharded for {to} process(es) when it stopped; finish it with "
                          f"`fuyou reshard {run_dir} --nproc {to}` (the new state is complete, only its renames "
                          f"remain), then resume")


def recorded_world(run_dir: Path, ssd_dirs, state_name: str) -> int:
    """How many processes trained ``run_dir``: ``distributed.json``, or (lost) the ranks' states found
    (``<state>.rank<r>`` in ``ssd_dirs``). Refuses a file that disagrees with the states."""
    path = run_dir / WORLD_FILE
    found = 1
    while any((Path(d) / rank_state_name(state_name, found)).is_dir() for d in ssd_dirs):
        found += 1
    if not path.is_file():
        return found
    world = json.loads(path.read_text())["world_size"]
    if found > world:
        raise ConfigError(f"{path} says {world} process(es), but the SSD directories hold the states of {found} "
                          f"ranks ({rank_state_name(state_name, found - 1)}): a state of another run, or a damaged "
                          f"{WORLD_FILE}; nothing was changed")
    return world


def record_world(run_dir: Path, d: Dist) -> None:
    (run_dir / WORLD_FILE).write_text(json.dumps({"world_size": d.world, "backend": d.backend}) + "\n")


def check_world(run_dir: Path, now: int) -> None:
    """A run resumes with the world size that trained it (the state is one per rank), or after
    ``fuyou reshard`` (fuyou/reshard.py) with another: the refusal names the reshards that are possible,
    the process counts that divide the run's train.grad_accum, which a resume keeps."""
    check_reshard_pending(run_dir)
    path = run_dir / WORLD_FILE
    world = json.loads(path.read_text())["world_size"] if path.is_file() else 1
    if world == now:
        return
    from fuyou.tomlfile import read_toml

    try:
        saved = read_toml(run_dir / "config.toml")
    except (OSError, ConfigError):
        saved = {}
    off = saved.get("offload") if isinstance(saved.get("offload"), dict) else {}
    if off.get("keep_state") is not True and any((run_dir / f).is_file() for f in ("model.safetensors",
                                                                                 "adapter.safetensors")):
        return  # finished, its state removed: the resume says so (a reshard was advised, which then refused)
    if off.get("mode", "ssd") != "ssd" or off.get("commit") == "none":
        return  # no state to resume or reshard: the resume says what to start from instead (a review)
    try:
        grad_accum = int(saved["train"]["grad_accum"])
    except (KeyError, ValueError, TypeError):
        grad_accum = now
    launcher = "fuyou launch" if launch.launched() else "torchrun"  # (a pass: it named torchrun under fuyou
    # launch, whose statuses torchrun loses)
    how = ("as one process (`fuyou train --resume`)" if world == 1
           else f"with {launcher} --nproc_per_node={world} (or its nodes)")
    if grad_accum % now == 0:
        other = f"or first rewrite the state for {now} with `fuyou reshard {run_dir} --nproc {now}` (one machine)"
    else:
        ok = [n for n in range(1, grad_accum + 1) if grad_accum % n == 0 and n != world]
        nproc = str(ok[0]) if len(ok) == 1 else f"N` for N in {', '.join(map(str, ok))}"
        other = (f"or rewrite the state with `fuyou reshard {run_dir} --nproc {nproc}{'`' if len(ok) == 1 else ''}: "
                 f"the process counts that divide its train.grad_accum={grad_accum}, which a resume keeps ({now} "
                 f"does not)" if ok else f"(its train.grad_accum={grad_accum}, which a resume keeps, allows no other)")
    raise ConfigError(f"{run_dir} was trained by {world} process(es) and this resume has {now}: each rank keeps its "
                      f"own part of the state, so resume {how}, {other}")
