"""A run's last commit rewritten for another number of data-parallel ranks (issue 17).

Data parallelism keeps one state per rank (fuyou/distributed.py): full fine-tuning shards the
optimizer state by stage (each stage's master weights and moments live on one rank, its owner:
``distributed.stage_owners``), LoRA keeps the base's weights and the adapters on every rank. So a run
trained by N processes resumes with N, and ``fuyou reshard`` rewrites the last commit for M, once,
between two launches::

    fuyou reshard RUN_DIR --nproc 2                                   # trained by one process so far
    fuyou launch --nproc_per_node=2 train --resume RUN_DIR          # or torchrun ... -m fuyou.cli train

What it writes, for every new rank, in that rank's SSD directories (``Dist.rank_config``: the split
training uses): a new store holding the committed copy of every stage the rank will own (full
fine-tuning: the master weights, the moments and, with int8 moments, their scales; LoRA: the base's
stored weights and the adapters' file, as rank 0 kept them), tagged with the committed step, and a
commit record naming them. Everything else (the compute weights, the other copies, the gradients
saved for exact clipping) is rebuilt by the resume, as after any resume. The step, the data order,
the learning rate and Adam's step count do not change, so a run resharded from two ranks to one
continues as if one process had trained it all along: bit-identical where the ranks' sum of
gradients is (one micro-batch per rank, two ranks; tests/distributed/test_reshard.py).

Crash safety. The new stores are written beside the old ones (``<state>.reshard``), each synced with
its record. Only then is ``RUN_DIR/reshard.json`` written, atomically: that is the decision. After it
the old states are renamed ``<state>.resharded``, the new ones take the states' names,
``distributed.json`` records the new world size, the old states are deleted and ``reshard.json``
removed. A crash before the decision leaves the old state as it was (the next ``fuyou reshard``
removes the partial new one); after it, ``fuyou train --resume`` and ``fuyou export`` refuse the run
with a sentence until ``fuyou reshard`` is run again, which finishes the renames (each step is
recognised by the stores' ids, so running it twice never moves a new state away).

The old states stay locked from the moment they are read until the switch is done, so no resume
can open them meanwhile; a half-switched run is refused (``distributed.check_reshard_pending``) until
it is finished.
Before the first rename every new state must be in place with the id the decision recorded (else
nothing moves and the old state stays the state of record).

Limits: one machine (the states of every rank must be in this machine's SSD directories; with
torchrun over several machines each keeps its own ranks' states); free space for the committed
copies beside the old state, checked for each new state before it is written (``StoreSpaceError``).
A run whose ranks' records are a commit apart (a rank killed between the ranks' record writes) is
resharded at the newer commit, as a resume would repair it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fuyou import distributed
from fuyou.engine.commit import state_name
from fuyou.engine.layout import store_margin
from fuyou.errors import ConfigError
from fuyou.faults import fault
from fuyou.launch import command as launch_command
from fuyou.store.layout import fsync_dir, write_json_atomic
from fuyou.units import format_size

PENDING = distributed.RESHARD_PENDING  # (check_reshard_pending refuses a run while it exists)
NEW_SUFFIX = ".reshard"
RESHARD_LOCK = ".fuyou-reshard.lock"  # in the run directory while a reshard runs (``fuyou.store.lock.held``)
OLD_SUFFIX = ".resharded"
COPY_BYTES = 64 * 2**20  # one copy buffer: a multiple of every store's checksum block


def _marker_uuid(d: Path) -> str | None:
    from fuyou.store import layout as L

    try:
        return json.loads((d / L.MARKER).read_text())["uuid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class _NewRank:
    rank: int
    finals: list[Path]                       # the rank's state directories, one per SSD directory it uses
    owned: list[int] = field(default_factory=list)

    @property
    def temps(self) -> list[Path]:
        return [p.with_name(p.name + NEW_SUFFIX) for p in self.finals]


def reshard(run_dir: str | Path, nproc: int, ssd_dirs: list[str] | None = None) -> str:
    """Rewrite ``run_dir``'s last commit for ``nproc`` data-parallel ranks on this machine; returns
    what was done, in a sentence. ``ssd_dirs``: where the run's SSD directories are now, if they moved
    (give the resume the same ``--ssd``)."""
    run_dir = Path(run_dir).expanduser()
    weights = ("model.safetensors", "adapter.safetensors")
    if run_dir.parent.name == "snapshots" and any((run_dir / f).is_file() for f in weights):
        # (a pass was told it was "trained by 1 process(es)"): a snapshot holds weights only, for any number of ranks
        raise ConfigError(f"{run_dir} is a snapshot (weights only, no training state): nothing to reshard; "
                          f"--init-from {run_dir} starts a run from it with any number of processes, and "
                          f"`fuyou reshard {run_dir.parent.parent} --nproc N` reshards its run")
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.toml): give the directory `fuyou train` "
                          f"printed")
    if distributed.launched_world() > 1:
        raise ConfigError("fuyou reshard runs once, as one process, between two launches: run it without torchrun")
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give the number of processes the resume will run (1 or more)")
    from fuyou.store.lock import held

    # one reshard of a run at a time: two at once told one of them a healthy state was "damaged" or "deleted" (each
    # removed the other's working directories and read the world size while the other switched it: a pass)
    with held(run_dir / RESHARD_LOCK, lambda pid: ConfigError(
            f"another fuyou reshard of {run_dir} is running (process {pid}): wait for it to end, then give the "
            f"resume it names; nothing was changed")):
        return _reshard_run(run_dir, nproc, ssd_dirs)


def _reshard_run(run_dir: Path, nproc: int, ssd_dirs: list[str] | None) -> str:
    from fuyou.config import load_config

    flags = {"offload.ssd_dirs": list(ssd_dirs)} if ssd_dirs else None
    cfg = load_config(run_dir / "config.toml", ["model.init_from=none"], flags)
    name = state_name(run_dir.name)
    dirs = [Path(d) for d in cfg.offload.ssd_dirs]
    pending = run_dir / PENDING
    if pending.is_file():
        plan = json.loads(pending.read_text())
        if plan.get("world_to") != nproc:
            raise ConfigError(f"{run_dir} was being resharded for {plan.get('world_to')} process(es) when it stopped; "
                              f"finish that first: `fuyou reshard {run_dir} --nproc {plan.get('world_to')}`")
        from fuyou.store.lock import lock_dirs, unlock

        locks = lock_dirs([Path(p) for found in plan["old"] for p in found if Path(p).is_dir()])
        try:
            _switch(run_dir, plan)
        finally:
            unlock(locks)
        return (f"finished the interrupted reshard of {run_dir}: its step-{plan['step']} state is now for "
                f"{nproc} process(es)")
    if cfg.offload.mode != "ssd" or cfg.offload.commit != "cow":
        raise ConfigError(f"{run_dir} keeps no resumable state (offload.mode={cfg.offload.mode}, offload.commit="
                          f"{cfg.offload.commit}): there is nothing to reshard")
    if (run_dir / "model.safetensors").is_file() and not any((d / distributed.rank_state_name(name, 0)).is_dir()
                                                             for d in dirs):  # (it gave three guesses, or said
        raise ConfigError(f"{run_dir} finished: its weights are in model.safetensors and its SSD state was removed, "
                          f"so there is nothing to reshard; start a new run from it with any number of processes "
                          f"(--init-from {run_dir})")  # "resume it as it is", which is refused: a pass)
    old_world = distributed.recorded_world(run_dir, dirs, name)
    if nproc == old_world:  # (it was refused: a script resharding for the launch it makes failed when N stayed)
        _rank_states(run_dir, dirs, old_world)  # (the state the resume will need is there, and this run's: a review)
        return (f"nothing to do: {run_dir} was trained by {nproc} process(es) already; continue with "
                + _resume_advice(run_dir, nproc, ssd_dirs))
    return _reshard(run_dir, cfg, old_world, nproc, ssd_dirs)


def _resume_advice(run_dir: Path, nproc: int, ssd_dirs: list[str] | None) -> str:
    return ((f"`fuyou train --resume {run_dir}" if nproc == 1 else
             f"`{launch_command(nproc)} --resume {run_dir}")
            + "".join(f" --ssd {d}" for d in (ssd_dirs or [])) + "`")


def _rank_states(run_dir: Path, dirs: list[Path], world: int) -> list[list[Path]]:
    """Each of the run's ``world`` ranks' state directories in ``dirs``: refused when one is missing or is the
    state of another run of the same name (``owner_mismatch``)."""
    from fuyou.engine.state import owner_mismatch, run_id

    name, rid, out = state_name(run_dir.name), run_id(run_dir), []
    for r in range(world):
        rank_name = distributed.rank_state_name(name, r)
        found = [d / rank_name for d in dirs if (d / rank_name).is_dir()]
        if not found:
            raise ConfigError(f"rank {r}'s state ({rank_name}) is in none of {', '.join(map(str, dirs))}: the run "
                              f"finished and its state was deleted, the SSD directories moved (give --ssd), or "
                              f"that rank ran on another machine (fuyou reshard works on one machine's states)")
        other = owner_mismatch(found[0], run_dir, rid)
        if other is not None:  # (a resume of the other run refuses it: so does its reshard)
            raise ConfigError(f"the SSD state {found[0]} is the state of another run named {run_dir.name!r} "
                              f"(the run in {other}), not of {run_dir}: reshard that run, or give this run's "
                              f"directory back its own state; nothing was changed")
        out.append(found)
    return out


def _reshard(run_dir: Path, cfg, old_world: int, nproc: int, ssd_dirs: list[str] | None) -> str:
    import hashlib

    from fuyou.engine.commit import RECORD, read_record, step_tag, tagged_copy, write_record
    from fuyou.engine.layout import build_states
    from fuyou.engine.state import run_id, write_owner
    from fuyou.models import StageModel
    from fuyou.store import TensorStore
    from fuyou.store.aligned import aligned_empty
    from fuyou.store.errors import StoreLockedError

    name = state_name(run_dir.name)
    rid = run_id(run_dir)
    lora = cfg.lora.enabled
    states = build_states(StageModel(cfg.model).stages, 0.0, n_copies=3, int8=cfg.optim.moments == "int8")
    if not lora and nproc > len(states):
        raise ConfigError(f"{nproc} processes for a model of {len(states)} stages: each rank owns the optimizer state "
                          f"of whole stages, so use at most {len(states)}")
    dirs = [Path(d) for d in cfg.offload.ssd_dirs]
    # the new ranks' directories, as training will split them
    new = []
    for r in range(nproc):
        d = distributed.Dist(r, nproc, r, nproc)
        rank_dirs = [Path(x) for x in d.rank_config(cfg).offload.ssd_dirs]
        new.append(_NewRank(r, [x / d.store_name(name) for x in rank_dirs]))
    # a reshard that stopped before its decision left these (for this or another --nproc): never the state of record
    for d in dirs:
        for p in d.glob(f"{name}*{NEW_SUFFIX}") if d.is_dir() else ():
            shutil.rmtree(p)
    olds, stores, records = [], [], []
    try:
        for found in _rank_states(run_dir, dirs, old_world):
            try:
                store = TensorStore.open(found)  # locked until the switch is done: no resume can open it meanwhile
            except StoreLockedError as e:
                raise ConfigError(f"{run_dir} is being trained (its state is locked: {e}); stop it first "
                                  f"(Ctrl-C commits and stops)") from e
            stores.append(store)
            olds.append(found)
            rec = read_record(found[0], store, len(states), n_copies=1 if lora else 3)
            records.append({**json.loads((found[0] / RECORD).read_text()), **rec})
        t = cfg.train  # (after the states are found: a finished run was told to choose a divisor of its grad_accum)
        if t.grad_accum % nproc:
            raise ConfigError(f"train.grad_accum={t.grad_accum} is not a multiple of {nproc}: each rank runs "
                              f"grad_accum/{nproc} of a step's micro-batches, and a resume cannot change the global "
                              f"batch's split; choose a number of processes that divides {t.grad_accum}")
        step = max(rec["step"] for rec in records)
        # where each stage's committed state is now; a rank whose record is a commit behind (killed between
        # the ranks' record writes) holds that commit's state, tagged (Engine._agree_on_commit does the same)
        src: dict[int, tuple[int, int]] = {}
        for r, rec in enumerate(records):
            for i in rec.get("owned", range(len(states))):
                c = rec["copies"][i]
                if rec["step"] != step and not lora:
                    c = tagged_copy(stores[r], states[i].copies, step)
                    if c is None:
                        raise ConfigError(f"the ranks' last commits differ (steps {sorted({x['step'] for x in records})})"
                                          f" and rank {r} does not hold step {step}'s state: the state is damaged; "
                                          f"nothing was changed")
                src.setdefault(i, (r, c))
        if not lora and sorted(src) != list(range(len(states))):
            raise ConfigError(f"the ranks' commit records name no owner for stages "
                              f"{sorted(set(range(len(states))) - set(src))}: the state is damaged; nothing was changed")
        for i, (r, c) in src.items():  # every tensor of the state to move is the committed step's
            for key in ([] if lora else states[i].copies[c].state):
                if stores[r].record(key).tag != step_tag(step):
                    raise ConfigError(f"{key} in rank {r}'s state is not tagged with step {step}: the state is "
                                      f"damaged; nothing was changed")
        lsrc = next(r for r, rec in enumerate(records) if rec["step"] == step)  # LoRA: a rank at that step
        if lora:
            rec = records[lsrc]
            ldata = (olds[lsrc][0] / rec["lora_state"]).read_bytes()
            if hashlib.sha256(ldata).hexdigest() != rec.get("lora_sha256"):
                raise ConfigError(f"{olds[lsrc][0] / rec['lora_state']} does not match its commit record's SHA-256: "
                                  f"the adapters are damaged; nothing was changed")
        owners = [0] * len(states) if lora else distributed.stage_owners([s.numel for s in states], nproc)
        for nr in new:
            nr.owned = list(range(len(states))) if lora else [i for i, o in enumerate(owners) if o == nr.rank]
        buf = aligned_empty(COPY_BYTES)
        copied, new_ids = 0, []
        for nr in new:
            if lora:  # the base's weights as the rank stored them (packed, when lora.base quantises it)
                items = [(lsrc, st.keys.weights) for st in states]
            else:
                items = [(src[i][0], key) for i in nr.owned for key in states[i].copies[src[i][1]].state]
            specs = [(key, stores[r].meta(key).shape, stores[r].meta(key).dtype) for r, key in items]
            nbytes = sum(stores[r].record(key).nbytes for r, key in items)
            scfg = stores[0].config
            spread, head = store_margin(nbytes, len(items), scfg.checksum_block, scfg.stripe_unit)
            store = TensorStore.create(nr.temps, scfg, capacity_hint_bytes=nbytes + spread, head_bytes=head)
            try:
                store.allocate_many(specs)
                for r, key in items:
                    copied += _copy(stores[r], store, key, buf)
                    store.set_tag(key, stores[r].record(key).tag)
                    fault("reshard_copy")
                store.sync()
                if lora:
                    rec = records[lsrc]
                    with open(nr.temps[0] / rec["lora_state"], "wb") as f:
                        f.write(ldata)
                        f.flush()
                        os.fsync(f.fileno())
                    body = {k: v for k, v in rec.items() if k != "checksum"}
                else:
                    body = {"step": step, "copies": [src[i][1] for i in range(len(states))],
                            "model": records[0].get("model"), "owned": nr.owned,
                            **({"settings": records[0]["settings"]} if "settings" in records[0] else {})}
                body.update(store_uuid=store.uuid, generation=store.generation)
                write_record(nr.temps[0], body)
                for d in nr.temps:  # whose state it is: a reshard that dropped this let another run of the
                    write_owner(d, run_dir, rid)  # same run.name resume it, over its own weights (a pass)
                new_ids.append(store.uuid)
            finally:
                store.close(sync=False)
        for p in {t.parent for nr in new for t in nr.temps}:  # the new directories' entries are durable
            fsync_dir(p)
        old_ids = [s.uuid for s in stores]
        plan = {"world_from": old_world, "world_to": nproc, "step": step,
                "backend": _backend(run_dir), "old": [[str(p) for p in found] for found in olds], "old_uuids": old_ids,
                "new": [[str(p) for p in nr.finals] for nr in new], "new_uuids": new_ids}
        write_json_atomic(run_dir / PENDING, plan)  # the decision (module docstring)
        fault("reshard_switch")
        _switch(run_dir, plan)
    finally:
        for s in stores:  # (after the switch: their locks kept any resume out until the state was whole)
            s.close(sync=False)  # (no write: flush and unlock)
    return (f"resharded {run_dir} from {old_world} to {nproc} process(es) at its step-{step} commit "
            f"({format_size(copied)} of state copied); continue with " + _resume_advice(run_dir, nproc, ssd_dirs))


def _copy(src, dst, key: str, buf: torch.Tensor) -> int:
    rec = src.record(key)
    el = torch.empty((), dtype=rec.dtype).element_size()
    n = rec.nbytes // el
    per = COPY_BYTES // el
    view = buf.view(rec.dtype)
    for a in range(0, n, per):
        k = min(per, n - a)
        src.read_into(key, view[:k], start=a).result()  # CRC-checked
        dst.write_from(key, view[:k], start=a).result()
    return rec.nbytes


def _backend(run_dir: Path) -> str | None:
    path = run_dir / distributed.WORLD_FILE
    return json.loads(path.read_text()).get("backend") if path.is_file() else None


def _switch(run_dir: Path, plan: dict) -> None:
    """The renames after the decision; idempotent (module docstring). Nothing is moved unless every
    new state is in place, as its temporary or its final directory, with the id the plan recorded."""
    old_ids = set(plan["old_uuids"])
    for finals, uid in zip(plan["new"], plan.get("new_uuids", [None] * len(plan["new"]))):
        for p in map(Path, finals):
            tmp = p.with_name(p.name + NEW_SUFFIX)
            here = [_marker_uuid(x) for x in (tmp, p) if x.is_dir()]
            if uid is not None and uid not in here:
                raise ConfigError(f"the resharded state {tmp} is missing (or {p} is another state): the reshard cannot "
                                  f"be finished, and the old state was left as it is. Remove {run_dir / PENDING} to "
                                  f"keep the run at {plan['world_from']} process(es), then run `fuyou reshard` again")
    parents = set()
    for found in plan["old"]:
        for p in map(Path, found):
            if p.is_dir() and _marker_uuid(p) in old_ids:  # still the old state: move it aside
                os.replace(p, p.with_name(p.name + OLD_SUFFIX))
                parents.add(p.parent)
    for finals in plan["new"]:
        for p in map(Path, finals):
            tmp = p.with_name(p.name + NEW_SUFFIX)
            if tmp.is_dir():
                if p.exists():
                    raise ConfigError(f"{p} is in the way of the resharded state ({tmp}); it is not a state fuyou "
                                      f"moved: move it away, then run `fuyou reshard` again")
                os.replace(tmp, p)
                parents.add(p.parent)
    for d in parents:
        fsync_dir(d)
    world = run_dir / distributed.WORLD_FILE
    history = []
    if world.is_file():
        history = json.loads(world.read_text()).get("resharded", [])
    if not any(h.get("step") == plan["step"] and h.get("to") == plan["world_to"] for h in history):
        history.append({"from": plan["world_from"], "to": plan["world_to"], "step": plan["step"],
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    write_json_atomic(world, {"world_size": plan["world_to"], "backend": plan.get("backend"), "resharded": history})
    for found in plan["old"]:
        for p in map(Path, found):
            old = p.with_name(p.name + OLD_SUFFIX)
            if old.is_dir():
                shutil.rmtree(old)
    (run_dir / PENDING).unlink(missing_ok=True)
    fsync_dir(run_dir)
