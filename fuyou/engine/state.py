"""The training state's lifecycle: where it lives, how it starts, how it is committed and read back.

Where: the store on the SSDs holds every stage's fp32 master weights and Adam moments, in one to three
copies (Note: [State copies] in ``layout``), and the compute weights of stages the weight cache does
not hold; CPU memory holds the weight cache and the *resident* stages' state (the memory plan says
which). How it starts: ``initialise`` writes each stage straight into its tiers, one stage in memory
at a time, and commits step 0; ``resume`` opens the last commit (``commit.py``) and rebuilds the
compute weights from the masters. Commits: every ``offload.commit_every``, queued behind the step's
updates on the optimizer worker, flush the resident stages' state to a copy the last commit does not
name, sync, and write the record. Reading it back (``write_back``, ``master_chunks``,
``state_dict``, ``optimizer_state``) first writes dirty resident state to the store.

The engine (``engine.py``) owns one ``TrainingState`` and runs the step schedule against it.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from fuyou import watchdog
from fuyou.engine.commit import (STATE_SUFFIX, DamagedStateError, ResumeError, read_record, step_tag, tagged_copy,
                                 write_record)
from fuyou import distributed
from fuyou.config import fixed_settings
from fuyou.engine.exchange import wire
from fuyou.engine.layout import StageState, build_states, dtype_size, store_margin
from fuyou.errors import ConfigError, FuyouError, NameTaken
from fuyou.optim.compressed import StateFormat, decode_state
from fuyou.store import TensorStore
from fuyou.store.errors import StoreLockedError, io_error_from_oserror
from fuyou.store.lock import lock_holder


class TrainingState:
    """The state of one run (module docstring). ``open_store`` then ``initialise`` or ``resume``; the
    engine sets ``worker`` (commits run on it) and ``counters`` (where bytes are counted) after."""

    def __init__(self, cfg, states: list[StageState], plan, store_dirs: list[Path], store_cfg, chunk: int,
                 cdtype: torch.dtype, gdtype: torch.dtype, clipping: bool, dev):
        self.cfg, self.states, self.plan, self.store_dirs, self.store_cfg = cfg, states, plan, store_dirs, store_cfg
        self.chunk, self.cdtype, self.gdtype, self.clipping, self.dev = chunk, cdtype, gdtype, clipping, dev
        self.fmt = StateFormat.of(cfg.optim)  # the stored tensors and their dtypes (fuyou/optim/compressed.py)
        self.store: TensorStore | None = None
        self.worker = None
        self.counters = None                # callable: the current step's counters
        self.cache_pool = self.opt_pool = None
        self.last_commit_step: int | None = None
        self.durable_step: int | None = None  # the last commit whose record is written (last_commit_step: queued)
        self.failed_commit_step: int | None = None  # a commit that failed (on the worker thread)
        self._last_commit_time = time.monotonic()
        self.start_step = 0
        self._cache_bufs: list = []
        self._registered: list[Tensor] = []
        self.sharded = False                # data parallel: each stage's optimizer state is on its owner only
        self.shared_cache = None            # data parallel on one machine: the ranks' one weight cache
        self.rank = 0                       # data parallel: this process's rank
        self.cache_offsets: dict[int, int] = {}

    def open_store(self, resume: bool, name: str) -> TensorStore:
        """The existing store (resume) or a new one, after clearing what an earlier run left."""
        if resume:
            self.store = TensorStore.open(self.store_dirs, self.store_cfg)
        else:
            self.clear_old(name)
            spread, head = self.ssd_margin()
            try:
                self.store = TensorStore.create(self.store_dirs, self.store_cfg,
                                                capacity_hint_bytes=self.tensor_bytes() + spread, head_bytes=head)
            except StoreLockedError as e:  # another run made it after clear_old looked: of the same name
                if self.cfg.run.name is not None:
                    raise
                raise NameTaken(f"{e}: {_another_name(self.cfg)}") from e
        return self.store

    def release_host_memory(self) -> None:
        """Unregister what was page-locked and give the cache buffers back (at close)."""
        for t in self._registered:
            self.dev.unregister_host(t)
        self._registered.clear()
        for b in self._cache_bufs:
            b.release()
        self._cache_bufs.clear()
        for st in self.states:
            st.cache = None

    def tensor_bytes(self) -> int:
        """The bytes of the store's tensors (``specs``)."""
        return sum(math.prod(shape) * dtype_size(dt) for _, shape, dt in self.specs())

    def ssd_margin(self) -> tuple[int, int]:
        """What the store needs beyond its tensors: spread over its directories, and in the first (``store_margin``)."""
        cfg = self.store_cfg
        return store_margin(self.tensor_bytes(), len(self.specs()), cfg.checksum_block, cfg.stripe_unit)

    def initialise(self, init_values) -> None:
        """Initialise each stage straight into the tiers, one stage in memory at a time."""
        self.store.allocate_many(self.specs())
        fmt = self.fmt
        tensors = dict(zip(fmt.roles, fmt.tensors))
        for s in self.states:
            if not s.owned:  # data parallel: its owner's first weight exchange fills it (fuyou.engine.exchange)
                if s.index in self.plan.cached_stages:
                    s.cache = self.cache_buffer(s)
                continue
            values = init_values(s.stage)
            flat = torch.empty(s.numel)
            for name, slot in s.slots.items():
                flat[slot.offset:slot.offset + slot.numel] = values.pop(s.stage.key(name)).reshape(-1)
            master = flat if fmt.master == "fp32" else flat.to(torch.bfloat16)  # a bf16 master starts rounded
            keys = dict(zip(fmt.roles, s.keys.state))
            futs = [self.store.write_from(keys["master"], master)]
            for role, t in tensors.items():  # moments and scales start at zero, written in chunks
                if role == "master":
                    continue
                n = t.numel(s.numel)
                step = n if t.per_block else self.chunk
                zeros = torch.zeros(min(step, n), dtype=t.dtype)
                for a in range(0, n, step):
                    futs.append(self.store.write_from(keys[role], zeros[: min(step, n - a)], start=a))
            if s.index in self.plan.cached_stages:
                s.cache = self.cache_buffer(s)
                s.cache.copy_(master)
            elif s.keys.weights != s.keys.master:  # else the master is the compute weights
                futs.append(self.store.write_from(s.keys.weights, master.to(self.cdtype)))
            if s.index in self.plan.resident_stages:
                s.resident = resident_state(s.numel, fmt)
                s.held_grad = self.held_grad(s)
                s.spare = self.spare(s)
                for role, t in zip(fmt.roles, s.resident):
                    if role == "master":
                        t.copy_(master)
                    else:
                        t.zero_()
            for f in futs:
                watchdog.result(f, f"the initial write of {s.stage.name}")
            del flat, master
        self.commit_initial()

    def specs(self) -> list[tuple]:
        """Every store tensor the state needs (its copies: Note: [State copies] in layout)."""
        specs = []
        for s in self.states:
            if not s.owned:  # another rank's optimizer state: only the compute weights, unless cached
                if s.index not in self.plan.cached_stages:
                    specs.append((s.keys.weights, (s.numel,), self.cdtype))
                continue
            for keys in s.copies:
                specs += [(k, (t.numel(s.numel),), t.dtype) for k, t in zip(keys.state, self.fmt.tensors)]
            if s.index not in self.plan.cached_stages and s.keys.weights != s.keys.master:
                specs.append((s.keys.weights, (s.numel,), self.cdtype))
            if self.clipping and s.index not in self.plan.resident_stages:
                specs.append((grad_key(s), (s.numel,), self.gdtype))
        return specs

    def clear_old(self, name: str) -> None:
        """A new run finds its state directories empty, or holding only a store's own files: a state
        that was never committed (killed before its first commit) is removed; a committed one only with
        ``offload.replace_state`` (else the user is told to resume it). Anything else is refused."""
        from fuyou.engine.commit import RECORD
        from fuyou.store.lock import lock_dirs, unlock

        present = [d for d in self.store_dirs if d.is_symlink() or (d.exists() and any(d.iterdir()))]
        if not present:
            return
        for d in present:
            if d.is_symlink() or not d.is_dir():
                raise ConfigError(f"{d} is a symlink or a file, not a state directory fuyou made; remove it or choose "
                                  f"another run.name")
            foreign = [p.name for p in d.iterdir() if not (p.name.startswith(("fuyou-store", RECORD, "lora-state.",
                                                                              ".lora-state."))
                                                          and p.is_file() and not p.is_symlink())]
            if foreign:
                raise ConfigError(f"{d} holds files fuyou did not make ({', '.join(sorted(foreign)[:5])}); a state "
                                  f"directory holds only the store's files: move them away or choose another run.name")
        record = self.store_dirs[0] / RECORD
        refuse_committed_state(self.store_dirs, self.cfg, name)
        try:
            locks = lock_dirs([d for d in present])  # refuses a state another process is using
        except StoreLockedError as e:
            if self.cfg.run.name is not None:
                raise
            holder = next((h for h in map(lock_holder, present) if h is not None), "unknown")
            raise NameTaken(f"the SSD state {present[0]} is another run's, held by process {holder}, of the same "
                            f"name: {_another_name(self.cfg)}") from e
        try:
            what = ("never committed" if not record.exists() else "committed" if self.cfg.offload.replace_state
                    else "initial (its run's directory was never made)")
            print(f"fuyou: removing the {what} SSD state in {', '.join(map(str, present))} "
                  f"(offload.replace_state, or a run killed before its first commit)", file=sys.stderr)
            for d in present:
                shutil.rmtree(d)
        finally:
            unlock(locks)

    def cache_buffer(self, st: StageState) -> Tensor:
        """CPU memory for a stage's cached compute weights, from the cache pool: registered with the
        device at its exact size (``pin_memory()``'s caching host allocator rounds up to a power of
        two: a 629 MB stage would lock 1 GiB, up to twice the plan). Data parallel on one machine: the
        stage's part of the ranks' shared cache (its owner writes it; ``fuyou/store/shared.py``)."""
        if self.shared_cache is not None:
            return self.shared_cache.view(self.cache_offsets[st.index], st.wnumel, self.cdtype)
        self._cache_bufs.append(self.cache_pool.acquire(st.wnumel * dtype_size(self.cdtype), self.cdtype))
        return self._cache_bufs[-1].tensor

    def held_grad(self, st: StageState) -> Tensor | None:
        """CPU memory where a resident stage's gradient waits for the global norm (exact clipping)."""
        if not self.clipping:
            return None
        from fuyou.store.aligned import huge_empty

        t = huge_empty(st.numel * dtype_size(self.gdtype)).view(self.gdtype)[:st.numel]
        if not self.dev.is_host:  # the gradient's D2H copy lands here asynchronously: page-locked
            self.dev.register_host(t)
            self._registered.append(t)
        return t

    def spare(self, st: StageState) -> tuple[Tensor, ...] | None:
        """A second copy of a resident stage's state, where the memory plan gives it one (engine.py,
        Note: [Spare copies]); its contents are the first update's to write."""
        if not self.clipping or st.index not in self.plan.spare_stages:
            return None
        return resident_state(st.numel, self.fmt)

    # -- commits ---------------------------------------------------------------------------------
    def commit_due(self, steps_done: int) -> bool:
        off = self.cfg.offload
        if off.commit != "cow":
            return False
        if off.commit_steps is not None:
            return steps_done % off.commit_steps == 0
        return time.monotonic() - self._last_commit_time >= off.commit_secs

    def submit_commit(self, steps_done: int) -> None:
        """Queue the commit of the state after ``steps_done`` steps behind this step's updates. The
        copies it names are fixed now (main thread, Note: [State copies]); the resident stages' state
        is written to a copy other than the committed one first."""
        flush = self.claim_flush()
        for st in self.states:
            st.committed = st.cur
        copies = [s.cur for s in self.states]
        self.last_commit_step = steps_done
        self._last_commit_time = time.monotonic()

        def commit():
            try:
                self.flush(flush, commit=True)
                self.write_commit(steps_done, copies)
            except BaseException:
                self.failed_commit_step = steps_done
                raise
            self.durable_step = steps_done

        self.worker.submit_call(commit, f"the commit of step {steps_done}")

    def commit(self, steps_done: int) -> None:
        """Commit now unless the last commit is this state (the end of a run, a stop); waits for it."""
        if self.cfg.offload.commit == "cow" and self.last_commit_step != steps_done:
            self.submit_commit(steps_done)
        self.worker.wait_all()

    def claim_flush(self) -> list[tuple[StageState, int, tuple[Tensor, ...]]]:
        """The dirty resident stages, the copy each will be written to and the tensors holding its newest
        state (main thread, before the write is queued or done: a stage with a spare copy swaps its two
        at its next update, engine.py's Note: [Spare copies], which may come before the write)."""
        out = []
        for st in self.states:
            if st.dirty:
                st.cur = st.target(keep_source=False)
                st.dirty = False
                out.append((st, st.cur, st.resident))
        return out

    def flush(self, flush: list[tuple[StageState, int, tuple[Tensor, ...]]], commit: bool = False) -> None:
        futs = [(self.store.write_from(k, t), st) for st, c, held in flush for k, t in zip(st.copies[c].state, held)]
        for f, st in futs:
            watchdog.result(f, f"the write of {st.stage.name}'s resident optimizer state")
        nbytes = sum(self.fmt.state_bytes(st.numel) for st, _, _ in flush)
        self.counters().add(ssd_write_bytes=nbytes, **({"commit_write_bytes": nbytes, "commits": 1} if commit else {}))

    def write_commit(self, steps_done: int, copies: list[int]) -> None:
        """Tag the named copies, sync the store, write the record (commit.py's two steps)."""
        for st, c in zip(self.states, copies):
            if st.owned:
                for key in st.copies[c].state:
                    self.store.set_tag(key, step_tag(steps_done))
        self.store.sync()
        distributed.current().commit_barrier(steps_done)  # every rank's state is durable before any record names it
        write_record(self.store_dirs[0], {**self._record_fields(), "step": steps_done, "copies": copies,
                                          "store_uuid": self.store.uuid, "generation": self.store.generation})

    def _record_fields(self) -> dict:
        """What a commit record says of the run besides its step and copies."""
        return {"model": self.cfg.model.model_dump(), "owned": [st.index for st in self.states if st.owned],
                "settings": fixed_settings(self.cfg)}

    def commit_initial(self) -> None:
        """The commit record of the initial state (step 0), written synchronously."""
        for st in self.states:
            st.committed = st.cur if self.cfg.offload.commit == "cow" else None
        if self.cfg.offload.commit == "cow":
            self.write_commit(0, [s.cur for s in self.states])
            self.last_commit_step = self.durable_step = 0
        else:
            self.store.sync()

    def recorded_step(self) -> int:
        """The step of this state's commit record (-1 when it has none that is valid)."""
        try:
            return read_record(self.store_dirs[0], self.store, len(self.states))["step"]
        except ResumeError:
            return -1

    def commit_fingerprint(self, step: int) -> int:
        """What the ranks compare before a roll-forward: the optimizer state is each rank's own (its
        tags decide), so nothing (LoRA's replicated adapters: their file's hash)."""
        return 0

    def roll_forward(self, step: int) -> bool:
        """Rewrite the commit record for ``step`` if the store holds that step's state of every stage
        this rank owns (each tag written and synced before the ranks' commit barrier; engine's
        ``_agree_on_commit``). Returns whether it did. A rank killed writing its first record (step 0's)
        has none: its fields are this run's (``_record_fields``)."""
        from fuyou.engine.commit import RECORD

        path = self.store_dirs[0] / RECORD
        try:
            old = json.loads(path.read_text()) if path.exists() else {**self._record_fields(),
                                                                      "copies": [0] * len(self.states)}
            copies = list(old["copies"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        every = build_states([s.stage for s in self.states], 0.0, n_copies=3, int8=self.fmt.moments == "int8")
        for s, full in zip(self.states, every):
            if not s.owned:
                continue
            # (over every copy a state may hold: this launch's plan may keep fewer, Note: [State copies])
            c = tagged_copy(self.store, full.copies, step)
            if c is None:
                return False
            copies[s.index] = c
        write_record(self.store_dirs[0], {**{k: v for k, v in old.items() if k != "checksum"}, "step": step,
                                          "copies": copies, "store_uuid": self.store.uuid,
                                          "generation": self.store.generation})
        return True

    def resume(self) -> None:
        """Open the last commit: current copies from the record, compute weights rebuilt from the
        masters chunk by chunk (bounded memory), missing tensors (new settings) allocated."""
        if self.cfg.offload.commit != "cow":
            raise ResumeError("offload.commit='none' updates the state in place; it cannot be resumed")
        rec = read_record(self.store_dirs[0], self.store, len(self.states))
        owned = [st.index for st in self.states if st.owned]
        from fuyou.engine.commit import RECORD

        had = json.loads((self.store_dirs[0] / RECORD).read_text()).get("owned", list(range(len(self.states))))
        if had != owned:
            raise ResumeError(f"the state in {self.store_dirs[0]} holds the optimizer state of stages {had}, "
                              f"but this rank owns {owned}: resume with the world size that trained the run")
        for s, c in zip(self.states, rec["copies"]):
            if not s.owned:
                continue
            if c >= len(s.copies):  # the record names a copy this configuration does not keep
                from_master = s.keys.weights == s.keys.master  # the master is the compute weights (engine)
                s.copies = build_states([s.stage], self.cfg.optim.weight_decay, n_copies=c + 1,
                                        int8=self.fmt.moments == "int8")[0].copies
                if from_master:
                    s.read_weights_from_master()
            s.cur = s.committed = c
            for key in s.keys.state:
                tag = self.store.record(key).tag if key in self.store else None
                if tag != step_tag(rec["step"]):
                    raise DamagedStateError(f"the commit record names {key} as the state of step "
                                            f"{rec['step']}, but the store holds {tag or 'no committed state'} "
                                            f"there: the record was edited or damaged; start a new run (nothing "
                                            f"was overwritten)")
        self.start_step = self.last_commit_step = self.durable_step = rec["step"]
        missing = [spec for spec in self.specs() if spec[0] not in self.store]
        if missing:
            self.store.allocate_many(missing)
        for s in self.states:
            if s.index in self.plan.cached_stages:
                s.cache = self.cache_buffer(s)
            if not s.owned:  # its weights come from its owner (the engine's first exchange)
                continue
            if s.index in self.plan.resident_stages:
                s.resident = resident_state(s.numel, self.fmt)
                s.held_grad = self.held_grad(s)
                s.spare = self.spare(s)
                for key, t in zip(s.keys.state, s.resident):
                    self.store.read_into(key, t).result()  # CRC-checked
            mdt = self.fmt.master_dtype
            for a in range(0, s.numel, self.chunk):
                n = min(self.chunk, s.numel - a)
                with self.opt_pool.acquire(n * dtype_size(mdt), mdt) as buf:
                    self.store.read_into(s.keys.master, buf.tensor, start=a).result()  # CRC-checked
                    if s.cache is not None:
                        s.cache[a:a + n].copy_(buf.tensor)
                    elif s.keys.weights != s.keys.master:  # else the master is the compute weights
                        self.store.write_from(s.keys.weights, buf.tensor.to(self.cdtype), start=a).result()

    # -- one optimizer step ----------------------------------------------------------------------

    def write_back(self) -> None:
        """Write dirty resident optimizer state to the store (to a copy the last commit does not name),
        so that reading the store gives the newest state (layout docstring)."""
        self.worker.wait_all()
        self.flush(self.claim_flush())

    def master_chunks(self):
        """Yield every stage's master weights in order, in chunks of pool memory (bounded), in the
        master's dtype (fp32, or bf16 with ``optim.master=bf16``)."""
        self.write_back()
        mdt = self.fmt.master_dtype
        dist = distributed.current()
        for st in self.states:
            for a in range(0, st.numel, self.chunk):
                n = min(self.chunk, st.numel - a)
                with self.opt_pool.acquire(n * dtype_size(mdt), mdt) as buf:
                    if st.owned:
                        self.store.read_into(st.keys.master, buf.tensor, start=a).result()
                    if self.sharded:  # from the stage's owner to every rank
                        dist.broadcast_tensor(wire(buf.tensor), st.owner, f"sending {st.stage.name}'s master weights")
                    if dist.is_main:  # every rank runs this loop; rank 0 is the one saving
                        yield buf.tensor

    def master_chunks_now(self):
        """The master weights as the last update left them, like ``master_chunks`` but writing nothing first
        (``master_chunks`` writes the resident state back): a run whose final commit failed (a full or removed
        SSD directory, a file system that refuses writes) still saves what it trained. Resident stages come
        from CPU memory, the others from their newest store copy (open files: a directory removed under the
        run is still read). One process, every update done without error."""
        if not self.settled():
            raise FuyouError("the weights cannot be read as they are: an update did not finish, or was skipped")
        mdt = self.fmt.master_dtype
        for st in self.states:
            for a in range(0, st.numel, self.chunk):
                n = min(self.chunk, st.numel - a)
                if st.resident is not None:
                    yield st.resident[0][a:a + n]
                    continue
                with self.opt_pool.acquire(n * dtype_size(mdt), mdt) as buf:
                    watchdog.result(self.store.read_into(st.keys.master, buf.tensor, start=a),
                                    f"reading {st.stage.name}'s master weights")
                    yield buf.tensor

    def settled(self) -> bool:
        """Every update submitted has finished without error (none skipped after another failed, none still
        running: a stalled one may be writing the resident state), one process: what ``master_chunks_now``
        needs to read a consistent model."""
        return (not self.sharded and all(st.owned and st.error is None and st.pending == 0 for st in self.states))

    def state_dict(self) -> dict[str, Tensor]:
        """fp32 master weights by global key (materialises the model: for tests and small models)."""
        out = {}
        self.write_back()
        for st in self.states:
            if not st.owned:  # data parallel: another rank's (each rank returns the stages it owns)
                continue
            flat = torch.empty(st.numel, dtype=self.fmt.master_dtype)
            self.store.read_into(st.keys.master, flat).result()
            out.update({st.stage.key(n): v.float() for n, v in st.views(flat).items()})
        return out

    def optimizer_state(self) -> dict[str, dict[str, Tensor]]:
        out: dict[str, dict[str, Tensor]] = {}
        self.write_back()
        for st in self.states:
            if not st.owned:
                continue
            raw = {}
            for key, t in zip(st.keys.state, self.fmt.tensors):
                raw[t.role] = torch.empty(t.numel(st.numel), dtype=t.dtype)
                self.store.read_into(key, raw[t.role]).result()
            _, m, v = decode_state(self.fmt, raw)  # fp32 values of the stored moments
            mv, vv = st.views(m), st.views(v)
            for n in st.slots:
                out[st.stage.key(n)] = {"exp_avg": mv[n].clone(), "exp_avg_sq": vv[n].clone()}
        return out


def grad_key(st: StageState) -> str:
    """The store key where a stage's gradient waits for the global norm (exact clipping)."""
    return f"{st.stage.name}/grad"


def resident_state(numel: int, fmt: StateFormat | None = None) -> tuple[Tensor, ...]:
    """CPU memory for a resident stage's state tensors (fp32 master, m and v by default): huge-page
    buffers (the store writes them whole every step; aligned.huge_empty says why huge pages)."""
    from fuyou.store.aligned import huge_empty

    fmt = fmt or StateFormat()
    return tuple(huge_empty(t.numel(numel) * t.itemsize).view(t.dtype)[:t.numel(numel)] for t in fmt.tensors)


def _another_name(cfg) -> str:
    """The advice to a new run whose state another run holds: with a name drawn from the time (no run.name), runs
    started in the same second drew the same one (a pass: a job array's runs refused each other)."""
    if cfg.run.name is None:
        return ("this run's name was drawn from the time, and that run started in the same second drew it too: give "
                "each run started at once its own run.name")
    return "choose another run.name for this one"


def refuse_committed_state(store_dirs: list[Path], cfg, name: str) -> None:
    """A new run whose state directory holds an earlier run's committed state is refused (resume it, or
    ``offload.replace_state``). Cheap: the engine asks before it loads the data, and again on opening."""
    from fuyou.engine.commit import RECORD

    live = lock_holder(store_dirs[0])
    if cfg.run.name is None and live is not None:  # a run of the same second, live: said before the data loads
        raise NameTaken(f"the SSD state {store_dirs[0]} is another run's, held by process {live}, of the same name: "
                        f"{_another_name(cfg)}")
    if (store_dirs[0] / RECORD).exists() and not cfg.offload.replace_state:
        owner = read_owner(store_dirs[0])
        if _unstarted(store_dirs[0], owner):
            return  # the initial state of a run whose directory was never made: nothing to resume, it is removed
        run = f"the run in {owner}" if owner else f"an earlier run named {name[:-len(STATE_SUFFIX)]!r}"
        if live is not None:  # (its advice was to resume a run that was still training)
            raise ConfigError(f"{store_dirs[0]} holds the SSD state of {run}, which is still training (process "
                              f"{live}); {_another_name(cfg)}")
        if owner and not (Path(owner) / "config.toml").is_file():  # (a hostile pass: its advice was a resume of a
            # directory that was gone, which fails)
            raise ConfigError(f"{store_dirs[0]} holds the committed SSD state of {run}, whose run directory is no "
                              f"longer there (moved? resume it where it is now; deleted: its state cannot be resumed "
                              f"without it): choose another run.name, or offload.replace_state=true to delete that "
                              f"state")
        raise ConfigError(f"{store_dirs[0]} holds the committed SSD state of {run}: continue it with `fuyou train "
                          f"--resume {owner or 'RUN_DIR'}`, or choose another run.name (offload.replace_state=true "
                          f"deletes that state, and that run could not be resumed again)")


def _unstarted(store_dir: Path, owner: str | None) -> bool:
    """Whether a committed state is only a run's initial one (step 0) and its run directory was never made
    (data parallel: rank 0 killed between the ranks' step-0 commit and the run directory; a peer kept its
    state, which said "continue it with --resume" of a directory that did not exist, in a loop)."""
    from fuyou.engine.commit import RECORD

    try:
        step = json.loads((store_dir / RECORD).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return False
    return step == 0 and (owner is None or not Path(owner).exists())  # (no owner: killed before it was claimed)


OWNER = "fuyou-store-owner.json"  # in a state directory: the run directory whose state it is


def write_owner(store_dir: Path, run_dir: Path, rid: str | None = None) -> None:
    """Record that ``store_dir`` holds the state of the run in ``run_dir``, whose id is ``rid`` (a state is
    found by run.name, which two run directories may share: a resume then checks it is its own,
    ``owner_mismatch``)."""
    tmp = store_dir / (OWNER + ".tmp")
    try:
        tmp.write_text(json.dumps({"run_dir": str(Path(run_dir).resolve()), **({"run_id": rid} if rid else {})}))
        tmp.replace(store_dir / OWNER)
    except OSError as e:  # (a full disk: a new-user pass got a traceback, and an empty .tmp file left)
        tmp.unlink(missing_ok=True)
        raise io_error_from_oserror(e, str(store_dir / OWNER), 0, 0, "writing the state's owner file") from e


def owner_record(store_dir: Path) -> dict:
    """The owner file's record ({} if none or unreadable)."""
    try:
        rec = json.loads((store_dir / OWNER).read_text())
        return rec if isinstance(rec, dict) and isinstance(rec.get("run_dir"), str) else {}
    except (OSError, ValueError):
        return {}


def read_owner(store_dir: Path) -> str | None:
    return owner_record(store_dir).get("run_dir")


RUN_ID = "fuyou-run.json"  # in a run directory: its id, which its SSD state's owner file records


def run_id(run_dir: Path) -> str | None:
    """The run's id (None: a run from before runs had one); it moves and is copied with the directory."""
    try:
        rid = json.loads((Path(run_dir) / RUN_ID).read_text()).get("run_id")
        return rid if isinstance(rid, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def write_run_id(run_dir: Path, rid: str) -> None:
    (Path(run_dir) / RUN_ID).write_text(json.dumps({"run_id": rid}) + "\n")


def owner_mismatch(store_dir: Path, run_dir: Path, rid: str | None = None) -> str | None:
    """The other run directory whose state ``store_dir`` holds, if it is not ``run_dir``'s (whose id is
    ``rid``). Another run's id decides, wherever that run is now (a new-user pass resumed the state of a
    run of the same name once its directory had moved). The same id (the run moved, or was copied) or no
    ids (runs from before them): the recorded owner, if its directory still holds that run and its config
    names this state's SSD directory (a copy of a run beside the original shares no state with it; a copy
    with its own SSD directory, a restored backup, is the copy's own)."""
    rec = owner_record(store_dir)
    owner = rec.get("run_dir")
    if owner is None:
        return None
    theirs = rec.get("run_id") if isinstance(rec.get("run_id"), str) else None
    if rid and theirs and theirs != rid:
        return owner
    if Path(owner) == Path(run_dir).resolve() or not Path(owner).is_dir():
        return None
    if theirs and run_id(Path(owner)) != theirs:  # the owner's place holds another run now
        return None
    config = Path(owner) / "config.toml"
    if not config.is_file():  # no longer a run directory
        return None
    try:
        from fuyou.tomlfile import read_toml

        dirs = read_toml(config).get("offload", {}).get("ssd_dirs", [])
        here = Path(store_dir).resolve().parent
        if not any(Path(d).resolve() == here for d in dirs):
            return None
    except (OSError, ValueError, TypeError, AttributeError):  # unreadable: keep the refusal, it is the safe side
        pass
    return owner
