"""The engine's CUDA code paths on the fake device (``fuyou.engine.device``, Note: [Fake device rules]).

Three parts: each rule of the fake fires on the misuse it models; the engine's equivalence suite on
the fake (both families, activation tiers, clipping modes, resident state: bit-identical weights in
fp32, no pageable copy, every device item within the plan); and the audit's defects put back one at
a time, each of which a fake-device run must catch.
"""

import contextlib
import subprocess
import sys
import threading

import pytest
import torch

from engine_testutil import assert_same_training, make_cfg, run_both
from fuyou.engine import budget, device
from fuyou.engine.device import DeviceBudgetError, DeviceHazard, FakeDevice
from fuyou.engine.engine import NonFiniteError


# -- the rules --------------------------------------------------------------------------------------
def test_a_copy_lands_only_when_waited_on(monkeypatch):
    monkeypatch.setattr(device, "LAND_AFTER_S", 60.0)
    dev = FakeDevice()
    side = dev.new_stream("h2d")
    host = torch.arange(8, dtype=torch.float32)
    dev.register_host(host)
    with dev.on(side):
        out = dev.empty(8, torch.float32, "x")
        dev.to_device(out, host, side)
        ev = dev.event().record(side)
    assert torch.isnan(out).all()  # not landed: poison
    dev.compute.wait_event(ev)
    assert torch.equal(out, host)
    dev.close()


def test_memory_allocated_on_compute_and_filled_on_a_side_stream_is_a_hazard():
    """Audit item 1: an activation buffer allocated outside the H2D stream's context."""
    dev = FakeDevice()
    side = dev.new_stream("h2d")
    host = torch.ones(4)
    dev.register_host(host)
    out = dev.empty(4, torch.float32, "x")  # on compute
    with pytest.raises(DeviceHazard, match="without waiting for compute"):
        dev.to_device(out, host, side)
    side.wait_stream(dev.compute)
    with pytest.raises(DeviceHazard, match="record_stream"):
        dev.to_device(out, host, side)
    dev.record_stream(out, side)
    dev.to_device(out, host, side)
    dev.close()


def test_freeing_side_stream_memory_read_by_compute_needs_record_stream():
    dev = FakeDevice()
    side = dev.new_stream("h2d")
    host = torch.ones(4)
    dev.register_host(host)
    with dev.on(side):
        out = dev.empty(4, torch.float32, "x")
        dev.to_device(out, host, side)
        ev = dev.event().record(side)
    dev.compute.wait_event(ev)
    del out
    with pytest.raises(DeviceHazard, match="without record_stream"):
        dev.check()
    dev.close()


def test_a_view_inside_a_registered_buffer_is_pinned_and_one_reaching_past_it_is_not():
    """Pinned means every byte of the copy lies in a registered range (the pools hand out aligned views;
    ``Tensor.is_pinned()`` looks at the storage's start and would call them pageable)."""
    dev = FakeDevice()
    side = dev.new_stream("d2h")
    base = torch.zeros(1024)
    dev.register_host(base[8:520])
    src = dev.empty(256, torch.float32, "x")
    side.wait_stream(dev.compute)
    dev.record_stream(src, side)
    dev.to_host(base[100:356], src, side)
    assert dev.sync_copies == 0
    dev.to_host(base[400:656], src, side)  # runs past the registered range
    assert dev.sync_copies == 1
    dev.close()


def test_pageable_copies_are_counted_and_synchronous():
    dev = FakeDevice()
    side = dev.new_stream("d2h")
    src = dev.empty(4, torch.float32, "x")
    src.fill_(3)
    dst = torch.empty(4)  # not registered
    side.wait_stream(dev.compute)
    dev.record_stream(src, side)
    dev.to_host(dst, src, side)
    assert dev.sync_copies == 1 and torch.equal(dst, src)
    dev.close()


def test_the_ledger_holds_every_item_to_the_plan():
    dev = FakeDevice()
    dev.set_plan({"weights": 64}, None)
    a = dev.empty(16, torch.float32, "weights")
    with pytest.raises(DeviceBudgetError, match="above the 64 B"):
        dev.empty(1, torch.float32, "weights")
    with pytest.raises(DeviceBudgetError, match="not an item of the memory plan"):
        dev.empty(1, torch.float32, "gradients")
    del a
    dev.empty(16, torch.float32, "weights")  # freed memory is no longer charged
    dev.close()


