"""The out-of-core AdamW: state streamed from the SSD store in chunks, bit-identical to in-memory."""

import threading

import pytest
import torch

from fuyou.optim import fused_adamw_
from fuyou.optim.config import AdamWConfig
from fuyou.optim.out_of_core import OutOfCoreAdamW, Segment, StateKeys
from fuyou.store import PinnedPool, StoreCorruptError, TensorStore

CFG = AdamWConfig(lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1)


def setup_layer(store, name, n, gen, lowp_in_store=True, grad_dtype=torch.bfloat16):
    keys = StateKeys(f"{name}/master", f"{name}/m", f"{name}/v", f"{name}/w" if lowp_in_store else None)
    store.allocate(keys.master, (n,), torch.float32)
    store.allocate(keys.exp_avg, (n,), torch.float32)
    store.allocate(keys.exp_avg_sq, (n,), torch.float32)
    if lowp_in_store:
        store.allocate(keys.weights, (n,), torch.bfloat16)
    p = torch.randn(n, generator=gen)
    m = torch.randn(n, generator=gen) * 1e-3
    v = torch.rand(n, generator=gen) * 1e-4
    for k, t in zip((keys.master, keys.exp_avg, keys.exp_avg_sq), (p, m, v)):
        store.write_from(k, t).result()
    return keys, [p, m, v]


def in_memory(state, grads, segments, steps, grad_scale=1.0):
    p, m, v = (t.clone() for t in state)
    lowp = torch.empty(p.numel(), dtype=torch.bfloat16)
    for step, g in enumerate(grads, 1):
        for s in segments:
            sl = slice(s.start, s.end)
            fused_adamw_(p[sl], g[sl], m[sl], v[sl], lr=CFG.lr, beta1=CFG.beta1, beta2=CFG.beta2, eps=CFG.eps,
                         weight_decay=s.weight_decay, step=step, grad_scale=grad_scale, out_lowp=lowp[sl])
    return p, m, v, lowp


def read(store, key, n, dtype=torch.float32):
    out = torch.empty(n, dtype=dtype)
    store.read_into(key, out).result()
    return out


@pytest.mark.parametrize("lowp_in_store", [True, False])
def test_bit_identical_to_in_memory_kernel(tmp_path, lowp_in_store):
    n = 1_300_001  # several chunks and a ragged tail
    gen = torch.Generator().manual_seed(0)
    segments = [Segment(0, 1000, 0.0), Segment(1000, 900_000, 0.1), Segment(900_000, n, 0.0)]
    with TensorStore.create([tmp_path / "a", tmp_path / "b"]) as store:
        keys, state = setup_layer(store, "layer", n, gen, lowp_in_store)
        grads = [torch.randn(n, generator=gen).to(torch.bfloat16) for _ in range(3)]
        pool = PinnedPool(64 << 20)
        opt = OutOfCoreAdamW(store, pool, CFG, chunk_numel=1, depth=2)
        cache = None if lowp_in_store else torch.empty(n, dtype=torch.bfloat16)
        for step, g in enumerate(grads, 1):
            stats = opt.update(keys, g, numel=n, segments=segments, lr=CFG.lr, step=step, lowp_out=cache)
        p, m, v, lowp = in_memory(state, grads, segments, 3)
        assert torch.equal(read(store, keys.master, n), p)
        assert torch.equal(read(store, keys.exp_avg, n), m)
        assert torch.equal(read(store, keys.exp_avg_sq, n), v)
        got_lowp = read(store, keys.weights, n, torch.bfloat16) if lowp_in_store else cache
        assert torch.equal(got_lowp, lowp)
        assert stats.read_bytes == 12 * n and stats.written_bytes == (14 if lowp_in_store else 12) * n
        assert stats.busy_s > 0 and stats.kernel_s > 0 and stats.params == n
        assert pool.in_use == 0
        assert pool.peak <= opt.max_buffer_bytes(grad_bytes=0, lowp_bytes=2 if lowp_in_store else 0)


def test_gradient_from_the_store_with_scale(tmp_path):
    """The deferred (exact-clipping) path: the gradient is read from the store, scaled in the kernel."""
    n = 700_000
    gen = torch.Generator().manual_seed(1)
    seg = [Segment(0, n, 0.1)]
    with TensorStore.create([tmp_path]) as store:
        keys, state = setup_layer(store, "l", n, gen)
        g = torch.randn(n, generator=gen)
        store.allocate("l/grad", (n,), torch.float32)
        store.write_from("l/grad", g).result()
        opt = OutOfCoreAdamW(store, PinnedPool(64 << 20), CFG, chunk_numel=1)
        opt.update(keys, "l/grad", numel=n, segments=seg, lr=CFG.lr, step=1, grad_scale=0.25,
                   grad_dtype=torch.float32)
        p, m, v, _ = in_memory(state, [g], seg, 1, grad_scale=0.25)
        assert torch.equal(read(store, keys.master, n), p)
        assert torch.equal(read(store, keys.exp_avg_sq, n), v)


def test_several_threads_on_different_layers(tmp_path):
    n = 600_000
    gen = torch.Generator().manual_seed(2)
    with TensorStore.create([tmp_path]) as store:
        layers = [setup_layer(store, f"l{i}", n, gen) for i in range(4)]
        grads = [torch.randn(n, generator=gen).to(torch.bfloat16) for _ in layers]
        pool = PinnedPool(128 << 20)
        opt = OutOfCoreAdamW(store, pool, CFG, chunk_numel=1, num_threads=1)
        seg = [Segment(0, n, 0.1)]
        errors = []

        def work(i):
            try:
                opt.update(layers[i][0], grads[i], numel=n, segments=seg, lr=CFG.lr, step=1)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for (keys, state), g in zip(layers, grads):
            p, m, v, lowp = in_memory(state, [g], seg, 1)
            assert torch.equal(read(store, keys.master, n), p)
            assert torch.equal(read(store, keys.weights, n, torch.bfloat16), lowp)
        assert pool.in_use == 0


