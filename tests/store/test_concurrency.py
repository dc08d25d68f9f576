"""Many reads and writes in flight at once, from several threads, with no corruption."""

from __future__ import annotations

import threading

import pytest
import torch

from fuyou.store import PinnedPool, StoreConfig, TensorStore
from fuyou.store.native import native_available

from store_testutil import SMALL, random_tensor, same_bytes


@pytest.mark.parametrize("engine", ["native", "threads"])
def test_many_concurrent_reads_and_writes(tmp_path, engine):
    if engine == "native" and not native_available():
        pytest.skip("the native store I/O library could not be built here")
    cfg = StoreConfig(**{**SMALL, "queue_depth": 8, "backend": engine})
    sizes = [(4096 * k + 7 * k,) for k in range(1, 33)]
    data = {f"t{i}": random_tensor(s, torch.bfloat16, seed=i) for i, s in enumerate(sizes)}
    with TensorStore.create([tmp_path], cfg) as store:
        store.allocate_many([(k, v.shape, v.dtype) for k, v in data.items()])
        errors: list[BaseException] = []

        def writer(keys):
            try:
                futs = [store.write_from(k, data[k]) for k in keys]
                for f in futs:
                    f.result(timeout=60)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        keys = list(data)
        threads = [threading.Thread(target=writer, args=(keys[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for rnd in range(3):  # reads of everything overlapped with rewrites of half of it
            outs = {k: torch.empty_like(v) for k, v in data.items()}
            for k in keys[::2]:
                data[k] = random_tensor(data[k].shape, torch.bfloat16, seed=100 + rnd)
            futs = [store.write_from(k, data[k]) for k in keys[::2]]
            futs += [store.read_into(k, outs[k]) for k in keys[1::2]]
            for f in futs:
                f.result(timeout=60)
            for k in keys[1::2]:
                assert same_bytes(outs[k], data[k])
        store.flush()
        with PinnedPool(8 << 20) as pool:
            for k in keys:  # checksums verified on every read; torch.equal on top
                n = data[k].numel()
                with pool.acquire(n * 2, dtype=torch.bfloat16) as buf:
                    store.read_into(k, buf.tensor).result()
                    assert same_bytes(buf.tensor, data[k].reshape(-1))


def test_a_full_disk_at_the_lock_and_the_owner_file_is_a_typed_error(tmp_path, monkeypatch):
    """The first writes to a state directory (the lock's PID, the owner file) met a full disk with a raw
    OSError traceback and left an empty owner .tmp file (a new-user pass, on a full tmpfs)."""
    import errno
    import os

    from fuyou.engine import state
    from fuyou.store import lock
    from fuyou.store.errors import StoreFullError

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lock.os, "pwrite", full)
    with pytest.raises(StoreFullError, match="writing the lock file.*free space"):
        lock.lock_dirs([tmp_path])
    monkeypatch.undo()
    fds = lock.lock_dirs([tmp_path])  # released on the failure: it can be taken again
    lock.unlock(fds)
    monkeypatch.setattr(state.Path, "replace", full)
    with pytest.raises(StoreFullError, match="writing the state's owner file"):
        state.write_owner(tmp_path, tmp_path / "run", "id")
    assert not list(tmp_path.glob("*.tmp"))