def test_events_time_simulated_copies(monkeypatch):
    monkeypatch.setattr(device, "LAND_AFTER_S", 60.0)  # nothing lands by itself during the test
    monkeypatch.setattr(device, "FAKE_COPY_BW", 1e8)   # 0.1 s of device time: host jitter is small beside it
    dev = FakeDevice()
    side = dev.new_stream("h2d")
    host = torch.empty(10_000_000, dtype=torch.uint8)
    dev.register_host(host)
    with dev.on(side):
        out = dev.empty(host.numel(), torch.uint8, "x")
        t0 = dev.event(timing=True).record(side)
        dev.to_device(out, host, side)
        t1 = dev.event(timing=True).record(side)
    with pytest.raises(DeviceHazard, match="not completed"):  # as on CUDA: read once it has run
        t0.elapsed_s(t1)
    t1.synchronize()
    assert t0.elapsed_s(t1) == pytest.approx(host.numel() / device.FAKE_COPY_BW, rel=0.2)
    with pytest.raises(DeviceHazard, match="timing=True"):
        dev.event().record(side).elapsed_s(t1)
    dev.close()


# -- the engine on the fake ------------------------------------------------------------------------
FAKE_CASES = {
    "gpt-tied": [],
    "llama": ["model.preset=llama-test"],
    "llama-tied-partly-resident-clip": ["model.preset=llama-test", "model.tie_embeddings=true",
                                        "offload.resident_mem=400KiB", "train.grad_clip=0.5"],
    "accum-clip-llama": ["model.preset=llama-test", "train.grad_clip=0.05", "train.grad_accum=2"],
    "state-and-weights-on-ssd": ["offload.resident_mem=0", "offload.cache_weights=false"],
    "speculate-redo": ["offload.resident_mem=0", "train.grad_clip=0.05", "offload.clip_schedule=speculate"],
    "defer": ["offload.resident_mem=0", "train.grad_clip=0.05", "offload.clip_schedule=defer"],
    # resident with spare copies: the gradient's copy into held_grad is the speculative job's event
    "spare-speculate-redo-4-blocks": ["model.n_layer=4", "train.grad_clip=0.05", "offload.clip_schedule=speculate"],
    "spare-never-clips": ["train.grad_clip=100"],
    "commit-none": ["offload.commit=none", "offload.resident_mem=300KiB", "offload.cache_weights=false"],
    "classes-ssd-checkpoint-cpu": ["offload.act_policy=fc2,proj=ssd;checkpoint=cpu"],
    "classes-cpu-checkpoint-ssd": ["offload.prefetch_depth=4", "offload.max_pending_updates=1",
                                   "offload.act_policy=fc2,proj=cpu;checkpoint=ssd"],
    "whole-ssd-clip": ["offload.act_policy=all=ssd", "train.grad_clip=0.05", "offload.resident_mem=0"],
    "whole-cpu": ["offload.act_policy=all=cpu"],
    "whole-gpu-llama": ["model.preset=llama-test", "offload.act_policy=all=gpu"],
    "cpu-tier-overflows": ["offload.act_policy=fc1,qkv=cpu", "offload.act_cpu_mem=8KiB"],
}


@pytest.mark.parametrize("case", FAKE_CASES)
def test_engine_on_the_fake_device_equals_reference(tmp_path, case):
    cfg = make_cfg(tmp_path, "train.device=fake", *FAKE_CASES[case])
    ref, eng, ref_stats, eng_stats = run_both(cfg)
    try:
        assert eng.dev.kind == "fake" and eng.dev.copies > 0
        if case.startswith("spare"):
            assert eng.plan.spare_stages == eng.plan.resident_stages == list(range(len(eng.states)))
        assert_same_training(ref, eng, ref_stats, eng_stats)
        assert eng.dev.sync_copies == 0  # every copy to or from the device is from pinned memory
        for item, peak in eng.dev.peak.items():  # (the ledger raised at once if not; this states it)
            assert peak <= eng.plan.device_items[item], item
        if "act_policy" in " ".join(FAKE_CASES[case]):
            assert any(k.startswith("activations") or k.startswith("kept") for k in eng.dev.peak)
    finally:
        eng.close()


