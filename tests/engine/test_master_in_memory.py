"""An update takes a master that is the compute weights from memory (engine.py, Note: [Master in memory]).

The weight cache holds a cached stage's master; backward's buffer holds a streamed stage's, handed to its
update. Each case: the same weights as the in-memory reference bit for bit (fp32 compute), the SSD bytes a
step to the byte (the master read by no update that has it), the plan's choice of hand-off slots, and the
hand-off's buffers back in the pool whatever happens to the step.
"""

from __future__ import annotations

import pytest
import torch

from engine_testutil import assert_same_training, make_cfg, run_both
from fuyou.data import load_data
from fuyou.engine import budget
from fuyou.engine.engine import Engine
from fuyou.engine.layout import dtype_size

FOUR_BLOCKS = ("model.n_layer=4", "model.d_model=64", "model.n_head=4")


def _expected_reads(eng: Engine, handed: bool) -> int:
    """SSD bytes a step reads for weights and optimizer state, computed from the plan: each stage not cached
    loaded in forward and backward (the head once, a tied embedding three times), each stage not resident
    its state, less its master where the update has it in memory (cached, or ``handed`` over)."""
    total, S = 0, len(eng.states)
    for st in eng.states:
        uses = 1 if st.index == S - 1 else 3 if st.index == 0 and eng.tied else 2
        if st.cache is None:
            total += uses * st.numel * dtype_size(eng.cdtype)
        if st.resident is None:
            total += eng.fmt.state_bytes(st.numel)
            if st.cache is not None or handed:
                total -= st.numel * eng.fmt.master_dtype.itemsize
    return total


def _step(eng: Engine, step: int):
    """One step and the SSD bytes it read for weights and optimizer state."""
    stats = eng.train_step(step)
    eng.worker.wait_all()  # the step's last updates land in its counters
    c = eng.counters.as_dict()
    return stats, c["ssd_read_bytes"] - c["act_ssd_read_bytes"]


CASES = {
    # (overrides, hand-off expected): fp32 compute, where an fp32 master is the weights
    "streamed-exact": (["offload.cache_weights=false", "offload.resident_mem=0"], True),
    "streamed-fp32-master-int8-moments": (["offload.cache_weights=false", "offload.resident_mem=0",
                                           "optim.moments=int8"], True),
    # twelve blocks, one stage cached: the hand-off's four stage buffers cost less than the masters they save
    "cached-and-streamed": (["model.n_layer=12", "offload.cpu_mem=129000KiB", "offload.resident_mem=0"], True),
    # where the four buffers would hold most of the model, the cache is worth more: no hand-off
    "cache-wins": (["offload.cpu_mem=128300KiB", "offload.resident_mem=0"], False),
    "llama-tied-grad-accum": (["model.preset=llama-test", "model.tie_embeddings=true", "train.grad_accum=2",
                               "offload.cache_weights=false", "offload.resident_mem=0"], True),
    "partly-resident": (["offload.cache_weights=false", "offload.resident_mem=300KiB"], True),
}


@pytest.mark.parametrize("case", CASES)
def test_updates_read_no_master_they_hold_and_train_the_same(tmp_path, case):
    """Clipping that never triggers (every update speculates, overlapped), four blocks: each step reads exactly
    the bytes the plan says, no master that is in memory, and the weights and moments equal the reference's."""
    overrides, handed = CASES[case]
    cfg = make_cfg(tmp_path, *FOUR_BLOCKS, "train.grad_clip=100", *overrides)
    data = load_data(cfg.data)
    from fuyou.train.reference import ReferenceTrainer

    ref = ReferenceTrainer(cfg.model_copy(update={"offload": cfg.offload.model_copy(update={"mode": "none"})}), data)
    eng = Engine(cfg, data, "state")
    try:
        assert (eng.plan.handoff > 0) == handed
        if case in ("cached-and-streamed", "cache-wins"):
            assert 0 < len(eng.plan.cached_stages) < len(eng.states)
        ref_stats, eng_stats = [], []
        for step in range(3):
            ref_stats.append(ref.train_step(step))
            stats, reads = _step(eng, step)
            eng_stats.append(stats)
            assert reads == _expected_reads(eng, handed), step
        assert eng.weight_pool.in_use == 0  # every handed buffer went back
        assert_same_training(ref, eng, ref_stats, eng_stats)
    finally:
        eng.close()


