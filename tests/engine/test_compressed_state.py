"""Compressed optimizer state in the engine (issue 19): with every option the offloaded engine equals
the in-memory reference with the same option bit for bit (fp32 compute, >= 4 blocks): state on the SSD
and resident in CPU memory, exact clipping (speculation and redo), micro-batches, a tied head, the fake
CUDA device; the store holds the format's bytes; resume is bit-exact."""

import json

import pytest
import torch

from engine_testutil import assert_same_training, make_cfg, run_both

FOUR_BLOCKS = ["model.n_layer=4"]
OPTIONS = [("fp32", "int8"), ("fp32", "bf16"), ("bf16", "fp32"), ("bf16", "bf16"), ("bf16", "int8")]


@pytest.mark.parametrize("master,moments", OPTIONS, ids=[f"{a}-{b}" for a, b in OPTIONS])
@pytest.mark.parametrize("case", [
    ["offload.resident_mem=0", "train.grad_clip=0.05"],                    # state on SSD, clipping redoes
    ["model.preset=llama-test", "train.grad_accum=2", "train.grad_clip=none"],  # resident where it fits
    # resident with a spare copy (engine.py, Note: [Spare copies]): speculated and redone every step
    ["train.grad_clip=0.05", "offload.clip_schedule=speculate"],
], ids=["ssd-clip", "llama-accum-resident", "resident-spare-redo"])
def test_engine_equals_reference(tmp_path, master, moments, case):
    cfg = make_cfg(tmp_path, *FOUR_BLOCKS, *case, f"optim.master={master}", f"optim.moments={moments}",
                   "train.steps=4")
    ref, eng, ref_stats, eng_stats = run_both(cfg)
    try:
        if "offload.clip_schedule=speculate" in case:
            assert eng.plan.spare_stages == eng.plan.resident_stages == list(range(len(eng.states)))
        assert_same_training(ref, eng, ref_stats, eng_stats)
    finally:
        eng.close()


def test_on_the_fake_device(tmp_path):
    cfg = make_cfg(tmp_path, *FOUR_BLOCKS, "train.device=fake", "optim.master=bf16", "optim.moments=int8",
                   "offload.resident_mem=300KiB", "train.grad_clip=0.5", "offload.act_policy=fc2=cpu;checkpoint=ssd")
    ref, eng, ref_stats, eng_stats = run_both(cfg)
    try:
        assert_same_training(ref, eng, ref_stats, eng_stats)
    finally:
        eng.close()


def _state_traffic(tmp_path, master, moments):
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine

    d = tmp_path / f"{master}-{moments}"
    d.mkdir()
    cfg = make_cfg(d, *FOUR_BLOCKS, "offload.mode=ssd", "offload.resident_mem=0", "offload.commit_every=1000",
                   "train.grad_clip=none", f"optim.master={master}", f"optim.moments={moments}", "train.precision=bf16")
    eng = Engine(cfg, load_data(cfg.data), "state")
    try:
        total = {"r": 0, "w": 0}
        for step in range(3):
            eng.train_step(step)
            # The step's optimizer tail (its last stages' reads and writes) lands in this step's counters
            # after train_step returns: read them once it is done, or the count depends on timing (a
            # full-suite run once read 0.397 where the bytes are 0.34).
            eng.worker.wait_all()
            c = eng.counters.as_dict()
            total["r"] += c["ssd_read_bytes"] - c["act_ssd_read_bytes"]
            total["w"] += c["ssd_write_bytes"] - c["act_ssd_write_bytes"]
        return total, sum(s.numel for s in eng.states)
    finally:
        eng.close()


def test_state_bytes_per_step(tmp_path):
    """The engine's own counters: bf16 master with int8 moments moves at most 0.35x the fp32 state's
    bytes per step (weights cached in CPU memory, so the bytes are the state's). Under bf16 compute, whatever
    the host's default (train.precision=auto): the bf16 master is then the weights, the cache holds it and it
    is not read (engine.py, Note: [Master in memory]): 6 B a parameter against 24."""
    full, n = _state_traffic(tmp_path, "fp32", "fp32")
    small, _ = _state_traffic(tmp_path, "bf16", "int8")
    assert small["r"] + small["w"] <= 0.35 * (full["r"] + full["w"])
    assert full["r"] >= 2 * 12 * n  # the fp32 state really was read (two of the three steps at least)