def test_default_run_on_the_fake_device_finishes(tmp_path):
    """Every default (gpt-tiny, four blocks, exact clipping at 1.0) through the CLI on the fake device:
    the configuration that hung in the first wave, on the CUDA code paths."""
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    r = subprocess.run([sys.executable, "-m", "fuyou.cli", "train", "--offload", "ssd", "--ssd", str(ssd),
                        "--out", str(tmp_path / "runs"), "train.steps=3", "train.device=fake",
                        "offload.stall_timeout=60"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "done: 3 steps" in r.stderr


@pytest.mark.parametrize("where", ["data", "initial weights"])
def test_a_build_that_fails_lets_go_of_the_device_and_its_page_locked_memory(tmp_path, monkeypatch, where):
    """An engine whose build fails (the data refused; the initial weights failing once the pools and threads
    are up) stops its device's thread and unregisters its pinned memory: a long-lived process (a run retrying a
    name another run took, a notebook) kept one device thread per failed build."""
    from fuyou.data import load_data
    from fuyou.engine import engine as engine_mod
    from fuyou.errors import DataError

    made = []
    monkeypatch.setattr(engine_mod, "make_device", lambda *a: made.append(device.make_device(*a)) or made[-1])
    cfg = make_cfg(tmp_path, "train.device=fake", "model.n_layer=4")
    data = load_data(cfg.data)

    def refused():
        raise DataError("no such data")

    def failing(stage):
        raise OSError("the checkpoint went away")

    before = sum(t.name == "fuyou-fake-gpu" for t in threading.enumerate())
    for _ in range(3):
        with pytest.raises((DataError, OSError)):
            engine_mod.Engine(cfg, refused if where == "data" else data, "state",
                              init_values=failing if where != "data" else None)
        assert made[-1]._closed and not made[-1]._pinned
    for _ in range(100):  # (the timer sees the close within a quarter of its landing delay)
        if sum(t.name == "fuyou-fake-gpu" for t in threading.enumerate()) <= before:
            break
        threading.Event().wait(0.05)
    assert sum(t.name == "fuyou-fake-gpu" for t in threading.enumerate()) <= before


def test_compute_time_comes_from_events_and_the_trace_has_device_rows(tmp_path):
    cfg = make_cfg(tmp_path, "train.device=fake", "offload.cache_weights=false")
    ref, eng, _, _ = run_both(cfg, steps=2)  # step 1 is the traced one
    try:
        rows = {e["name"]: e for e in eng.tracer.events}
        h2d = [e for e in eng.tracer.events if e["cat"] == "h2d"]
        assert h2d and all(e["dur"] > 0 and e["args"]["bytes"] > 0 for e in h2d)
        st = eng.states[1]
        simulated = st.numel * 4 / device.FAKE_COPY_BW * 1e6  # the copy's time on the fake's clock (µs)
        assert simulated * 0.9 <= rows[f"h2d weights {st.stage.name}"]["dur"] <= simulated + 50_000  # + host gaps
        d2h = {e["name"]: e for e in eng.tracer.events if e["cat"] == "d2h"}  # each stage's gradient leaving
        for st in eng.states:
            row = d2h[f"d2h gradient {st.stage.name}"]
            assert row["args"]["bytes"] == st.numel * eng.gdtype.itemsize and row["dur"] > 0
        compute = [e for e in eng.tracer.events if e["cat"] == "compute"]
        assert len(compute) == 2 * (len(eng.states) - 1) + (1 if eng.tied else 0) or compute
        assert eng.counters.compute_s > 0
    finally:
        eng.close()


# -- the audit's defects, put back: a fake-device run catches each ----------------------------------
def _run_fake(tmp_path, *overrides, steps=2):
    cfg = make_cfg(tmp_path, "train.device=fake", *overrides)
    ref, eng, ref_stats, eng_stats = run_both(cfg, steps=steps)
    try:
        assert_same_training(ref, eng, ref_stats, eng_stats)
    finally:
        eng.failed = True  # the run may have raised mid-step: close without waiting
        eng.close()


def test_reverting_the_stream_allocation_of_read_back_activations_is_caught(tmp_path, monkeypatch):
    """Audit item 1: the reader thread allocates the activation it reads back outside the H2D stream."""
    real_on = FakeDevice.on

    def on(self, stream):
        if threading.current_thread().name.startswith("fuyou-act-read"):
            return contextlib.nullcontext()  # the old code: no stream context around the allocation
        return real_on(self, stream)

    monkeypatch.setattr(FakeDevice, "on", on)
    with pytest.raises(DeviceHazard, match="without waiting for compute"):
        _run_fake(tmp_path, "offload.act_policy=fc2,proj=ssd")


def test_reverting_record_stream_on_loaded_weights_is_caught(tmp_path, monkeypatch):
    real = FakeDevice.record_stream

    def record_stream(self, t, stream):
        if stream is not self.compute:
            real(self, t, stream)

    monkeypatch.setattr(FakeDevice, "record_stream", record_stream)
    with pytest.raises(DeviceHazard, match="without record_stream"):
        _run_fake(tmp_path)


def test_reverting_the_wait_on_a_copy_is_caught(tmp_path, monkeypatch):
    """Compute that reads weights without waiting on their H2D event reads poison: the weights differ."""
    from fuyou.engine.device import FakeStream

    real = FakeStream.wait_event

    def wait_event(self, ev):
        if self.name == "compute" and ev.stream.name.startswith("weights-h2d"):
            return
        real(self, ev)

    monkeypatch.setattr(FakeStream, "wait_event", wait_event)
    # poisoned weights: a NaN loss, or other weights; or the copies nobody waited for still hold their
    # destinations when the window's next load needs the memory
    with pytest.raises((NonFiniteError, AssertionError, DeviceBudgetError)):
        _run_fake(tmp_path, "offload.cache_weights=false")


def test_a_device_item_missing_from_the_plan_is_caught(tmp_path, monkeypatch):
    """Audit item 2: the device plan left out the gradients the D2H copies hold."""
    real = budget.plan_memory

    def plan_memory(*a, **kw):
        plan = real(*a, **kw)
        plan.device_items.pop("gradients leaving the device", None)
        return plan

    monkeypatch.setattr("fuyou.engine.engine.plan_memory", plan_memory)
    with pytest.raises(DeviceBudgetError, match="gradients leaving the device"):
        _run_fake(tmp_path)


def test_reverting_the_bound_on_gradients_leaving_the_device_is_caught(tmp_path, monkeypatch):
    """Without the main thread's bound, every stage's gradient stays on the device until its copy is
    waited on: more than the plan's two."""
    import time

    from fuyou.engine.engine import Engine
    from fuyou.optim.out_of_core import OutOfCoreAdamW

    real = OutOfCoreAdamW.update

    def slow_update(self, *a, **kw):  # the worker behind backward, as on a GPU that outruns the CPU Adam
        time.sleep(0.2)
        return real(self, *a, **kw)

    monkeypatch.setattr(OutOfCoreAdamW, "update", slow_update)
    monkeypatch.setattr(Engine, "_bound_leaving", lambda self, n: None)
    monkeypatch.setattr(device, "LAND_AFTER_S", 60.0)
    with pytest.raises(DeviceBudgetError, match="gradients leaving the device"):
        _run_fake(tmp_path, "offload.max_pending_updates=8", "offload.resident_mem=0")


def test_keeping_the_forward_weights_of_whole_kept_blocks_is_caught(tmp_path, monkeypatch):
    """Audit item 2: a block kept whole held its forward weights on the device until its backward."""
    from fuyou.engine import recompute

    monkeypatch.setattr(recompute, "release_forward_weights", lambda params: None)
    with pytest.raises(DeviceBudgetError, match="stage weights in window"):
        _run_fake(tmp_path, "model.preset=gpt-tiny", "data.seq_len=32", "offload.act_policy=all=gpu",
                  "offload.prefetch_depth=1")


def test_releasing_a_host_buffer_before_its_copy_ran_is_caught(tmp_path, monkeypatch):
    """The loader used to wait for each H2D copy before releasing its pool buffer; releasing it at once
    (without waiting) lets the next read overwrite it: the fake poisons it on release."""
    monkeypatch.setattr(FakeDevice, "after", lambda self, ev, fn: fn())
    with pytest.raises((NonFiniteError, AssertionError)):
        _run_fake(tmp_path, "offload.cache_weights=false")
