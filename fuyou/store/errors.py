"""Typed errors of the SSD tier. Every message names the path / tensor involved and what to do.

Hierarchy (all under :class:`fuyou.errors.StoreError`, so ``except StoreError`` catches them all)::

    StoreError
    ├── StoreIOError            an I/O syscall failed (path, offset, length, errno)
    │   ├── StoreFullError      ENOSPC / EFBIG / EDQUOT: the disk or a file-size limit is full
    │   └── StorePermissionError EACCES / EPERM / EROFS
    ├── StoreCorruptError       checksum mismatch, truncated file, bad manifest (key, path, what)
    ├── StoreNotFoundError      no store at the given directories
    ├── StoreSpaceError         preflight: the directories lack the space the store needs
    └── StoreUsageError         a call broke the API's rules (unknown key, dtype, alignment)

:class:`PoolBudgetError` (a :class:`fuyou.errors.BudgetError`) is raised by the pinned pool when a
request can never fit its capacity.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Mapping

from fuyou.errors import BudgetError, StoreError
from fuyou.units import format_size

__all__ = [
    "StoreIOError", "StoreFullError", "StorePermissionError", "StoreCorruptError", "StoreNotFoundError",
    "StoreSpaceError", "StoreUsageError", "PoolBudgetError", "io_error_from_oserror",
]


class StoreIOError(StoreError, OSError):
    """An I/O syscall on a store file failed. Carries ``path``, ``offset``, ``length`` and ``errno``."""

    hint = ("the disk or file system reported an error: check it (dmesg, smartctl); the data of this extent is "
            "not trustworthy")

    def __init__(self, path: str, offset: int, length: int, errno: int | None, op: str, key: str | None = None):
        self.path, self.offset, self.length, self.op, self.key = str(path), offset, length, op, key
        name = _errno.errorcode.get(errno, "?") if errno is not None else "short transfer"
        what = f"tensor {key!r}, " if key else ""
        reason = os.strerror(errno) if errno is not None else "the kernel transferred nothing"
        if length:
            msg = (f"{op} of {format_size(length)} at offset {offset} of {path} ({what}extent "
                   f"[{offset}, {offset + length})) failed: {name} ({reason}); {self.hint}")
        else:  # an operation on a file or directory as a whole
            msg = f"{op} of {path} failed: {name} ({reason}); {self.hint}"
        if errno == _errno.ENOENT:
            msg = (f"{op} of {path} failed: the file is gone ({reason}); it was deleted or moved while in use (a "
                   f"completed run removes its state): start a new run, or restore the directory")
        OSError.__init__(self, errno, msg)
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else super().__str__()

    def __reduce__(self):  # picklable across processes (tests run stores in subprocesses)
        return (type(self), (self.path, self.offset, self.length, self.errno, self.op, self.key))


class StoreFullError(StoreIOError):
    """ENOSPC, EDQUOT or EFBIG: the disk, a quota or a file-size limit (ulimit -f) is exhausted."""

    hint = "free space on that file system, or raise the quota / file-size limit (ulimit -f)"


class StorePermissionError(StoreIOError):
    """EACCES, EPERM or EROFS on a store file or directory."""

    hint = "make the directory writable by this user, or choose another directory"
    exit_status = 2  # (fuyou/errors.py: a place given that cannot be written; as it is, it fails again)


def io_error_from_oserror(exc: OSError, path: str, offset: int, length: int, op: str,
                          key: str | None = None) -> StoreIOError:
    """Map an ``OSError`` from a syscall on ``path`` to the matching typed store error."""
    code = exc.errno
    if code == _errno.EINVAL and length and op != "read" and _beyond_file_size_limit(offset + length):
        # an O_DIRECT write cut short by a file-size limit that is not 4 KiB-aligned ends in EINVAL, not EFBIG, and
        # read as a failing disk (a pass with `prlimit --fsize=1000000`)
        code = _errno.EFBIG
    if code in (_errno.ENOSPC, _errno.EFBIG, _errno.EDQUOT):
        cls: type[StoreIOError] = StoreFullError
    elif code in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        cls = StorePermissionError
    else:
        cls = StoreIOError
    return cls(path, offset, length, code, op, key)


def _beyond_file_size_limit(end: int) -> bool:
    """Whether a transfer ending at byte ``end`` passes this process's file-size limit (RLIMIT_FSIZE)."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return False
    return limit != resource.RLIM_INFINITY and end > limit


class StoreCorruptError(StoreError):
    """Stored data or metadata failed validation: checksum mismatch, truncated file, bad manifest."""

    exit_status = 5  # (fuyou/errors.py: a damaged state; a resume of it fails again)

    def __init__(self, key: str | None, path: str, what: str):
        self.key, self.path, self.what = key, str(path), what
        who = f"tensor {key!r} in {path}" if key else str(path)
        super().__init__(f"{who}: {what}. The data was not returned and nothing was overwritten; this state "
                         f"cannot be trusted: start a new run (or restore the directory from a backup).")

    def __reduce__(self):
        return (type(self), (self.key, self.path, self.what))


class StoreNotFoundError(StoreError, FileNotFoundError):
    """There is no store (manifest) in the given directories."""

    exit_status = 2  # (fuyou/errors.py: a resume given directories without its state fails again: an audit saw 4)


class StoreUsageError(StoreError, ValueError):
    """A call broke the store's documented rules (unknown key, wrong dtype, misaligned chunk)."""

    exit_status = 2  # (fuyou/errors.py: a store of another format or settings than the run's: it fails again)


class StoreLockedError(StoreUsageError):
    """Another live process holds the store (one owner per state: ``store.lock``)."""


class StoreSpaceError(StoreError, BudgetError):
    """Preflight: the directories lack the space the requested allocations need."""

    def __init__(self, per_dir: Mapping[str, tuple[int, int]]):
        """``per_dir`` maps directory -> (bytes needed, bytes available)."""
        self.per_dir = dict(per_dir)
        self.needed = sum(n for n, _ in per_dir.values())
        self.available = sum(a for _, a in per_dir.values())
        self.missing = sum(max(0, n - a) for n, a in per_dir.values())
        lines = [f"  {d}: needs {format_size(n)}, has {format_size(a)} free, missing {format_size(max(0, n - a))}"
                 for d, (n, a) in per_dir.items()]
        super().__init__(
            f"the store needs {format_size(self.needed)} but the directories have "
            f"{format_size(self.available)} free; {format_size(self.missing)} missing:\n" + "\n".join(lines)
            + "\nFree space there, add directories on other drives, or reduce what is kept on SSD.")

    def __reduce__(self):
        return (type(self), (self.per_dir,))


class PoolBudgetError(BudgetError):
    """A pinned-buffer request larger than the pool's whole capacity (it could never be served)."""

    def __init__(self, requested: int, capacity: int):
        self.requested, self.capacity = requested, capacity
        super().__init__(
            f"a pinned buffer of {format_size(requested)} was requested but the pool's capacity is "
            f"{format_size(capacity)} (its share of the CPU memory budget); raise the CPU budget or "
            f"use smaller chunks (for example the optimizer's chunk size)")

    def __reduce__(self):
        return (type(self), (self.requested, self.capacity))
