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


def test_many_tensors_striped_and_spread_over_three_dirs(tmp_path, cfg):
    """Several tensors, striped and not, of odd sizes: each reads back whole (a stripe's offset within its lane
    that ignored the lane count wrote past its extents into the next tensor's, and passed with one striped tensor:
    a mutation audit), no file extends past the manifest's next free offset, small tensors go to the least-used
    directory, and a manifest whose extents overlap is refused when opened."""
    import json

    from fuyou.store import StoreCorruptError

    dirs = [tmp_path / "d0", tmp_path / "d1", tmp_path / "d2"]
    sizes = [70_001, 1_500_007, 300_000, 999, 655_360, 12_345, 1_048_577]
    tensors = {f"t{i}": random_tensor((n,), torch.uint8, seed=10 + i) for i, n in enumerate(sizes)}
    with TensorStore.create(dirs, cfg) as store:
        store.allocate_many([(k, t.shape, t.dtype) for k, t in tensors.items()])
        for k, t in tensors.items():
            store.write_from(k, t).result()
    manifest = json.loads((dirs[0] / "fuyou-store.json").read_text())
    for i, d in enumerate(dirs):  # (the writes stayed within the space the manifest gave out)
        assert os.path.getsize(d / f"fuyou-store.{i}.dat") <= manifest["next_offsets"][i]
    small = [manifest["tensors"][f"t{i}"]["extents"] for i, n in enumerate(sizes) if n <= cfg.stripe_unit]
    assert len({e[0][0] for e in small}) > 1  # spread over the directories, not piled in one
    with TensorStore.open(dirs, cfg) as store:
        for k, t in tensors.items():
            out = torch.empty_like(t)
            store.read_into(k, out).result()
            assert same_bytes(out, t), k
    one = manifest["tensors"]["t0"]["extents"][0]
    other = next(k for k, r in manifest["tensors"].items() if k != "t0" and r["extents"][0][0] == one[0])
    manifest["tensors"][other]["extents"][0][1] = one[1] + 4096  # inside t0's bytes
    (dirs[0] / "fuyou-store.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreCorruptError, match="overlaps"):
        TensorStore.open(dirs, cfg)
