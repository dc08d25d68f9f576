"""Corruption, truncation, full disk, permissions and preflight space checks."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fuyou.errors import StoreError
from fuyou.store import (StoreCorruptError, StoreFullError, StorePermissionError, StoreSpaceError,
                         TensorStore)
from fuyou.store.errors import io_error_from_oserror
from fuyou.store.native import native_available



def _store_with(tmp_path, cfg, t):
    with TensorStore.create([tmp_path], cfg) as store:
        store.allocate("block 3 / exp_avg_sq", t.shape, t.dtype)
        store.write_from("block 3 / exp_avg_sq", t).result()
        return store.record("block 3 / exp_avg_sq").extents[0], str(tmp_path / "fuyou-store.0.dat")


def test_flipped_byte_is_reported_not_returned(tmp_path, cfg):
    t = torch.randn(20_000)
    ext, path = _store_with(tmp_path, cfg, t)
    with open(path, "r+b") as f:
        f.seek(ext.offset + 40_000)
        b = f.read(1)
        f.seek(ext.offset + 40_000)
        f.write(bytes([b[0] ^ 0x10]))
    with TensorStore.open([tmp_path], cfg) as store:
        with pytest.raises(StoreCorruptError, match="block 3 / exp_avg_sq.*fuyou-store.0.dat.*CRC32 mismatch") as e:
            store.read_into("block 3 / exp_avg_sq", torch.empty_like(t)).result(timeout=30)
        assert e.value.key == "block 3 / exp_avg_sq" and e.value.path == path
        ok = torch.empty(4096)  # the untouched first checksum block still reads fine
        store.read_into("block 3 / exp_avg_sq", ok).result()
        assert torch.equal(ok, t[:4096])


def test_a_deleted_manifest_is_named(tmp_path, cfg):
    """A new-user pass deleted fuyou-store.json: the store said its directory 'was listed at position 0' and
    asked for the directories in their original order."""
    from fuyou.store import layout as L

    _store_with(tmp_path, cfg, torch.randn(100))
    (tmp_path / L.MANIFEST).unlink()
    with pytest.raises(StoreCorruptError, match="manifest is missing .deleted..") as e:
        TensorStore.open([tmp_path], cfg)
    assert "original order" not in str(e.value)


def test_a_moved_store_given_too_many_directories_is_told_the_count(tmp_path, cfg):
    """A review: where the manifest's directories are gone (the state moved), more directories given than it has
    was "X is not there" (a drive not mounted), with --ssd as the fix, which the user had given: it is the count."""
    from fuyou.store import StoreUsageError

    a, c, d = tmp_path / "a", tmp_path / "c", tmp_path / "d"
    a.mkdir(), d.mkdir()
    _store_with(a, cfg, torch.randn(100))
    a.rename(c)
    with pytest.raises(StoreUsageError, match="created over 1 directories .*; 2 were given"):
        TensorStore.open([c, d], cfg)
    with TensorStore.open([c], cfg):  # where it is now: it opens
        pass


def test_truncated_file_detected_at_open_and_at_read(tmp_path, cfg):
    t = torch.randn(20_000)
    ext, path = _store_with(tmp_path, cfg, t)
    os.truncate(path, ext.offset + 16_384)
    with pytest.raises(StoreCorruptError, match="truncated"):
        TensorStore.open([tmp_path], cfg)
    os.truncate(path, ext.offset + ext.length)          # restore the size, then truncate behind its back
    with TensorStore.open([tmp_path], cfg) as store:
        os.truncate(path, ext.offset + 16_384)
        with pytest.raises(StoreCorruptError, match="truncated") as e:
            store.read_into("block 3 / exp_avg_sq", torch.empty_like(t)).result(timeout=30)
        assert e.value.key == "block 3 / exp_avg_sq"
        os.truncate(path, ext.offset + ext.length)


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, torch
    from fuyou.store import StoreConfig, StoreFullError, TensorStore
    cfg = StoreConfig(block_size="16KiB", checksum_block="16KiB", stripe_unit="64KiB", backend=sys.argv[2])
    store = TensorStore.create([sys.argv[1]], cfg)
    store.allocate("early", (4 << 20,), torch.uint8)            # preallocated before the limit
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        store.allocate("late", (4 << 20,), torch.uint8)
        print("allocate: no error")
    except StoreFullError as e:
        print("allocate:", type(e).__name__, e.errno == 27, e.path.endswith(".dat"), "late" not in store)
    fut = store.write_from("early", torch.ones(4 << 20, dtype=torch.uint8))
    try:
        fut.result(timeout=30)
        print("write: no error")
    except StoreFullError as e:
        print("write:", type(e).__name__, e.errno == 27, e.offset + e.length > limit, "early" in str(e),
              "ulimit -f" in str(e))
""")


