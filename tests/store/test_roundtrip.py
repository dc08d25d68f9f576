"""Round trips of odd sizes and every supported dtype; chunked access; reopen; API rules."""

from __future__ import annotations

import pytest
import torch

from fuyou.store import (SUPPORTED_DTYPES, StoreConfig, StoreNotFoundError, StoreUsageError, TensorStore,
                         aligned_empty, is_aligned)

from store_testutil import SMALL, random_tensor, same_bytes

SHAPES = [(0,), (1,), (3, 5), (4097,), (1000, 37), (16385 + 3,)]


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=str)
def test_round_trip_odd_sizes_all_dtypes(tmp_path, cfg, dtype):
    with TensorStore.create([tmp_path / "s"], cfg) as store:
        for i, shape in enumerate(SHAPES):
            t = random_tensor(shape, dtype, seed=i)
            store.allocate(f"t{i}", shape, dtype)
            store.write_from(f"t{i}", t).result()
        futs, outs = [], []
        for i, shape in enumerate(SHAPES):
            out = torch.empty(shape, dtype=dtype)
            outs.append(out)
            futs.append(store.read_into(f"t{i}", out))
        for i, (f, out) in enumerate(zip(futs, outs)):
            assert f.result(timeout=30) == out.numel() * out.element_size()
            assert same_bytes(out, random_tensor(SHAPES[i], dtype, seed=i))


def test_values_survive_reopen(tmp_path, cfg):
    t = torch.randn(300, 301)
    with TensorStore.create([tmp_path], cfg) as store:
        store.allocate("block 17 / exp_avg", t.shape, t.dtype)
        store.write_from("block 17 / exp_avg", t).result()
    with TensorStore.open([tmp_path], cfg) as store:
        assert "block 17 / exp_avg" in store and len(store) == 1
        m = store.meta("block 17 / exp_avg")
        assert (m.shape, m.dtype, m.nbytes) == ((300, 301), torch.float32, t.numel() * 4)
        out = torch.empty_like(t)
        store.read_into("block 17 / exp_avg", out).result()
        assert torch.equal(out, t)


def test_chunked_streaming_and_unaligned_buffers(tmp_path, cfg):
    """The optimizer's pattern: chunks of a long tensor, aligned and deliberately misaligned buffers."""
    n, chunk = 50_000, 4096 * 2  # fp32: 16 KiB checksum block = 4096 elements
    full = torch.randn(n)
    with TensorStore.create([tmp_path], cfg) as store:
        store.allocate("w", (n,), torch.float32)
        futs = []
        for k, s in enumerate(range(0, n, chunk)):
            m = min(chunk, n - s)
            if k % 2:
                buf = torch.empty(m + 1)[1:]  # 4-byte offset: not 4 KiB aligned -> bounce path
                assert not is_aligned(buf)
            else:
                buf = aligned_empty(m, torch.float32)
            buf.copy_(full[s:s + m])
            futs.append(store.write_from("w", buf, start=s))
        for f in futs:
            f.result()
        out = aligned_empty(n, torch.float32)
        store.read_into("w", out).result()
        assert torch.equal(out, full)
        part = torch.empty(n - 4096)
        store.read_into("w", part, start=4096).result()
        assert torch.equal(part, full[4096:])


def test_api_rules_raise_typed_errors(tmp_path, cfg):
    with TensorStore.create([tmp_path], cfg) as store:
        store.allocate("a", (10_000,), torch.float32)
        with pytest.raises(StoreUsageError, match="already allocated"):
            store.allocate("a", (1,), torch.float32)
        with pytest.raises(StoreUsageError, match="alignment rule.*4096 elements"):
            store.write_from("a", torch.zeros(100), start=100)
        with pytest.raises(StoreUsageError, match="stored as torch.float32"):
            store.write_from("a", torch.zeros(10, dtype=torch.float16))
        with pytest.raises(StoreUsageError, match="out of range"):
            store.read_into("a", torch.zeros(10_001))
        with pytest.raises(StoreUsageError, match="no tensor 'b'"):
            store.read_into("b", torch.zeros(1))
    with pytest.raises(StoreUsageError, match="already holds a training state"):
        TensorStore.create([tmp_path], cfg)
    with pytest.raises(StoreNotFoundError):
        TensorStore.open([tmp_path / "nothing"], cfg)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of 4 KiB"):
        StoreConfig(block_size=5000)
    with pytest.raises(ValueError, match="multiple of checksum_block"):
        StoreConfig(stripe_unit="96KiB", checksum_block="64KiB")
    with pytest.raises(ValueError):
        StoreConfig(**SMALL, unknown_field=1)
    assert StoreConfig(block_size="4MiB").block_size == 4 << 20
