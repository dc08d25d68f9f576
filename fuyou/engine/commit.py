"""Crash-safe commits of the SSD training state (copy-on-write), and fault-injection points.

The engine updates a stage's fp32 master weights and Adam moments during backward, so updating them
in place would leave a mix of two steps on the SSD after a crash. With ``offload.commit='cow'``
each stage has two copies of its state, A and B: step ``s`` reads the *current* copy and writes the
other one. When every stage of step ``s`` is updated, a **commit** makes the new copies current:

1. ``store.sync()`` -- the data files are fsync'd and the store's manifest is written atomically;
2. the commit record (``fuyou-commit.json`` in the first SSD directory: the step reached, the current
   copy of every stage, the store's id) is written to a temporary file, fsync'd, renamed over the
   old record, and the directory is fsync'd.

A crash at any moment leaves the last record intact, and the copies it names are never written
after it (the next step writes the other copies, and only after this commit is durable: the
optimizer worker runs the commit as a job between the two steps' updates). Resuming reads the
record, regenerates the compute-precision weights from the current masters, and continues at the
recorded step; data order, learning rate and Adam's step count are functions of the step, so the
result is bit-identical to an uninterrupted run (tests/engine/test_resume.py).

Cost: twice the SSD space for master weights and moments (24 bytes per parameter instead of 12; the
planner's SSD footprint includes it), no extra traffic, one fsync per step. ``commit='none'``
updates in place and cannot resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fuyou.errors import StoreError
from fuyou.faults import fault

RECORD = "fuyou-commit.json"


class ResumeError(StoreError):
    """The saved state cannot be resumed (missing, corrupt or from another run)."""


class CommitError(StoreError):
    """A step could not be committed (disk full, I/O error); the previous commit is intact."""


def write_record(directory: Path, record: dict) -> None:
    """Atomically replace the commit record (tmp, fsync, rename, fsync dir). On ENOSPC or EIO the
    previous record is untouched and the error propagates."""
    path = directory / RECORD
    tmp = directory / (RECORD + ".tmp")
    data = (json.dumps(record, indent=1) + "\n").encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        fault("commit", record.get("step"))
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        previous = "none"
        try:
            previous = f"step {json.loads(path.read_text())['step']}"
        except (OSError, ValueError, KeyError):
            pass
        raise CommitError(f"committing step {record.get('step')} failed in {directory} ({e.strerror or e}); the "
                          f"previous commit ({previous}) is intact: free space or fix the disk, then continue "
                          f"with `fuyou train --resume RUN_DIR`") from e


def read_record(directory: Path, store_uuid: str, n_stages: int) -> dict:
    path = directory / RECORD
    if not path.is_file():
        raise ResumeError(f"no commit record {path}: this state never completed a step (or offload.commit was "
                          f"'none'); start a new run")
    try:
        rec = json.loads(path.read_text())
        step, copies = int(rec["step"]), [int(c) for c in rec["copies"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"the commit record {path} is corrupt ({e!r}); the state cannot be trusted, start a new "
                          f"run (nothing was overwritten)") from e
    if rec.get("store_uuid") != store_uuid or len(copies) != n_stages or any(c not in (0, 1, 2) for c in copies):
        raise ResumeError(f"the commit record {path} does not belong to the store beside it (or to this model); "
                          f"nothing was overwritten")
    return {"step": step, "copies": copies}