@pytest.mark.parametrize("engine", ["native", "threads"])
@pytest.mark.parametrize("limit", [1 << 20, 1_000_000])
def test_file_size_limit_gives_typed_full_error(tmp_path, engine, limit):
    """A limit that is not a multiple of 4 KiB cuts an O_DIRECT write short with EINVAL, not EFBIG: it was
    reported as a failing disk (a pass); it is the file-size limit too."""
    if engine == "native" and not native_available():
        pytest.skip("the native store I/O library could not be built here")
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), engine, str(limit)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "allocate: StoreFullError True True True" in out.stdout, out.stdout
    assert "write: StoreFullError True True True True" in out.stdout, out.stdout


def test_errno_mapping_names_path_and_extent():
    for code, cls in [(errno.ENOSPC, StoreFullError), (errno.EFBIG, StoreFullError),
                      (errno.EACCES, StorePermissionError), (errno.EROFS, StorePermissionError)]:
        e = io_error_from_oserror(OSError(code, os.strerror(code)), "/ssd/x.dat", 8192, 4096, "write", "k")
        assert type(e) is cls and isinstance(e, StoreError)
        assert "/ssd/x.dat" in str(e) and "[8192, 12288)" in str(e) and "'k'" in str(e)
    e = io_error_from_oserror(OSError(errno.EIO, "I/O error"), "/ssd/x.dat", 0, 4096, "read")
    assert e.errno == errno.EIO and "EIO" in str(e)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_directory_gives_permission_error(tmp_path, cfg):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StorePermissionError, match=str(ro)):
            TensorStore.create([ro / "store"], cfg)
    finally:
        ro.chmod(0o700)


def test_preflight_refuses_and_says_what_is_missing(tmp_path, cfg):
    with pytest.raises(StoreSpaceError, match="missing") as e:
        TensorStore.create([tmp_path / "a", tmp_path / "b"], cfg, capacity_hint_bytes=1 << 60)
    assert e.value.missing > 0 and e.value.needed == 1 << 60
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # no lock file left behind
    with pytest.raises(StoreSpaceError) as e:  # the manifest's share: the first directory's alone
        TensorStore.create([tmp_path / "a", tmp_path / "b"], cfg, capacity_hint_bytes=2 << 20, head_bytes=1 << 60)
    assert e.value.per_dir[str(tmp_path / "a")][0] == (1 << 20) + (1 << 60)
    assert e.value.per_dir[str(tmp_path / "b")][0] == 1 << 20
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("x")
    with pytest.raises(StoreSpaceError):
        TensorStore.create([tmp_path / "kept"], cfg, capacity_hint_bytes=1 << 60)
    assert (tmp_path / "kept" / "mine.txt").exists()  # a directory it did not make is left as it was
    with TensorStore.create([tmp_path / "c"], cfg) as store:
        with pytest.raises(StoreSpaceError, match="needs .* has .* free"):
            store.allocate_many([("ok", (10,), torch.float32), ("huge", (1 << 58,), torch.float32)])
        assert "ok" not in store and "huge" not in store   # all or none
        store.allocate("ok", (10,), torch.float32)
