"""The master weights of a run's last commit, read from its SSD state by another process.

``fuyou export RUN_DIR`` of a run that stopped (Ctrl-C, a crash, a full disk) before writing
``model.safetensors``: the run's ``config.toml`` says where its state is (``offload.ssd_dirs``, the
store ``<run name>.fuyou-state``); the commit record (``fuyou.engine.commit``) says which copy of each
stage's master weights is the last committed step's. Nothing is written; the state stays resumable.

A run that is still training holds the store's lock. Its last commit can still be read without the
lock, because the copies a commit record names are never written until a newer record replaces it
(``fuyou.engine.commit``): the reader checks, after reading each stage, that the record is still the
one it started from, so everything it read was written before the check and belongs to that commit.
If the run commits meanwhile (with the default ``offload.commit_every`` of ten minutes, rarely),
``CommitMoved`` says to try again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from fuyou.engine.commit import RECORD, ResumeError, state_name
from fuyou.errors import ConfigError, StoreError
from fuyou.store.errors import StoreLockedError
from fuyou.store.lock import lock_holder


class CommitMoved(ConfigError):
    """The running run committed a newer step while its last commit was being read."""


MOVED = ("the run committed a newer step while its last commit was being read; run the export again (or stop the "
         "run first: Ctrl-C commits and stops it)")


def run_state_config(run_dir: Path, ssd_dirs: list[str] | None = None):
    """The run's config.toml, for reading its state where the run put it: an SSD directory that is gone is
    said as export can act on it (the config's own error said to give --ssd, which export did not take: a
    pass). ``ssd_dirs``: where the state is now, if it moved (``fuyou export --ssd``, as for a resume and a
    reshard); a state found there must be this run's (``owner_mismatch``: one of the same run.name is not)."""
    from fuyou.config import load_config
    from fuyou.tomlfile import read_toml

    run_dir = Path(run_dir)
    off = read_toml(run_dir / "config.toml").get("offload", {})
    ssd = isinstance(off, dict) and off.get("mode") == "ssd"
    if ssd_dirs:
        if not ssd:
            mode = off.get("mode") if isinstance(off, dict) else None
            raise ConfigError(f"--ssd names where a run's SSD state moved; {run_dir} kept no SSD state (offload.mode="
                              f"{mode or 'none'}): export it without --ssd")
        for d in ssd_dirs:  # (the config's own error said to create it, as for a new run)
            if not Path(d).expanduser().is_dir():
                raise ConfigError(f"--ssd {d} is not a directory: give the directory {run_dir}'s SSD state moved to "
                                  f"(the one holding {state_name(run_dir.name)})")
        cfg = load_config(run_dir / "config.toml", ["model.init_from=none"], {"offload.ssd_dirs": list(ssd_dirs)})
        if not any((Path(d) / state_name(run_dir.name)).is_dir() for d in cfg.offload.ssd_dirs):
            raise ConfigError(f"{state_name(run_dir.name)} is not in {', '.join(cfg.offload.ssd_dirs)} (--ssd): give "
                              f"the directories {run_dir}'s SSD state moved to")
        _refuse_others_state(run_dir, cfg)
        return cfg
    if ssd:
        dirs = off.get("ssd_dirs") or []
        for d in [dirs] if isinstance(dirs, str) else dirs:  # (one directory may be written as a string)
            if isinstance(d, str) and d.strip() and not Path(d).expanduser().exists():
                raise ConfigError(f"the SSD directory {d} of {run_dir}'s state does not exist: export reads the "
                                  f"state where the run put it; if it moved, give its new place (fuyou export "
                                  f"{run_dir} --ssd NEW_DIR ..., one --ssd per directory, as the run had them)")
    return load_config(run_dir / "config.toml", ["model.init_from=none"])


def _refuse_others_state(run_dir: Path, cfg) -> None:
    """A state in the directories ``--ssd`` gives that another run of the same run.name owns (its owner
    file, ``fuyou.engine.state``) is not exported as this run's."""
    from fuyou.engine.state import owner_mismatch, run_id

    name = state_name(run_dir.name)
    for d in cfg.offload.ssd_dirs:
        for found in sorted(Path(d).glob(name + "*")):  # every rank's (``rank_state_name``)
            rank = found.name.removeprefix(name)
            if found.is_dir() and (not rank or rank.startswith(".rank") and rank[5:].isdigit()):
                other = owner_mismatch(found, run_dir, run_id(run_dir))
                if other is not None:
                    raise ConfigError(f"{found} is the state of another run named {run_dir.name!r} (the run in "
                                      f"{other}), not of {run_dir}: give the directories that hold this run's state")