def test_resume_is_bit_exact(tmp_path):
    """Stop after 2 steps, resume for 2 more: the same weights and moments as 4 uninterrupted steps
    (the stochastic rounding depends on seed, step and position only)."""
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine

    opts = [*FOUR_BLOCKS, "offload.mode=ssd", "optim.master=bf16", "optim.moments=int8", "offload.commit_every=1",
            "train.grad_clip=0.5", "offload.resident_mem=300KiB"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg_a = make_cfg(tmp_path / "a", *opts, "train.steps=4")
    data = load_data(cfg_a.data)
    eng = Engine(cfg_a, data, "state")
    try:
        for s in range(4):
            eng.train_step(s)
        want_w, want_o = eng.state(), eng.optimizer_state()
    finally:
        eng.close()
    cfg_b = make_cfg(tmp_path / "b", *opts, "train.steps=4")
    eng = Engine(cfg_b, data, "state")
    for s in range(2):
        eng.train_step(s)
    eng.commit(2)
    eng.close()
    eng = Engine(cfg_b, data, "state", resume=True)
    try:
        assert eng.ts.start_step == 2
        for s in range(2, 4):
            eng.train_step(s)
        got_w, got_o = eng.state(), eng.optimizer_state()
    finally:
        eng.close()
    for k in want_w:
        assert torch.equal(want_w[k], got_w[k]), k
        for which in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(want_o[k][which], got_o[k][which]), (k, which)


def test_compression_really_changes_the_numbers(tmp_path):
    """A guard on the tests above: the compressed options train differently from fp32 state (so the
    equality with the reference is the option's, not fp32's), and close to it: the weights' moves over three
    steps point the way fp32's do and are as long. (Close was |difference| < 0.05, some 17 times the most a
    weight moves in three steps at lr 1e-3: a wrong-signed update passed, a mutation audit.)"""
    from fuyou.data import load_data
    from fuyou.train.reference import ReferenceTrainer

    moves = {}
    for opt in ("fp32-fp32", "bf16-int8", "fp32-int8", "bf16-bf16"):
        master, moments = opt.split("-")
        cfg = make_cfg(tmp_path, *FOUR_BLOCKS, f"optim.master={master}", f"optim.moments={moments}")
        ref = ReferenceTrainer(cfg, load_data(cfg.data))
        start = {k: v.float().clone() for k, v in ref.state().items()}
        for s in range(3):
            ref.train_step(s)
        moves[opt] = torch.cat([(v.float() - start[k]).flatten() for k, v in ref.state().items()])
    a = moves["fp32-fp32"]
    for opt in ("bf16-int8", "fp32-int8", "bf16-bf16"):
        b = moves[opt]
        assert not torch.equal(a, b), opt
        cos = float(a @ b / (a.norm() * b.norm()))
        assert cos > 0.95 and 0.9 < float(b.norm() / a.norm()) < 1.1, (opt, cos, float(b.norm() / a.norm()))


@pytest.mark.parametrize("clip", ["none", "0.05"])
def test_bf16_master_is_the_compute_weights(tmp_path, clip):
    """bf16 compute with a bf16 master: stages whose weights are not cached read the current copy's
    master (no separate compute copy is stored or written); the run equals the one with every stage's
    weights cached in CPU memory bit for bit, with exact clipping's redo too."""
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine

    out = {}
    for cache in ("true", "false"):
        (tmp_path / cache).mkdir()
        cfg = make_cfg(tmp_path / cache, *FOUR_BLOCKS, "offload.mode=ssd", "train.precision=bf16", "optim.master=bf16",
                       "optim.moments=int8", f"offload.cache_weights={cache}", "offload.resident_mem=0",
                       f"train.grad_clip={clip}", "train.steps=4")
        eng = Engine(cfg, load_data(cfg.data), "state")
        try:
            losses = [eng.train_step(s).loss for s in range(4)]
            eng.worker.wait_all()
            if cache == "false":
                keys = set(eng.store.keys())
                assert not any(k.endswith("/weights") for k in keys), sorted(keys)[:8]
                assert all(st.keys.weights == st.keys.master for st in eng.states)
            out[cache] = (losses, eng.state())
        finally:
            eng.close()
    assert out["true"][0] == out["false"][0]
    for k in out["true"][1]:
        assert torch.equal(out["true"][1][k], out["false"][1][k]), k


@pytest.mark.parametrize("opts", [["optim.master=bf16", "optim.moments=int8", "train.precision=fp32"],
                                  ["optim.moments=int8"]])
def test_the_plan_reserves_what_an_update_holds(tmp_path, opts):
    """With the weight cache on, a stage it cannot hold still writes its compute weights through the
    optimizer's buffers: the plan reserves them (else a compressed update blocks on the pool)."""
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine
    from fuyou.optim.out_of_core import optimizer_buffer_bytes

    cfg = make_cfg(tmp_path, *FOUR_BLOCKS, "offload.mode=ssd", "offload.cache_weights=true", "train.grad_clip=0.5",
                   *opts)
    eng = Engine(cfg, load_data(cfg.data), "state")
    try:
        need = optimizer_buffer_bytes(eng.fmt, eng.chunk, cfg.offload.optimizer_depth, eng.ts.gdtype.itemsize,
                                      eng.cdtype.itemsize, max(s.numel for s in eng.states))
        assert eng.plan.cpu_items["optimizer buffers"] >= need
        eng.train_step(0)
    finally:
        eng.close()


def test_resume_with_fewer_copies_keeps_the_master_as_the_weights(tmp_path):
    """A clipped bf16-master run resumed without clipping keeps fewer state copies; copies rebuilt on
    resume still read the master as the compute weights (no separate copy appears)."""
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine

    base = [*FOUR_BLOCKS, "offload.mode=ssd", "train.precision=bf16", "optim.master=bf16", "optim.moments=int8",
            "offload.cache_weights=false", "offload.resident_mem=0", "offload.commit_every=1"]
    cfg = make_cfg(tmp_path, *base, "train.grad_clip=0.05")
    data = load_data(cfg.data)
    eng = Engine(cfg, data, "state")
    for s in range(3):
        eng.train_step(s)
    eng.commit(3)
    eng.close()
    eng = Engine(make_cfg(tmp_path, *base, "train.grad_clip=none"), data, "state", resume=True)
    try:
        assert all(st.keys.weights == st.keys.master for st in eng.states)
        eng.train_step(3)
        eng.worker.wait_all()
        assert not any(k.endswith("/weights") for k in eng.store.keys())
    finally:
        eng.close()


@pytest.mark.parametrize("master,moments", [("fp32", "fp32"), ("bf16", "int8")])
def test_every_commit_counts_in_the_ssd_written_figures(tmp_path, master, moments):
    """A commit's writes finish in the background; when they landed after the loop had read the step's
    counters they were lost (a new-user pass: 7 of 20 steps showed 0 bytes, the run's wear figure 0.6x
    the truth, different in two identical runs). Every stage resident, weights cached, no clipping:
    each step's commit writes exactly the state once, and the run's figures say so."""
    from fuyou.optim.compressed import StateFormat
    from fuyou.train.loop import run_training

    steps = 6
    cfg = make_cfg(tmp_path, *FOUR_BLOCKS, "offload.mode=ssd", f"optim.master={master}", f"optim.moments={moments}",
                   "offload.commit_every=1", "offload.cpu_mem=1GiB", f"train.steps={steps}", "train.log_every=1",
                   "train.eval_every=0", "run.save_weights=false", "run.name=wear")
    res = run_training(cfg)
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = next(x for x in lines if x.get("summary"))
    from fuyou.models import StageModel

    n = StageModel(cfg.model).num_params
    per_commit = StateFormat.of(cfg.optim).state_bytes(n)
    per_step = [x["ssd_write_bytes"] for x in lines if "ssd_write_bytes" in x and "summary" not in x]
    assert len(per_step) == steps
    # a step's record may hold the previous step's late commit, never lose it: the run's total is exact
    assert summary["ssd_write_per_step_bytes"] == pytest.approx(per_commit, rel=0.02), (per_step, per_commit)


@pytest.mark.parametrize("every", ["2", "10min"])
def test_the_final_commit_is_not_charged_to_a_short_runs_steps(tmp_path, every):
    """A 4-step run whose state is all held in CPU memory writes nothing in its steps and one commit at its
    end; the summary said that commit's bytes divided by 4 were written each step (9.5 MiB a step, 0.023 TB
    an hour for gpt-tiny) where a long run writes one commit every offload.commit_every. A step now costs
    its own writes plus a commit shared over the steps between commits, as the planner counts it, and the
    run's total is said apart."""
    from fuyou.models import StageModel
    from fuyou.optim.compressed import StateFormat
    from fuyou.train.loop import run_training

    steps = 4
    cfg = make_cfg(tmp_path, *FOUR_BLOCKS, "offload.mode=ssd", f"offload.commit_every={every}",
                   "offload.cpu_mem=1GiB", f"train.steps={steps}", "train.log_every=1", "train.eval_every=0",
                   "run.save_weights=false", "run.name=short", "train.grad_clip=none")
    res = run_training(cfg)
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    s = next(x for x in lines if x.get("summary"))
    state = StateFormat.of(cfg.optim).state_bytes(StageModel(cfg.model).num_params)
    assert s["ssd_step_write_bytes"] == 0 and s["ssd_commit_bytes"] == pytest.approx(state, rel=0.02)
    commits = steps // 2 if every == "2" else 1  # (every 2 steps: the final commit is step 4's own)
    assert s["ssd_written_bytes"] == pytest.approx(commits * state, rel=0.02)
    every_steps = s["steps_per_commit"]
    assert every_steps == 2 if every == "2" else every_steps > 100  # 10 minutes of steps of well under a second
    assert s["ssd_write_per_step_bytes"] == pytest.approx(state / every_steps, rel=0.02)
    step_s = sum(x["step_time_s"] for x in lines if "step_time_s" in x) / steps
    assert s["ssd_write_per_hour_bytes"] == pytest.approx(s["ssd_write_per_step_bytes"] * 3600 / step_s, rel=0.01)


@pytest.mark.parametrize("resident", ["0", "64MiB"])
def test_a_bf16_master_starts_from_the_weights_rounded_to_nearest(tmp_path, resident):
    """A mutation audit: the initial bf16 master rounded stochastically (as an update is) passed every test. The
    initial values are not an update: the engine's master, on the SSD or resident, and the reference's are the
    seeded fp32 weights rounded to nearest even."""
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine
    from fuyou.models import StageModel
    from fuyou.train.reference import ReferenceTrainer

    cfg = make_cfg(tmp_path, *FOUR_BLOCKS, "offload.mode=ssd", "optim.master=bf16", "optim.moments=int8",
                   f"offload.resident_mem={resident}", "offload.cache_weights=false")
    init = StageModel(cfg.model).init_params(cfg.train.seed)
    want = {k: v.to(torch.bfloat16).float() for k, v in init.items()}
    assert any(not torch.equal(want[k], v) for k, v in init.items())  # (rounding changes the weights)
    data = load_data(cfg.data)
    ref = ReferenceTrainer(cfg.model_copy(update={"offload": cfg.offload.model_copy(update={"mode": "none"})}), data)
    eng = Engine(cfg, data, "state")
    try:
        for got in (ref.state(), eng.state()):
            assert sorted(got) == sorted(want)
            differ = [k for k in want if not torch.equal(got[k].float(), want[k])]
            assert not differ, differ
    finally:
        eng.close()
