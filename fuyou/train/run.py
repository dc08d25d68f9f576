"""Run directories: the resolved config, the metrics log and the final weights."""

from __future__ import annotations

import json
import math
import os
import struct
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from fuyou.config import FuyouConfig, to_toml
from fuyou.errors import ConfigError, FuyouError


def run_dir_path(cfg: FuyouConfig) -> Path:
    """The directory this run will write to (not created yet). Never an existing one."""
    parent = Path(cfg.run.out_dir)
    name = cfg.run.name or f"{cfg.model.preset or cfg.model.family}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = parent / name
    if cfg.run.name is not None:
        if path.exists():
            raise ConfigError(f"run directory {path} already exists; choose another run.name")
        return path
    n = 1
    while path.exists():
        n += 1
        path = parent / f"{name}-{n}"
    return path


def make_run_dir(cfg: FuyouConfig, path: Path | None = None) -> Path:
    """Create the run directory and write the resolved config into it."""
    path = path or run_dir_path(cfg)
    try:
        path.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        if not (path / "act-policy.json").is_file():  # made by --plan auto for its profile and policy
            raise ConfigError(f"run directory {path} already exists; choose another run.name") from None
    except OSError as e:
        raise ConfigError(f"cannot create run directory {path}: {e.strerror}; check run.out_dir") from e
    (path / "config.toml").write_text(to_toml(cfg))
    return path


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], chunks: Iterable[torch.Tensor],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write fp32 tensors as safetensors without holding them all: ``chunks`` yields the tensors'
    values in ``shapes`` order as a flat stream cut anywhere. Atomic (tmp file, rename).

    The format: 8-byte little-endian header length, a JSON header (dtype, shape and byte offsets per
    tensor, padded with spaces to a multiple of 8), then the raw little-endian data.
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, shape in shapes.items():
        n = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")  # one name per writer
    written = 0
    try:
        with tmp.open("wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for c in chunks:
                c = c.detach().to("cpu", torch.float32).contiguous().reshape(-1)
                fh.write(c.numpy().tobytes())
                written += 4 * c.numel()
            fh.flush()
            os.fsync(fh.fileno())  # durable before it replaces anything (and before the state may go)
        if written != offset:
            raise AssertionError(f"write_safetensors: got {written} bytes of data, the header says {offset}")
        tmp.replace(path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_weights(path: Path, trainer, cfg: FuyouConfig) -> Path:
    """fp32 weights by global key (shared parameters once, at their owner) into model.safetensors."""
    from fuyou.models import StageModel

    specs = StageModel(cfg.model).param_specs()
    chunks = trainer.master_chunks()
    try:
        return write_safetensors(path / "model.safetensors", {k: s.shape for k, s in specs.items()}, chunks,
                                 {"fuyou_model": json.dumps(cfg.model.model_dump())})
    except OSError as e:
        kept = (" The trained state is kept on the SSD: free space or fix the disk, then `fuyou train --resume "
                f"{path}` saves it." if cfg.offload.mode == "ssd" else "")
        raise SaveError(f"writing {path / 'model.safetensors'} failed ({e.strerror or e}).{kept}") from e


class SaveError(FuyouError):
    """The final weights could not be written (nothing trained is lost with SSD offload)."""


# What a resumed run may change. The committed state's shape and where it lives are fixed by the
# model and the SSD directories; everything else (steps, learning rate and the rest of the optimizer,
# batch, data, logging, budgets, schedules) may change and is recorded (``resume_changes``).
FIXED_ON_RESUME = ("model.", "offload.ssd_dirs", "offload.mode", "offload.commit")
NOT_COMPARED = ("model.init_from", "run.")


def resume_changes(saved: FuyouConfig, cfg: FuyouConfig) -> dict[str, tuple]:
    """Fields that differ between the run's committed config and the resumed one, ``{key: (old,
    new)}``; raises ConfigError naming the fields a resume cannot change."""
    def flat(c: FuyouConfig) -> dict:
        return {f"{sec}.{k}": v for sec, vals in c.model_dump().items() for k, v in vals.items()}

    old, new = flat(saved), flat(cfg)
    changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) and not k.startswith(NOT_COMPARED)}
    fixed = [k for k in changed if k.startswith(FIXED_ON_RESUME)]
    if fixed:
        raise ConfigError("a resumed run cannot change " + ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})"
                                                                 for k in fixed)
                          + ": they fix the shape and place of its committed state. Resume with the run's own "
                          "values, or start a new run (--init-from its model.safetensors once it has one)")
    return changed


def record_resume(run_dir: Path, cfg: FuyouConfig, step: int, changed: dict[str, tuple]) -> None:
    """Append the resume to ``resumes.jsonl`` and make ``config.toml`` the effective config (the
    previous one is kept as ``config.step-<N>.toml`` when anything changed)."""
    entry = {"resumed_at_step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "changed": {k: [a, b] for k, (a, b) in changed.items()}}
    with open(run_dir / "resumes.jsonl", "a") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")
    if changed:
        (run_dir / "config.toml").replace(run_dir / f"config.step-{step}.toml")
        (run_dir / "config.toml").write_text(to_toml(cfg))