class CommittedWeights:
    """``tensor(key, shape)`` of the last commit's fp32 master weights, one stage in memory at a time
    (the interface of ``fuyou.hf.weights.FuyouWeights``). Use as a context manager (closes the store)."""

    def __init__(self, run_dir: Path, ssd_dirs: list[str] | None = None):
        from fuyou.engine.commit import read_record
        from fuyou.engine.layout import build_states
        from fuyou.models import StageModel
        from fuyou.optim.compressed import StateFormat
        from fuyou.store import TensorStore

        run_dir = Path(run_dir)
        from fuyou.distributed import check_reshard_pending

        check_reshard_pending(run_dir)
        cfg = run_state_config(run_dir, ssd_dirs)
        if cfg.offload.mode != "ssd":
            from fuyou.snapshots import snapshot_dirs

            snaps = snapshot_dirs(run_dir / "snapshots")
            kept = (f"its last snapshot is {snaps[-1]} (a stopped in-memory run keeps its weights there): `fuyou "
                    f"export {snaps[-1]} --out DIR`" if snaps else "nothing of it was kept; export a finished run")
            raise ConfigError(f"{run_dir} has no model.safetensors and trained in memory (offload.mode="
                              f"{cfg.offload.mode}): {kept}")
        self.cfg = cfg
        self.model = cfg.model.model_dump()
        self.family = cfg.model.family
        from fuyou.distributed import WORLD_FILE, rank_state_name, recorded_world

        name = state_name(run_dir.name)
        world = recorded_world(run_dir, cfg.offload.ssd_dirs, name)  # (distributed.json, else the states found)
        stages = StageModel(cfg.model).stages
        self.states = build_states(stages, 0.0, n_copies=3, int8=cfg.optim.moments == "int8")
        # Data parallel: each rank's state holds the stages it owns (its record's "owned"; fuyou/distributed.py)
        self.stores, self._records, self._raw, self._where = [], [], [], {}
        self.live = False  # the run is training: read without the lock (module docstring)
        self.holder: str | None = None  # the process holding the lock (``holder_task``: training, or reading)
        try:
            for rank in range(world):
                rank_name = rank_state_name(name, rank)
                dirs = [Path(d) / rank_name for d in cfg.offload.ssd_dirs if (Path(d) / rank_name).is_dir()]
                if not dirs:
                    raise ConfigError(f"{run_dir} has no model.safetensors and its SSD state ({rank_name} in "
                                      f"{', '.join(cfg.offload.ssd_dirs)}) is gone: the run finished without saving "
                                      f"weights (run.save_weights=false) and the state was deleted, the SSD directory "
                                      f"moved, or (data parallel) that rank's state is on another machine. A moved "
                                      f"state is read from its new place by `fuyou export {run_dir} --ssd NEW_DIR`")
                try:
                    store = TensorStore.open(dirs)
                except StoreLockedError:
                    store = TensorStore.open(dirs, lock=False)
                    self.live = True
                    self.holder = lock_holder(dirs[0])
                self.stores.append(store)
                raw = (dirs[0] / RECORD).read_bytes() if (dirs[0] / RECORD).is_file() else b""
                try:
                    record = read_record(dirs[0], store, len(self.states))
                    moved = self.live and (dirs[0] / RECORD).read_bytes() != raw
                except ResumeError:
                    moved = self.live  # a commit landed between reading the manifest and the record
                    if not moved:
                        raise
                if moved:
                    raise CommitMoved(MOVED)
                owned = json.loads(raw).get("owned", list(range(len(self.states))))
                self._records.append(dirs[0] / RECORD)
                self._raw.append(raw)
                for i in owned:
                    self._where.setdefault(i, (store, record["copies"][i]))
                if rank and record["step"] != self.step:
                    if self.live:  # the ranks are writing their records of a commit
                        raise CommitMoved(MOVED)
                    raise ConfigError(f"the ranks' last commits differ (steps {self.step} and {record['step']}): "
                                      f"resume the run with torchrun to finish it, then export")
                self.step = record["step"] if rank == 0 else self.step
            missing = sorted(set(range(len(self.states))) - set(self._where))
            if missing:
                raise ConfigError(f"the commit records of {run_dir}'s {world} state(s) hold no stage {missing}: a "
                                  f"data-parallel rank's state or the run's {WORLD_FILE} is missing; nothing was "
                                  f"changed")
        except BaseException:
            self.close()
            raise
        self.store = self.stores[0]
        self.mdtype = StateFormat.of(cfg.optim).master_dtype
        self._owner = {s.stage.key(name): s for s in self.states for name in s.slots}
        self._loaded: tuple[int, dict[str, Tensor]] | None = None

    def tensor(self, key: str, shape) -> Tensor:
        st = self._owner[key]
        if self._loaded is None or self._loaded[0] != st.index:
            try:
                flat = self.read(st, "master")
            except StoreError:
                if self.live and self._moved():  # (a copy read after a newer commit let it be overwritten)
                    raise CommitMoved(MOVED) from None
                raise
            if self.live and self._moved():
                raise CommitMoved(MOVED)
            self._loaded = (st.index, {st.stage.key(n): v for n, v in st.views(flat.float()).items()})
        return self._loaded[1][key].reshape(shape)

    def _moved(self) -> bool:
        return any(not f.is_file() or f.read_bytes() != raw for f, raw in zip(self._records, self._raw))

    def read(self, st, role: str) -> Tensor:
        """One committed tensor of stage ``st`` (``master``, ``exp_avg``, ``exp_avg_sq``), from the state
        that owns it, CRC-checked."""
        store, c = self._where[st.index]
        dtype = self.mdtype if role == "master" else torch.float32
        flat = torch.empty(st.numel, dtype=dtype)
        store.read_into(f"{st.stage.name}/{role}.{c}", flat).result()
        return flat

    def close(self) -> None:
        for store in self.stores:
            store.close(sync=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
