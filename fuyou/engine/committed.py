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

from pathlib import Path

import torch
from torch import Tensor

from fuyou.engine.commit import RECORD
from fuyou.errors import ConfigError
from fuyou.store.errors import StoreLockedError


class CommitMoved(ConfigError):
    """The running run committed a newer step while its last commit was being read."""


class CommittedWeights:
    """``tensor(key, shape)`` of the last commit's fp32 master weights, one stage in memory at a time
    (the interface of ``fuyou.hf.weights.FuyouWeights``). Use as a context manager (closes the store)."""

    def __init__(self, run_dir: Path):
        from fuyou.config import load_config
        from fuyou.engine.commit import read_record
        from fuyou.engine.layout import build_states
        from fuyou.models import StageModel
        from fuyou.optim.compressed import StateFormat
        from fuyou.store import TensorStore

        run_dir = Path(run_dir)
        cfg = load_config(run_dir / "config.toml", ["model.init_from=none"])
        if cfg.offload.mode != "ssd":
            raise ConfigError(f"{run_dir} has no model.safetensors and trained in memory (offload.mode="
                              f"{cfg.offload.mode}): nothing of it was kept; export a finished run")
        self.cfg = cfg
        self.model = cfg.model.model_dump()
        self.family = cfg.model.family
        dirs = [Path(d) / f"{run_dir.name}.fuyou-state" for d in cfg.offload.ssd_dirs]
        if not all(d.is_dir() for d in dirs):
            raise ConfigError(f"{run_dir} has no model.safetensors and its SSD state ({', '.join(map(str, dirs))}) is "
                              f"gone: the run finished without saving weights (run.save_weights=false) and the state "
                              f"was deleted, or the SSD directory moved")
        self.live = False  # the run is training: read without the lock (module docstring)
        try:
            self.store = TensorStore.open(dirs)
        except StoreLockedError:
            self.store = TensorStore.open(dirs, lock=False)
            self.live = True
        self._record_file = dirs[0] / RECORD
        stages = StageModel(cfg.model).stages
        self.states = build_states(stages, 0.0, n_copies=3, int8=cfg.optim.moments == "int8")
        try:
            self.record = read_record(dirs[0], self.store, len(self.states))
        except BaseException:
            self.store.close(sync=False)
            raise
        self._raw = self._record_file.read_bytes()
        self.step = self.record["step"]
        self.mdtype = StateFormat.of(cfg.optim).master_dtype
        self._owner = {s.stage.key(name): s for s in self.states for name in s.slots}
        self._loaded: tuple[int, dict[str, Tensor]] | None = None

    def tensor(self, key: str, shape) -> Tensor:
        st = self._owner[key]
        if self._loaded is None or self._loaded[0] != st.index:
            c = self.record["copies"][st.index]
            flat = torch.empty(st.numel, dtype=self.mdtype)
            self.store.read_into(f"{st.stage.name}/master.{c}", flat).result()  # CRC-checked
            if self.live and self._record_file.read_bytes() != self._raw:
                raise CommitMoved(f"the run committed a newer step while its step {self.step} was being read; run "
                                  f"the export again (or stop the run first: Ctrl-C commits and stops it)")
            self._loaded = (st.index, {st.stage.key(n): v for n, v in st.views(flat.float()).items()})
        return self._loaded[1][key].reshape(shape)

    def close(self) -> None:
        self.store.close(sync=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
