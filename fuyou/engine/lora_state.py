"""The training state of LoRA (``lora.rank > 0``): a frozen base and small adapters.

The base's weights are only read: the store holds every stage's compute-precision copy (with
``lora.base = int8 | nf4`` the blocks' packed quantised matmul weights, ``fuyou.models.quant``), written once
at the start (from the checkpoint or the seeded init) and never again; the weight cache holds as many
stages as the budget allows, filled from it on resume. No fp32 master, no moments, no gradient of the
base exist anywhere. The adapters (``fuyou.models.lora``), their gradients and their AdamW moments live
on the compute device, and a regular fused ``torch.optim.AdamW`` updates them after backward, exactly as
the in-memory reference does.

A commit writes the adapters, their moments and the optimizer's step count to
``lora-state.<step>.safetensors`` beside the store (tmp, fsync, rename), then the commit record
(``commit.py``) naming that file and its SHA-256; older files are deleted after. A crash at any moment
leaves the last record and the file it names intact. Resuming checks the hash, reloads the adapters and
moments, and refills the cache from the store's base weights: data order, learning rate, dropout masks
are functions of the step, so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from fuyou import watchdog
from fuyou.engine.commit import RECORD, DamagedStateError, ResumeError, read_record, write_record
from fuyou import distributed
from fuyou.config import fixed_settings
from fuyou.engine.state import TrainingState
from fuyou.models.lora import LoRAConfig, init_adapters, same_targets

STATE_FILE = "lora-state.{step}.safetensors"


class LoRATrainingState(TrainingState):
    """``TrainingState`` for LoRA (module docstring). The engine sets ``adapters`` (global key ->
    device leaf) and ``optimizer`` before ``initialise`` or ``resume``."""

    adapters: dict[str, Tensor]
    optimizer: torch.optim.Optimizer

    def specs(self) -> list[tuple]:
        return [(s.keys.weights, (s.wnumel,), self.cdtype) for s in self.states]

    def initialise(self, init_values) -> None:
        """Each stage's base weights in the compute dtype to the store (and the cache), one stage in
        memory at a time; then the commit of step 0."""
        self.store.allocate_many(self.specs())
        for s in self.states:
            values = init_values(s.stage)
            flat = torch.empty(s.wnumel, dtype=self.cdtype)
            if s.packing is not None:  # a quantised base, from the fp32 values (fuyou/models/quant.py)
                s.packing.pack({name: values.pop(s.stage.key(name)) for name in s.slots}, flat)
            else:
                for name, slot in s.slots.items():
                    flat[slot.offset:slot.offset + slot.numel] = values.pop(s.stage.key(name)).reshape(-1)
            fut = self.store.write_from(s.keys.weights, flat)
            if s.index in self.plan.cached_stages:
                s.cache = self.cache_buffer(s)
                if self.fills_cache:
                    s.cache.copy_(flat)
            watchdog.result(fut, f"the initial write of {s.stage.name}'s base weights")
            del flat
        self.commit_initial()

    def new_adapters(self, seed: int, device: torch.device, fresh: bool = True) -> dict[str, Tensor]:
        """The adapters a run starts from: ``lora.init_from``'s (a PEFT adapter) or seeded; a resume
        (``fresh`` false) overwrites them with its commit's, so it seeds them without reading the adapter."""
        lora = self.cfg.lora
        if lora.init_from and fresh:
            from fuyou.hf.peft import load_peft_adapter

            values = load_peft_adapter(lora.init_from, [st.stage for st in self.states], self.cfg.model.family, lora)
        else:
            values = {k: v for st in self.states for k, v in init_adapters(st.stage, lora, seed).items()}
        return {k: v.to(device).requires_grad_(True) for k, v in values.items()}

    # -- commits ---------------------------------------------------------------------------------
    def commit_initial(self) -> None:
        if self.cfg.offload.commit == "cow":
            self._write(0)
        else:
            self.store.sync()

    def submit_commit(self, steps_done: int) -> None:
        self._write(steps_done)  # small and on the main thread: the adapters are the device's

    def commit(self, steps_done: int) -> None:
        if self.cfg.offload.commit == "cow" and self.last_commit_step != steps_done:
            self._write(steps_done)

    def _write(self, steps_done: int) -> None:
        from safetensors.torch import save

        tensors = {}
        for k, p in self.adapters.items():
            tensors[f"adapter/{k}"] = p.detach().cpu().contiguous()
            st = self.optimizer.state.get(p, {})
            for which in ("exp_avg", "exp_avg_sq"):
                tensors[f"{which}/{k}"] = (st[which].detach().cpu().contiguous() if which in st
                                           else torch.zeros_like(tensors[f"adapter/{k}"]))
        steps = [float(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        data = save(tensors, metadata={"optimizer_step": str(int(steps[0]) if steps else 0)})
        name = STATE_FILE.format(step=steps_done)
        directory = self.store_dirs[0]
        tmp = directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)
        if self.counters is not None and steps_done:  # the run's SSD-written figures count the adapters' commits
            # (not step 0's, the initial state's write, which a full run's figures do not count either: a pass)
            self.counters().add(ssd_write_bytes=len(data), commit_write_bytes=len(data), commits=1)
        self.store.sync()
        distributed.current().commit_barrier(steps_done)  # every rank's adapters are durable before any record
        write_record(directory, {**self._record_fields(), "step": steps_done, "store_uuid": self.store.uuid,
                                 "generation": self.store.generation, "lora_state": name,
                                 "lora_sha256": hashlib.sha256(data).hexdigest()})
        for old in directory.glob("lora-state.*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self.last_commit_step = self.durable_step = steps_done

    def recorded_step(self) -> int:
        try:
            return read_record(self.store_dirs[0], self.store, len(self.states), n_copies=1)["step"]
        except ResumeError:
            return -1

    def commit_fingerprint(self, step: int) -> int:
        """The first 60 bits of the SHA-256 of this rank's adapters' file of ``step`` (-1: none). The
        adapters are replicated, so every rank's file of a step is the same bytes: a rank behind rolls
        forward only onto a file equal to the others' (one of which its record vouches for)."""
        path = self.store_dirs[0] / STATE_FILE.format(step=step)
        try:
            return int(hashlib.sha256(path.read_bytes()).hexdigest()[:15], 16)
        except OSError:
            return -1

    def _record_fields(self) -> dict:
        """What a commit record says of the run besides its step and the adapters' file."""
        return {"copies": [0] * len(self.states), "model": self.cfg.model.model_dump(),
                "lora": self.cfg.lora.model_dump(), "settings": fixed_settings(self.cfg)}

    def roll_forward(self, step: int) -> bool:
        """The record of ``step`` from this rank's adapters' file of that step (written, fsync'd and
        renamed before the ranks' commit barrier: ``_write``); see ``TrainingState.roll_forward``."""
        directory = self.store_dirs[0]
        path = directory / STATE_FILE.format(step=step)
        try:  # (no record: a rank killed writing its first, step 0's)
            record = directory / RECORD
            old = json.loads(record.read_text()) if record.exists() else self._record_fields()
            data = path.read_bytes()
        except (OSError, ValueError):
            return False
        write_record(directory, {**{k: v for k, v in old.items() if k != "checksum"}, "step": step,
                                 "lora_state": path.name, "lora_sha256": hashlib.sha256(data).hexdigest(),
                                 "store_uuid": self.store.uuid, "generation": self.store.generation})
        return True

    def resume(self) -> None:
        from safetensors.torch import load

        if self.cfg.offload.commit != "cow":
            raise ResumeError("offload.commit='none' keeps no commits; it cannot be resumed")
        directory = self.store_dirs[0]
        rec = read_record(directory, self.store, len(self.states), n_copies=1)
        full = json.loads((directory / RECORD).read_text())
        name = full.get("lora_state")
        if name is None:
            raise ResumeError(f"the state in {directory} is a full fine-tuning's, not LoRA's: resume it without "
                              f"lora.* settings")
        # (a record written before a setting existed holds its default: the run had it)
        then, now = {**LoRAConfig().model_dump(), **(full.get("lora") or {})}, self.cfg.lora.model_dump()
        fixed = lambda d: {k: v for k, v in d.items() if k not in ("dropout", "targets")}  # noqa: E731 (may change)
        if fixed(then) != fixed(now) or not same_targets(self.cfg.model.family, then["targets"], now["targets"]):
            raise ResumeError(f"the adapters in {directory} were made with lora settings {full.get('lora')}; "
                              f"resume with those")
        path = directory / name
        data = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(data).hexdigest() != full.get("lora_sha256"):
            raise DamagedStateError(f"{path} is missing or damaged (its SHA-256 does not match the commit record); the "
                                    f"state cannot be trusted, start a new run")
        tensors = load(data)
        step = int(_metadata(data).get("optimizer_step", 0))
        with torch.no_grad():
            for k, p in self.adapters.items():
                p.copy_(tensors[f"adapter/{k}"])
                if step:
                    self.optimizer.state[p] = {
                        "step": torch.tensor(float(step), dtype=torch.float32, device=_step_device(self.optimizer, p)),
                        "exp_avg": tensors[f"exp_avg/{k}"].to(p.device), "exp_avg_sq": tensors[f"exp_avg_sq/{k}"].to(p.device)}
        self.start_step = self.last_commit_step = self.durable_step = rec["step"]
        for s in self.states:
            if s.index in self.plan.cached_stages:
                s.cache = self.cache_buffer(s)
                if self.fills_cache:
                    self.store.read_into(s.keys.weights, s.cache).result()  # CRC-checked

    @property
    def fills_cache(self) -> bool:
        """Data parallel with one cache for the machine's ranks (``fuyou/store/shared.py``): rank 0 fills it
        with the base, the others only read it (the engine waits for rank 0 before the first load)."""
        return self.shared_cache is None or self.rank == 0

    # -- reading it back -------------------------------------------------------------------------
    def write_back(self) -> None:
        """Nothing to write back: the base never changes and the adapters are the device's."""

    def state_dict(self) -> dict[str, Tensor]:
        """The base weights (compute dtype, or a quantised base's dequantised values, as fp32) and the adapters
        by global key."""
        out = {}
        for st in self.states:
            flat = torch.empty(st.wnumel, dtype=self.cdtype)
            self.store.read_into(st.keys.weights, flat).result()
            out.update({st.stage.key(n): v.float() for n, v in st.weight_views(flat).items()})
        out.update(self.adapter_state())
        return out

    def adapter_state(self) -> dict[str, Tensor]:
        return {k: p.detach().cpu() for k, p in self.adapters.items()}

    def optimizer_state(self) -> dict[str, dict[str, Tensor]]:
        out = {}
        for k, p in self.adapters.items():
            st = self.optimizer.state.get(p, {})
            out[k] = {w: st[w].detach().cpu() for w in ("exp_avg", "exp_avg_sq") if w in st}
        return out


def _metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {}) or {}


def _step_device(opt: torch.optim.Optimizer, p: Tensor) -> torch.device:
    """Where the optimizer keeps its step count: on the parameter's device for the fused kernels."""
    return p.device if opt.defaults.get("fused") or opt.defaults.get("capturable") else torch.device("cpu")


def lora_state_path(store_dir: Path) -> Path | None:
    """The adapters file the last commit in ``store_dir`` names, if it is a LoRA state."""
    try:
        name = json.loads((store_dir / RECORD).read_text()).get("lora_state")
    except (OSError, ValueError):
        return None
    return store_dir / name if name else None