@pytest.mark.parametrize("schedule", ["auto", "speculate"])
def test_clipped_steps_redo_and_defer_from_the_store_and_train_the_same(tmp_path, schedule):
    """Clipping that triggers: a redo reads the master of its source copy from the store (the cache holds the
    speculative update, backward's copy is gone) and deferred updates read it there too (auto: the steps after
    one that clipped), cached and streamed stages alike; bit-identical to the reference."""
    cfg = make_cfg(tmp_path, *FOUR_BLOCKS, "train.grad_clip=0.05", f"offload.clip_schedule={schedule}",
                   "model.n_layer=12", "offload.cpu_mem=129000KiB", "offload.resident_mem=0", "train.steps=4")
    ref, eng, ref_stats, eng_stats = run_both(cfg)
    try:
        assert eng.plan.handoff > 0 and 0 < len(eng.plan.cached_stages) < len(eng.states)
        assert eng.clipped
        assert_same_training(ref, eng, ref_stats, eng_stats)
        eng.worker.wait_all()
        assert eng.weight_pool.in_use == 0
    finally:
        eng.close()


def test_bf16_master_from_memory_trains_the_bits_the_store_would(tmp_path, monkeypatch):
    """bf16 compute with a bf16 master and int8 moments (issue 19's configuration), weights cached in part:
    the same bits as the same run whose updates read every master from the store."""
    opts = [*FOUR_BLOCKS, "train.precision=bf16", "optim.master=bf16", "optim.moments=int8", "train.grad_clip=1.0",
            "model.n_layer=12", "offload.cpu_mem=117500KiB", "offload.resident_mem=0", "offload.mode=ssd",
            "train.steps=3"]

    def train(d):
        d.mkdir()
        cfg = make_cfg(d, *opts)
        eng = Engine(cfg, load_data(cfg.data), "state")
        try:
            reads = [_step(eng, s)[1] for s in range(3)]
            return eng.state(), eng.optimizer_state(), reads, eng
        finally:
            eng.close()

    w, o, reads, eng = train(tmp_path / "a")
    assert eng.plan.handoff > 0 and eng.plan.cached_stages
    monkeypatch.setattr(Engine, "_master_in", lambda self, st: self._handed.pop(st.index, None) and {} or {})
    monkeypatch.setattr("fuyou.engine.engine.handoff_slots", lambda *a: 0)
    w2, o2, reads2, eng2 = train(tmp_path / "b")
    assert eng2.plan.handoff == 0
    assert all(torch.equal(w[k], w2[k]) for k in w)
    assert all(torch.equal(o[k][m], o2[k][m]) for k in o for m in o[k])


def test_a_failed_update_gives_every_handed_buffer_back(tmp_path, monkeypatch):
    """An update that fails mid-step: the step raises, later jobs are skipped, and the weights backward
    handed to them go back to the pool (a leak would shrink it for good)."""
    from fuyou.optim.out_of_core import OutOfCoreAdamW

    cfg = make_cfg(tmp_path, *FOUR_BLOCKS, "offload.cache_weights=false", "offload.resident_mem=0",
                   "offload.mode=ssd", "train.grad_clip=100")
    eng = Engine(cfg, load_data(cfg.data), "state")
    real, calls = OutOfCoreAdamW.update, []

    def failing(self, *a, **kw):
        calls.append(kw.get("master_in") is not None)
        if len(calls) == 3:
            raise OSError(5, "injected: an I/O error in the third update")
        return real(self, *a, **kw)

    monkeypatch.setattr(OutOfCoreAdamW, "update", failing)
    try:
        assert eng.plan.handoff > 0
        with pytest.raises(Exception, match="injected"):
            eng.train_step(0)
            eng.worker.wait_all()
        with pytest.raises(Exception):
            eng.worker.wait_all()
        assert calls[:3] == [True, True, True]  # they had the master from backward
        assert eng.weight_pool.in_use == 0
    finally:
        eng.close()


