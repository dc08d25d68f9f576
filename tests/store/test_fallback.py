"""O_DIRECT and its buffered fallback."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from fuyou.store import DirectIOFallbackWarning, StoreConfig, StoreUsageError, TensorStore

from store_testutil import SMALL, random_tensor, same_bytes


def _round_trip(d: Path, cfg: StoreConfig) -> TensorStore:
    t = random_tensor((12_345,), torch.float16, seed=7)
    store = TensorStore.create([d], cfg)
    store.allocate("x", t.shape, t.dtype)
    store.write_from("x", t).result()
    out = torch.empty_like(t)
    store.read_into("x", out).result()
    assert same_bytes(out, t)
    return store


def test_on_disk_uses_o_direct(tmp_path, cfg):
    with _round_trip(tmp_path, cfg) as store:
        assert store.direct == [True]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_dev_shm_works_direct_or_with_warning(cfg):
    """tmpfs refuses O_DIRECT before Linux 6.6 (fallback + warning); newer kernels accept it."""
    d = Path("/dev/shm") / f"fuyou-test-{uuid.uuid4().hex}"
    try:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _round_trip(d, cfg) as store:
                direct = store.direct[0]
        fell_back = [w for w in caught if issubclass(w.category, DirectIOFallbackWarning)]
        assert direct or (fell_back and str(d) in str(fell_back[0].message))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_fallback_when_o_direct_refused(tmp_path, cfg, monkeypatch):
    """Emulate a file system without O_DIRECT as Linux behaves on one (ramfs, tmpfs before 6.6, some FUSE
    mounts): open(2) with O_CREAT | O_DIRECT creates the file, then fails with EINVAL. (The emulation raised
    before creating anything, and the store's buffered retry, O_EXCL, met the file the kernel had left: every
    new state was refused as "a file the store did not make", a hostile pass on ramfs.)"""
    real_open = os.open

    def open_without_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            if flags & os.O_CREAT:
                os.close(real_open(path, flags & ~os.O_DIRECT, *args, **kwargs))
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_without_direct)
    with pytest.warns(DirectIOFallbackWarning, match=str(tmp_path)):
        store = _round_trip(tmp_path, cfg)
    with store:
        assert store.direct == [False]


def test_buffered_when_direct_io_off(tmp_path):
    with _round_trip(tmp_path, StoreConfig(**SMALL, direct_io=False)) as store:
        assert store.direct == [False]


def test_backend_falls_back_to_threads_when_the_native_library_cannot_build(tmp_path, broken_kernel_build, caplog):
    """A failed build of storeio.cpp is one warning; 'auto' then runs the Python-thread backend, and
    asking for 'native' explicitly is a typed error that says what is missing."""
    import logging

    with caplog.at_level(logging.WARNING, logger=broken_kernel_build.__name__):
        with TensorStore.create([tmp_path / "a"], StoreConfig(backend="auto")) as s:
            assert s.backend_name == "threads"
            s.allocate("x", (5000,), torch.float32)
            s.write_from("x", torch.arange(5000.0)).result()
            out = torch.empty(5000)
            s.read_into("x", out).result()
            assert torch.equal(out, torch.arange(5000.0))
        with pytest.raises(StoreUsageError, match="backend='threads'"):
            TensorStore.create([tmp_path / "b"], StoreConfig(backend="native"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "storeio" in warnings[0].getMessage()


def test_a_file_system_without_o_direct_or_a_capacity_holds_a_store(tmp_path, cfg):
    """ramfs, mounted for the test where this user may: Linux creates a file there before refusing O_DIRECT, and
    it reports a capacity of 0 (0 bytes free). Both refused every new state (a hostile pass)."""
    import subprocess
    import warnings

    d = tmp_path / "ramfs"
    d.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(d)], capture_output=True).returncode != 0:
        pytest.skip("ramfs cannot be mounted here (not root)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DirectIOFallbackWarning)
            with _round_trip(d / "state", cfg) as store:
                assert store.direct == [False]
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)
