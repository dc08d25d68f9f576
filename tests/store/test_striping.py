"""Striping across three directories."""

from __future__ import annotations

import os

import pytest
import torch

from fuyou.store import StoreUsageError, TensorStore

from store_testutil import random_tensor, same_bytes


def test_striped_across_three_dirs(tmp_path, cfg):
    dirs = [tmp_path / "d0", tmp_path / "d1", tmp_path / "d2"]
    big = random_tensor((1_000_003,), torch.uint8, seed=3)          # ~15.3 stripe units of 64 KiB
    small = random_tensor((1000,), torch.float32, seed=4)          # below stripe_unit: one directory
    with TensorStore.create(dirs, cfg) as store:
        store.allocate_many([("big", big.shape, big.dtype), ("small", small.shape, small.dtype)])
        rec = store.record("big")
        assert sorted(e.dir_index for e in rec.extents) == [0, 1, 2]
        assert sum(e.length for e in rec.extents) == rec.padded
        assert len(store.record("small").extents) == 1
        store.write_from("big", big).result()
        store.write_from("small", small).result()
    sizes = [os.path.getsize(d / f"fuyou-store.{i}.dat") for i, d in enumerate(dirs)]
    assert all(s >= 300_000 for s in sizes), sizes   # every drive holds a third of the big tensor
    with TensorStore.open(dirs, cfg) as store:
        out = torch.empty_like(big)
        store.read_into("big", out).result()
        assert same_bytes(out, big)
        chunk = torch.empty(5 * 65536, dtype=torch.uint8)       # a chunk spanning stripe pieces
        store.read_into("big", chunk, start=3 * 65536).result()
        assert same_bytes(chunk, big[3 * 65536:8 * 65536])
    with pytest.raises(StoreUsageError, match="original order"):
        TensorStore.open([dirs[1], dirs[0], dirs[2]], cfg)
    with pytest.raises(StoreUsageError, match="3 directories"):
        TensorStore.open(dirs[:2], cfg)
