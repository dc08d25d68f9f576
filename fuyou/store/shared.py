"""CPU memory that every process of one machine maps: the data-parallel ranks' one weight cache.

With the optimizer state sharded by stage (``fuyou/engine/exchange.py``) each stage's compute
weights are written by its owner alone and read by every rank. Ranks on one machine need not each
hold a copy and receive every update through gloo: the cache lives in one segment under
``/dev/shm`` that they all map (``MAP_SHARED``). The owner's update writes a stage's part in place;
the weight exchange then sends a token instead of the weights, so the others' next loads still
wait for the update, in the same order as before.

Creation: local rank 0 makes the file and reserves every page (``posix_fallocate``: a tmpfs
without room fails now, with a sentence, rather than with SIGBUS at a later page fault); the
others open it once it exists; then it is unlinked, so a crash leaves nothing behind (the
mappings stay valid until each process exits). Each process page-locks its own mapping for the
device copies (``register_host``).
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import torch

from fuyou.errors import BudgetError, StoreError

SHM_DIR = Path("/dev/shm")


def shm_free() -> int:
    """Bytes free under ``/dev/shm`` (0 where it does not exist)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


#: Room left free under /dev/shm beside the cache: NCCL's shared-memory transport (GPUs without
#: peer-to-peer) and other processes make segments there too.
SHM_MARGIN = 256 * 1024**2


def process_gone(pid: int) -> bool:
    """Whether no process of this machine has ``pid`` (another user's process counts as there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def sweep_stale() -> None:
    """Remove caches left by processes that no longer exist (``fuyou-cache-<pid>-...``: a rank 0 killed
    between making the file and unlinking it, a window of a few collectives)."""
    for p in SHM_DIR.glob("fuyou-cache-*-*"):
        try:
            pid = int(p.name.split("-")[2])
        except (ValueError, IndexError):
            continue
        if process_gone(pid):
            p.unlink(missing_ok=True)


class SharedSegment:
    """``nbytes`` of CPU memory at ``path`` (under ``/dev/shm``), created (``create``) or opened."""

    def __init__(self, path: str | Path, nbytes: int, create: bool):
        self.path, self.nbytes = Path(path), int(nbytes)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                try:
                    os.posix_fallocate(fd, 0, self.nbytes)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.ENOMEM):
                        raise BudgetError(f"{SHM_DIR} has no room for the ranks' shared weight cache of "
                                          f"{self.nbytes / 2**30:.2f} GiB ({shm_free() / 2**30:.2f} GiB free): enlarge "
                                          f"it (a container's --shm-size) or lower --cpu-mem") from None
                    raise
            elif os.fstat(fd).st_size != self.nbytes:
                raise StoreError(f"the shared weight cache {self.path} holds {os.fstat(fd).st_size} bytes, not "
                                 f"{self.nbytes}: the ranks planned different caches")
            self._map = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        except BaseException:
            if create:  # whatever failed (mmap under a memory limit, an interrupt), the name goes with it
                self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def view(self, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """``numel`` elements of ``dtype`` at byte ``offset`` (aligned to the dtype's size). A tensor of
        its own, not a view of ``tensor``: views share their base's version counter, so an in-place write
        to one stage's weights (an update) would fail autograd's check on another stage's, saved for its
        backward. Each tensor keeps the mapping alive (it holds the ``mmap`` object)."""
        return torch.frombuffer(self._map, dtype=dtype, count=numel, offset=offset)

    def unlink(self) -> None:
        """Remove the name (every rank has mapped it); the memory lives until the last mapping goes."""
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Drop this object's references. The mapping is not closed here: ``mmap.close`` would unmap
        memory that a surviving tensor (a failed step's traceback holding a stage's weights) still
        points at; it goes with the last tensor that holds it."""
        self.tensor = None  # type: ignore[assignment]
        self._map = None  # type: ignore[assignment]
