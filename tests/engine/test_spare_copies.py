"""Resident stages that speculate from a spare copy of their state under exact clipping (engine.py,
Note: [Spare copies]): the commit that races the next step's swap, kill-and-resume in their redo, the
memory plan's choice of stages and what the start line says. Their equivalence with the reference
trainer is in test_equivalence.py (the ``spare-*`` cases) and, per state format, test_compressed_state.py."""

from __future__ import annotations

import signal
import sys
import time

import pytest
import torch

from engine_testutil import make_cfg
from fuyou.data import load_data
from fuyou.engine.engine import Engine
from fuyou.train.reference import ReferenceTrainer
from test_resume import run, train_cmd


def _engines(cfg):
    data = load_data(cfg.data)
    ref = ReferenceTrainer(cfg.model_copy(update={"offload": cfg.offload.model_copy(update={"mode": "none"})}), data)
    ssd = cfg.model_copy(update={"offload": cfg.offload.model_copy(update={"mode": "ssd"})})
    return data, ref, ssd


@pytest.mark.timeout(120)
def test_a_commit_behind_the_next_steps_swap_writes_the_state_it_claimed(tmp_path):
    """The commit after step 2 is queued behind step 2's updates; the worker reaches it only after the
    main thread has swapped the stages' copies for step 3 (forced here by holding the flush until it
    has). It must write the state it claimed at step 2, not whichever copy ``resident`` names then."""
    cfg = make_cfg(tmp_path, "model.n_layer=4", "train.grad_clip=100", "offload.commit_every=2", "train.steps=3")
    data, ref, ssd_cfg = _engines(cfg)
    eng = Engine(ssd_cfg, data, "state")
    assert eng.plan.spare_stages == list(range(len(eng.states))) == eng.plan.resident_stages
    flush, raced = eng.ts.flush, []

    def late_flush(claimed, **kw):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and all(st.resident is held for st, _, held in claimed):
            time.sleep(0.001)
        raced.append(any(st.resident is not held for st, _, held in claimed))
        flush(claimed, **kw)

    eng.ts.flush = late_flush
    for step in range(2):
        ref.train_step(step)
        eng.train_step(step)
    want, want_opt = ref.state(), ref.optimizer_state()
    eng.train_step(2)
    eng.worker.wait_all()
    assert raced == [True]  # the step-2 commit's flush ran after step 3's swaps
    eng.failed = True  # as if killed after step 3: its state is not committed; the commit of step 2 is
    eng.close()
    resumed = Engine(ssd_cfg, data, "state", resume=True)
    try:
        assert resumed.ts.start_step == 2
        got, got_opt = resumed.state(), resumed.optimizer_state()
        for k in want:
            assert torch.equal(got[k], want[k]), k
            for which in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(got_opt[k][which], want_opt[k][which]), (k, which)
    finally:
        resumed.close()


