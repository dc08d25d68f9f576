"""One owner per store: an exclusive ``flock`` on a lock file in every directory of the store.

Two processes on one state corrupt it (a running job and a ``--resume`` of the same run would both
write the manifest and the copies). :func:`lock_dirs` takes ``LOCK_EX | LOCK_NB`` on
``fuyou-store.lock`` in each directory before anything of the store is read or created, writes the
holder's PID into it, and keeps the descriptors open for the store's life; the kernel releases the
lock when the process ends, however it ends, so a killed run never leaves a stale lock. A second
user is refused at once with :class:`StoreLockedError` naming the holder's PID.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from fuyou.store import layout as L
from fuyou.store.errors import StoreLockedError, StoreUsageError, io_error_from_oserror

__all__ = ["held", "holder_task", "lock_dirs", "unlock"]


def lock_dirs(dirs: list[Path]) -> list[int]:
    """Lock every directory (made if missing is the caller's business); returns the descriptors."""
    fds: list[int] = []
    try:
        for d in dirs:
            path = d / L.LOCK
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise StoreUsageError(f"cannot open the lock file {path} ({exc.strerror}); a symlink or an "
                                      f"unwritable directory there is not allowed") from exc
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                raise StoreLockedError(
                    f"the training state in {d} is in use by process {holder} (another fuyou run, or a --resume "
                    f"of this one); wait for it to end or stop it, then try again") from None
            try:
                _write_pid(fd)
            except OSError as exc:  # (a full disk: the first write to it; a new-user pass got a traceback)
                raise io_error_from_oserror(exc, str(path), 0, 0, "writing the lock file") from exc
    except BaseException:
        unlock(fds)
        raise
    return fds


def lock_holder(d: Path) -> str | None:
    """The PID that holds the lock of directory ``d`` (a run still using that state), else None; takes nothing."""
    try:
        fd = os.open(d / L.LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)  # (releases the shared lock, if it was taken)


def holder_task(pid: str) -> str:
    """What the fuyou process ``pid`` that holds a state does with it, from its command line: "exporting",
    "resharding", else "training" (an export holds the lock while it reads: a resume was told the run "is still
    training", and a second export called a stopped run so: a pass)."""
    try:
        args = Path(f"/proc/{int(pid)}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return "training"
    command = next((args[i + 1] for i, a in enumerate(args[:-1]) if a.endswith((b"fuyou", b"fuyou.cli"))), b"")
    return {b"export": "exporting", b"reshard": "resharding"}.get(command, "training")


def _holder(fd: int) -> str:
    """The PID the lock's holder wrote into the lock file (``lock_dirs``): its first line."""
    return (os.pread(fd, 64, 0).decode(errors="replace").split() or ["unknown"])[0]


def _write_pid(fd: int) -> None:
    """This process's PID into its lock file: written over the last holder's, then cut to its length (cut first, a
    reader between the two read an empty file: "in use by process unknown", in a pass)."""
    pid = f"{os.getpid()}\n".encode()
    os.pwrite(fd, pid, 0)
    os.ftruncate(fd, len(pid))


@contextmanager
def held(path: Path, busy: Callable[[str], BaseException]):
    """An exclusive ``flock`` on the file ``path`` (made), with this process's PID in it, for a ``with`` block;
    removed after it. Taken at once or not at all: held by another process, ``busy(holder PID)`` is raised. A
    process that opened the file before its removal and gets the lock then holds a lock on a file no one else
    will open: what it guards must be checked again under the lock (``fuyou export`` checks its --out empty).
    A file that cannot be made (no directory, a read-only one) takes no lock: what the block then does there
    fails with its own error, which says what is wrong. A lock taken on a file removed meanwhile (its holder
    done) is let go and taken again on the file now at ``path``: else two could hold "the" lock (a review)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise busy(holder) from None
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        mine = os.fstat(fd)
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)
    try:
        try:
            _write_pid(fd)
        except OSError:  # (a full disk: the PID is a courtesy, the lock is the flock)
            pass
        yield
    finally:
        path.unlink(missing_ok=True)  # (while held)
        os.close(fd)


def unlock(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)  # closing the last descriptor releases the flock
        except OSError:
            pass
    fds.clear()
