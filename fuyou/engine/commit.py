"""Crash-safe commits of the SSD training state (copy-on-write), and fault-injection points.

The engine updates a stage's fp32 master weights and Adam moments during backward, so updating them
in place would leave a mix of two steps on the SSD after a crash. With ``offload.commit='cow'``
each stage has two copies of its state, A and B: step ``s`` reads the *current* copy and writes the
other one. When every stage of step ``s`` is updated, a **commit** makes the new copies current:

1. the copies it names are tagged ``step N`` in the store, and ``store.sync()`` fsyncs the data files
   and writes the store's manifest (with the tags, and its generation number) atomically;
2. the commit record (``fuyou-commit.json`` in the first SSD directory: the step reached, the current
   copy of every stage, the store's id and the manifest generation it was committed with, and a
   SHA-256 of all of that) is written to a temporary file, fsync'd, renamed over the old record, and
   the directory is fsync'd.

Resuming checks the record's checksum, that its store and generation match the store beside it,
and that every copy it names is tagged with its step: a damaged or edited record (another step,
other copies) is refused with a sentence, never resumed into wrong weights.

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

import hashlib
import json
import os
from pathlib import Path

from fuyou.engine.config import STATE_SUFFIX
from fuyou.errors import StoreError
from fuyou.distributed import resume_command
from fuyou.faults import fault

RECORD = "fuyou-commit.json"


def state_name(run_name: str) -> str:
    """The name of a run's SSD state directory (rank 0's)."""
    return run_name + STATE_SUFFIX


class ResumeError(StoreError):
    """The saved state cannot be resumed as asked (never committed, another world size or kind of run)."""

    exit_status = 2  # (a resume of it as asked fails again: the message says what to do instead)


class DamagedStateError(ResumeError):
    """The saved state is damaged or was edited (its commit record, or what the record names, is not what was
    written): it cannot be trusted; a new run starts afresh."""

    exit_status = 5  # (fuyou/errors.py, as StoreCorruptError's)


class CommitError(StoreError):
    """A step could not be committed (disk full, I/O error); the previous commit is intact."""


def write_record(directory: Path, record: dict) -> None:
    """Atomically replace the commit record (tmp, fsync, rename, fsync dir). On ENOSPC or EIO the
    previous record is untouched and the error propagates."""
    path = directory / RECORD
    tmp = directory / f"{RECORD}.tmp.{os.getpid()}"  # one name per writer
    record = {**record, "checksum": _digest(record)}
    replaced = False
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
        tmp = None
        replaced = True
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if replaced:  # only the directory's fsync failed: the new record is in place, maybe not durable
            reason = e.strerror or e
            raise CommitError(f"the commit of step {record.get('step')} in {directory} may not be durable ({reason}); "
                              f"the record is this step's or the previous one, both consistent: fix the disk, then "
                              f"continue with `{resume_command()}`") from e
        previous = "none"
        try:
            previous = f"step {json.loads(path.read_text())['step']}"
        except (OSError, ValueError, KeyError):
            pass
        raise CommitError(f"committing step {record.get('step')} failed in {directory} ({e.strerror or e}); the "
                          f"previous commit ({previous}) is intact: free space or fix the disk, then continue "
                          f"with `{resume_command()}`") from e


def _digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def step_tag(step: int) -> str:
    """The tag a committed copy carries in the store (module docstring)."""
    return f"step {step}"


def tagged_copy(store, copies, step: int) -> int | None:
    """The one copy of a stage (``StageState.copies``) whose state tensors are all tagged with ``step``
    in ``store``, or None (none, or more than one: a damaged state). A rank killed between the ranks'
    commit records finds its newer commit this way (``TrainingState.roll_forward``, fuyou/reshard.py)."""
    tagged = [c for c, keys in enumerate(copies)
              if all(k in store and store.record(k).tag == step_tag(step) for k in keys.state)]
    return tagged[0] if len(tagged) == 1 else None


def read_record(directory: Path, store, n_stages: int, n_copies: int = 3) -> dict:
    """The last commit record, checked against itself and the ``store`` beside it (module docstring)."""
    path = directory / RECORD
    if not path.is_file():
        raise ResumeError(f"no commit record {path}: this state never completed a step (or offload.commit was "
                          f"'none'); start a new run")
    bad = (f"the commit record {path} is damaged or was edited; the state cannot be trusted, start a new run "
           f"(nothing was overwritten)")
    try:
        rec = json.loads(path.read_text())
        step, copies = rec["step"], rec["copies"]
        ok = (isinstance(rec, dict) and rec.get("checksum") == _digest(rec) and isinstance(step, int)
              and not isinstance(step, bool) and step >= 0 and isinstance(copies, list)
              and all(isinstance(c, int) and not isinstance(c, bool) for c in copies))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise DamagedStateError(f"{bad} ({e!r})") from e
    if not ok:
        raise DamagedStateError(f"{bad} (its checksum or fields do not match)")
    if rec.get("store_uuid") != store.uuid or len(copies) != n_stages or any(not 0 <= c < n_copies for c in copies):
        raise DamagedStateError(f"the commit record {path} does not belong to the store beside it (or to this "
                                f"model); nothing was overwritten")
    gen = rec.get("generation")
    if not isinstance(gen, int) or gen > store.generation:
        raise DamagedStateError(f"the commit record {path} names store generation {gen}, newer than the store's "
                                f"{store.generation}: the store's manifest is older than the commit; start a new run")
    return {"step": step, "copies": copies}