@pytest.mark.parametrize("fault", ["redo@1", "optimizer@2", "commit@2"])
def test_killed_in_a_spare_update_or_redo_resumes_bit_exact(tmp_path, fault):
    """Every stage resident with a spare copy, clipping on every step, redone every step (``speculate``):
    SIGKILL in a redo, in a speculative update and in a commit; the resumed run ends bit-identical."""
    from safetensors.torch import load_file

    extra = ["model.n_layer=4", "train.grad_clip=1e-3", "offload.clip_schedule=speculate", "offload.commit_every=2"]
    ref = run(train_cmd(tmp_path, "ref", *extra))
    assert ref.returncode == 0, ref.stderr
    assert "the 6 resident stages with a spare copy in CPU memory are updated speculatively" in ref.stderr, ref.stderr
    killed = run(train_cmd(tmp_path, "k", *extra), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / "runs" / "k"
    resumed = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    got, want = load_file(str(run_dir / "model.safetensors")), load_file(str(tmp_path / "runs/ref/model.safetensors"))
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_the_start_line_names_the_stages_that_wait(tmp_path):
    """Without a spare copy the resident stages wait for the norm, and the line says so and why; with one,
    they speculate; a budget that gives spares to the last stages only says both; ``defer`` says that
    everything waits (and the plan gives it no spare copy it would not use)."""
    lines, spares = {}, {}
    for name, extra in {"off": ["offload.resident_spare=false"], "on": [],
                        "some": ["model.preset=llama-test", "model.n_layer=4", "offload.resident_mem=4200KiB"],
                        "one-waits": ["model.preset=llama-test", "model.n_layer=4", "offload.resident_mem=5700KiB"],
                        "defer": ["offload.clip_schedule=defer"]}.items():
        (tmp_path / name).mkdir()
        cfg = make_cfg(tmp_path / name, "train.grad_clip=1.0", *extra)
        data, _, ssd_cfg = _engines(cfg)
        eng = Engine(ssd_cfg, data, "state")
        try:
            lines[name] = next(l for l in eng.startup_lines() if l.startswith("exact clipping"))
            spares[name] = eng.plan.spare_stages
        finally:
            eng.close()
    assert "every stage's state is resident" in lines["off"] and "offload.resident_spare=false" in lines["off"]
    assert "resident stages with a spare copy" in lines["on"] and "without" not in lines["on"], lines["on"]
    assert spares["some"] == [4, 5] and "the 2 resident stages with a spare copy" in lines["some"], \
        (spares, lines["some"])
    assert ("the 4 resident stages without a spare copy (the budget, with resident state capped at "
            "offload.resident_mem=4.10 MiB, left no room for one) wait for") in lines["some"], lines["some"]
    assert len(spares["one-waits"]) == 5 and "the 1 resident stage without a spare copy" in lines["one-waits"], lines
    assert "waits for the norm" in lines["one-waits"], lines["one-waits"]
    assert spares["defer"] == [] and "every update waits for the gradient norm" in lines["defer"], lines["defer"]


def test_a_head_too_large_for_a_spare_leaves_the_room_to_the_blocks():
    """The last stage first, but one whose copy does not fit (an untied head over a large vocabulary) is
    passed over, not the end of the search: the blocks before it get the memory (a review found every
    stage waiting with room for a block's copy left)."""
    from fuyou.engine.budget import plan_memory
    from fuyou.engine.config import OffloadConfig

    M = 1 << 20
    numels = [10 * M, 2 * M, 2 * M, 2 * M, 2 * M, 10 * M]
    act = {"checkpoint": 0, "block_work": 0, "head_work": 0, "batch": 0}

    def plan(cpu_mib, **kw):
        off = OffloadConfig(cpu_mem=cpu_mib * M, cache_weights=False, **kw)
        return plan_memory(numels, off, chunk=M, io_buffer_bytes=0, act=act, csize=2, gsize=4, deferred=True,
                           micro_batches=1, tied=False, compute_on_cpu=False)

    for mib in (860, 900, 940):
        p = plan(mib)
        assert p.resident_stages == [0, 1, 2, 3, 4, 5], (mib, p.resident_stages)
        assert p.spare_stages and 5 not in p.spare_stages, (mib, p.spare_stages)
        assert p.spare_stages == sorted(p.spare_stages) and p.spare_stages[-1] == 4, (mib, p.spare_stages)
        assert p.cpu_required + p.cache_bytes + p.resident_bytes <= mib * M
    assert plan(940, clip_schedule="defer").spare_stages == []
    assert plan(940, resident_spare=False).spare_stages == []


def test_auto_schedule_switching_both_ways_stays_bit_exact(tmp_path):
    """``clip_schedule=auto`` over spare copies: speculate and redo on the first step that clips, defer
    (in place) while it keeps clipping, speculate again once it stops; 4 blocks, micro-batches and a
    commit every step, against the reference bit for bit."""
    from engine_testutil import assert_same_training

    cfg = make_cfg(tmp_path, "model.n_layer=4", "train.grad_clip=3.0", "train.steps=7", "train.grad_accum=2",
                   "offload.commit_every=1")
    data, ref, ssd_cfg = _engines(cfg)
    eng = Engine(ssd_cfg, data, "state")
    try:
        assert eng.plan.spare_stages == eng.plan.resident_stages == list(range(len(eng.states)))
        ref_stats, eng_stats, modes = [], [], []
        for step in range(cfg.train.steps):
            ref_stats.append(ref.train_step(step))
            eng_stats.append(eng.train_step(step))
            modes.append(("defer" if eng.counters.deferred else "speculate") + ("+clip" if eng.clipped else ""))
        assert "speculate+clip" in modes, modes
        first_defer = modes.index(next(m for m in modes if m.startswith("defer")))
        assert any(m.startswith("speculate") for m in modes[first_defer:]), modes  # and back
        assert_same_training(ref, eng, ref_stats, eng_stats)
    finally:
        eng.close()
