"""The data-parallel ranks' shared weight cache (fuyou/store/shared.py): one segment under /dev/shm."""

import errno
import os
import subprocess
import sys

import pytest
import torch

from fuyou.errors import BudgetError, StoreError
from fuyou.store import shared
from fuyou.store.shared import SHM_DIR, SharedSegment, sweep_stale

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm on this machine")


@pytest.fixture
def path():
    p = SHM_DIR / f"fuyou-cache-{os.getpid()}-test{os.urandom(4).hex()}"
    yield p
    p.unlink(missing_ok=True)


def test_two_mappings_see_one_memory_and_each_stage_is_a_tensor_of_its_own(path):
    a = SharedSegment(path, 3 * 4096, create=True)
    b = SharedSegment(path, 3 * 4096, create=False)
    a.unlink()
    assert not path.exists()  # the name goes; the mappings stay
    x, y = a.view(0, 1024, torch.float32), a.view(4096, 2048, torch.bfloat16)
    x.fill_(3.0)
    y.fill_(-1.5)
    assert torch.equal(b.view(0, 1024, torch.float32), x) and torch.equal(b.view(4096, 2048, torch.bfloat16), y)
    before = y._version
    x.add_(1.0)  # an update of one stage in place ...
    assert y._version == before  # ... leaves another's version counter alone (autograd's check on saved weights)
    a.close()
    assert float(x[0]) == 4.0  # a surviving tensor keeps the mapping alive
    b.close()


def test_a_cache_of_another_size_or_a_name_taken_is_refused(path):
    SharedSegment(path, 8192, create=True)
    with pytest.raises(StoreError, match="planned different caches"):
        SharedSegment(path, 4096, create=False)
    with pytest.raises(FileExistsError):
        SharedSegment(path, 8192, create=True)


def test_no_room_is_a_budget_error_and_leaves_no_file(path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shared.os, "posix_fallocate", full)
    with pytest.raises(BudgetError, match="shm-size"):
        SharedSegment(path, 1 << 20, create=True)
    assert not path.exists()


def test_a_failure_after_creating_removes_the_file(path, monkeypatch):
    def broken(*a, **k):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(shared.mmap, "mmap", broken)
    with pytest.raises(OSError):
        SharedSegment(path, 4096, create=True)
    assert not path.exists()


def test_sweep_removes_the_caches_of_dead_processes_only(path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = SHM_DIR / f"fuyou-cache-{int(done.stdout)}-stale"
    dead.write_bytes(b"x")
    path.write_bytes(b"x")  # this process's: alive
    try:
        sweep_stale()
        assert not dead.exists() and path.exists()
    finally:
        dead.unlink(missing_ok=True)
