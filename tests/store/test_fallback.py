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
    """Emulate a file system without O_DIRECT: open(2) with O_DIRECT fails with EINVAL, as on old tmpfs."""
    real_open = os.open

    def open_without_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
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