def test_corrupt_state_is_reported_and_buffers_released(tmp_path):
    n = 600_000
    gen = torch.Generator().manual_seed(3)
    with TensorStore.create([tmp_path]) as store:
        keys, _ = setup_layer(store, "l", n, gen)
        store.sync()
        rec = store.record(keys.exp_avg)
        ext = rec.extents[0]
        path = store.paths[ext.dir_index]
        with open(path, "r+b") as fh:  # flip a byte in the second checksum block of exp_avg
            fh.seek(ext.offset + store.checksum_block + 10)
            b = fh.read(1)
            fh.seek(ext.offset + store.checksum_block + 10)
            fh.write(bytes([b[0] ^ 0xFF]))
        pool = PinnedPool(64 << 20)
        opt = OutOfCoreAdamW(store, pool, CFG, chunk_numel=1)
        with pytest.raises(StoreCorruptError, match="l/m"):
            opt.update(keys, torch.zeros(n, dtype=torch.bfloat16), numel=n, segments=[Segment(0, n, 0.0)],
                       lr=CFG.lr, step=1)
        assert pool.in_use == 0


@pytest.mark.parametrize("fmt", ["fp32/fp32", "fp32/int8", "bf16/fp32", "bf16/int8", "bf16/bf16"])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("depth", [2, 3])
def test_the_pool_bound_holds_every_format(tmp_path, fmt, wdtype, depth):
    """An update never needs more pool memory than ``optimizer_buffer_bytes`` (what the engine's plan
    reserves: chunks of the state, the gradient read back and the compute weights written), with every
    state format, compute dtype and depth: a pool of exactly that size never blocks (issue 19 review:
    compressed chunks are smaller, so a missing compute-weights buffer used to hang the update)."""
    from fuyou.optim.compressed import StateFormat, new_state
    from fuyou.optim.out_of_core import optimizer_buffer_bytes

    master, moments = fmt.split("/")
    cfg = CFG.model_copy(update={"master": master, "moments": moments})
    f = StateFormat(master, moments)
    n = 5 * 262_144 + 4096
    with TensorStore.create([tmp_path / "s"]) as store:
        keys = StateKeys("l/master", "l/m", "l/v", "l/w",
                         *(("l/ms", "l/vs") if moments == "int8" else ()))
        init = new_state(f, torch.randn(n) * 0.02)
        for k, t in zip(keys.state, f.tensors):
            store.allocate(k, (t.numel(n),), t.dtype)
            store.write_from(k, init[t.role]).result()
        store.allocate(keys.weights, (n,), wdtype)
        store.allocate("l/g", (n,), torch.bfloat16)
        store.write_from("l/g", torch.randn(n).bfloat16()).result()
        probe = OutOfCoreAdamW(store, None, cfg, chunk_numel=262_144, depth=depth)
        pool = PinnedPool(optimizer_buffer_bytes(f, probe.chunk, depth, 2, wdtype.itemsize, n))
        opt = OutOfCoreAdamW(store, pool, cfg, chunk_numel=262_144, depth=depth)
        done = []
        t = threading.Thread(target=lambda: done.append(opt.update(
            keys, "l/g", numel=n, segments=[Segment(0, n, 0.1)], lr=1e-3, step=1, lowp_dtype=wdtype,
            grad_dtype=torch.bfloat16)), daemon=True)
        t.start()
        t.join(60)
        assert done, f"the update blocked on the pool ({pool.capacity} bytes)"


@pytest.mark.parametrize("grad_in_store", [True, False])
def test_resident_state_of_a_stage_larger_than_the_pool_is_updated(tmp_path, grad_in_store):
    """State held in CPU memory, the compute weights written to the store: each chunk's weight buffer (and its
    gradient read back) was held to the end of the stage, so a stage of more chunks than the pool holds waited on
    itself for ever (an audit: a 51M-parameter block with resident state and offload.cache_weights=false hung).
    With a pool of exactly the planned bound, it finishes, bit-identical to the in-memory kernel."""
    from fuyou.optim.compressed import StateFormat
    from fuyou.optim.out_of_core import optimizer_buffer_bytes

    chunk, n = 262_144, 30 * 262_144 + 1000
    gen = torch.Generator().manual_seed(3)
    seg = [Segment(0, n, 0.1)]
    with TensorStore.create([tmp_path / "s"]) as store:
        keys, state = setup_layer(store, "l", n, gen)
        g = torch.randn(n, generator=gen).bfloat16()
        if grad_in_store:
            store.allocate("l/g", (n,), torch.bfloat16)
            store.write_from("l/g", g).result()
        pool = PinnedPool(optimizer_buffer_bytes(StateFormat(), chunk, 2, 2, 2, n))
        opt = OutOfCoreAdamW(store, pool, CFG, chunk_numel=chunk, depth=2)
        resident = tuple(t.clone() for t in state)
        done = []
        t = threading.Thread(target=lambda: done.append(opt.update(
            keys, "l/g" if grad_in_store else g, numel=n, segments=seg, lr=CFG.lr, step=1, resident=resident,
            grad_dtype=torch.bfloat16)), daemon=True)
        t.start()
        t.join(120)
        assert done, f"the update blocked on the pool ({pool.capacity} bytes, {pool.in_use} in use)"
        p, m, v, lowp = in_memory(state, [g], seg, 1)
        assert torch.equal(resident[0], p) and torch.equal(resident[1], m) and torch.equal(resident[2], v)
        assert torch.equal(read(store, keys.weights, n, torch.bfloat16), lowp)
        assert pool.in_use == 0