def test_the_plan_keeps_slots_where_they_pay_and_never_raises_the_least_budget():
    """``plan_memory`` with hand-off slots: chosen when the weights stream (what the slots save, a master a
    stage, is more than the cache they displace); not when the budget caches all but a stage or two (two reads
    a stage cached beat one); and the least budget that fits is what it was without them."""
    from fuyou.engine.config import OffloadConfig
    from fuyou.optim.compressed import StateFormat

    M = 1 << 20
    numels = [4 * M] + [2 * M] * 16 + [4 * M]
    act = {"checkpoint": 0, "block_work": 0, "head_work": 0, "batch": 0}
    slots = budget.handoff_slots(OffloadConfig(), True, False)
    assert slots == 4 and budget.handoff_slots(OffloadConfig(clip_schedule="defer"), True, False) == 0
    assert budget.handoff_slots(OffloadConfig(), False, False) == 0
    assert budget.handoff_slots(OffloadConfig(handoff_weights=False), True, False) == 0
    assert budget.handoff_slots(OffloadConfig(), True, True) == 5  # data parallel: one waits for its sum

    def plan(cpu_mib, handoff=slots, owned=None):
        off = OffloadConfig(cpu_mem=cpu_mib * M, resident_mem=0)
        return budget.plan_memory(numels, off, chunk=M, io_buffer_bytes=0, act=act, csize=2, gsize=2,
                                  deferred=True, micro_batches=1, tied=False, compute_on_cpu=False,
                                  fmt=StateFormat("bf16", "int8"), handoff=handoff, owned=owned)

    streamed, without = plan(192), plan(192, handoff=0)
    assert streamed.handoff == slots and streamed.cpu_required <= 192 * M
    assert len(streamed.cached_stages) < len(without.cached_stages) <= len(numels) - 2 * slots - 1
    # the window (depth 2 + 1 of the largest stage not cached: the 8 MiB head), and the four stages handed over
    # that follow one another in backward at their largest: the head and three blocks
    assert streamed.cpu_items["weight buffers"] == 3 * 8 * M + (8 + 3 * 4) * M
    assert plan(216).handoff == 0 and len(plan(216).cached_stages) >= len(numels) - 2 * slots  # the cache wins
    assert plan(176).handoff == 0 and plan(176).cached_stages  # no room for them
    # data parallel: each rank counts its own stages' state, so ranks of equal budgets could choose apart (and
    # the ranks' one weight cache needs one plan): none (a review)
    assert plan(192, owned=set(range(9))).handoff == 0
    assert plan(100, handoff=0).cpu_minimum == plan(100).cpu_minimum
    least = plan(100).cpu_minimum
    assert plan(least // M + 1).handoff == 0


def test_on_the_fake_device_streamed_masters_are_handed_over(tmp_path):
    """The CUDA path (fake device): backward's host buffer, whose copy to the device the worker waits for before
    it updates the buffer in place, then given back to the pool. (The fake lands a copy when compute waits for
    it and computes at once, so an update that did not wait would pass here: a real GPU's check,
    tools/gpu_check.sh.)"""
    cfg = make_cfg(tmp_path, *FOUR_BLOCKS, "train.device=fake", "offload.cache_weights=false",
                   "offload.resident_mem=0", "train.grad_clip=100")
    ref, eng, ref_stats, eng_stats = run_both(cfg)
    try:
        assert eng.plan.handoff > 0 and eng.dev.sync_copies == 0
        assert_same_training(ref, eng, ref_stats, eng_stats)
        eng.worker.wait_all()
        assert eng.weight_pool.in_use == 0
    finally:
        eng.close()


def test_a_buffer_kept_for_an_update_is_of_its_own_size():
    """The pool may lend a cached block up to twice a request's size, counted at its own size: the hand-off's
    buffers (``exact``) are not, or the plan's sum of the stages' sizes would not hold them (a review: three
    8 MiB blocks in 9 MiB buffers left the embedding's load waiting for an update)."""
    from fuyou.store import PinnedPool

    M = 1 << 20
    pool = PinnedPool(32 * M)
    pool.acquire(9 * M).release()  # a 9 MiB block cached
    loose = pool.acquire(8 * M)
    assert pool.in_use == 9 * M  # the cached 9 MiB block, counted as such
    loose.release()
    kept = pool.acquire(8 * M, exact=True)
    assert pool.in_use == 8 * M
    kept.release()
    pool.close()
