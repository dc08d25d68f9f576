"""Hand-computable cases of the simulation and monotonicity of the search."""

import pytest

from fuyou.engine.config import OffloadConfig
from fuyou.models import ModelConfig, preset
from fuyou.planner.cost import Workload, stage_costs, step_bytes
from fuyou.planner.hardware import HardwareProfile, with_more_ssds
from fuyou.policy import ActivationPolicy
from fuyou.planner.search import search
from fuyou.planner.simulate import _Graph, simulate, simulate_job

GiB = 1024**3


def graph(spec):
    g = _Graph()
    ids = {}
    for name, queue, dur, deps in spec:
        ids[name] = g.add(name, queue, queue, dur, [ids[d] for d in deps], 0, "s")
    g.run()
    return {t.name: (t.start, t.end) for t in g.tasks}


def test_one_resource_serialises():
    r = graph([("a", "ssd", 1.0, []), ("b", "ssd", 2.0, []), ("c", "ssd", 3.0, [])])
    assert max(e for _, e in r.values()) == pytest.approx(6.0)


def test_perfect_overlap_on_independent_resources():
    r = graph([("a", "compute", 2.0, []), ("b", "ssd", 2.0, []), ("c", "cpu-adam", 2.0, [])])
    assert max(e for _, e in r.values()) == pytest.approx(2.0)


def test_no_overlap_through_dependencies():
    r = graph([("a", "compute", 1.0, []), ("b", "ssd", 2.0, ["a"]), ("c", "compute", 3.0, ["b"])])
    assert r["c"] == pytest.approx((3.0, 6.0))


def test_pipeline_is_bound_by_its_slowest_stage():
    # 10 items through read (1 s) -> compute (2 s): 1 + 10 * 2
    spec = []
    for i in range(10):
        spec.append((f"r{i}", "ssd", 1.0, [f"r{i - 1}"] if i else []))
        spec.append((f"c{i}", "compute", 2.0, [f"r{i}"] + ([f"c{i - 1}"] if i else [])))
    assert max(e for _, e in graph(spec).values()) == pytest.approx(21.0)


def hw(**kw):
    base = dict(source="test", device="cuda", fwd_flops=1e14, bwd_flops=1e14, matmul_flops=1e14, gpu_mem=80 * GiB,
                h2d=25e9, d2h=25e9, ssd_read=6e9, ssd_write=3e9, ssd_capacity=10**14, cpu_adam=3e9)
    return HardwareProfile(**{**base, **kw})


def tiny_workload(**kw):
    return Workload(ModelConfig(**preset("gpt3-125m")), 4, 512, OffloadConfig(**kw))


def test_optimizer_bound_step_equals_ssd_time_of_the_state():
    """Compute and links nearly free, weights cached: one step = the SSD moving 12 B/param each way."""
    w = tiny_workload()
    h = hw(fwd_flops=1e20, bwd_flops=1e20, h2d=1e15, d2h=1e15, cpu_adam=1e15)
    costs = stage_costs(w)
    everything = set(range(len(costs)))
    r = simulate(w, costs, h, ActivationPolicy.recompute_all(w.model.n_layer), everything, steps=3)
    b = step_bytes(w, everything)
    expect = b["ssd_read"] / h.ssd_read + b["ssd_write"] / h.ssd_write
    assert r.queue_busy["ssd"] == pytest.approx(expect, rel=1e-9)
    assert r.step_time == pytest.approx(expect, rel=0.02)
    assert r.bottleneck == "ssd"


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("cached", ["none", "all"])
def test_the_closed_form_bytes_are_the_simulated_steps(tied, cached):
    """``step_bytes`` (the closed form the tests above judge the simulator by) and the simulator's own events
    count the same SSD bytes a step, nothing cached or everything: a tied head loads the embedding a third
    time (forward, head, backward). Dropping that load from the closed form passed every test while the
    embedding was cached (a mutation audit)."""
    w = Workload(ModelConfig(**{**preset("gpt3-125m"), "tie_embeddings": tied}), 4, 512, OffloadConfig(),
                 grad_clip=None)
    costs = stage_costs(w)
    keep = set(range(len(costs))) if cached == "all" else set()
    r = simulate(w, costs, hw(), ActivationPolicy.recompute_all(w.model.n_layer), keep, steps=3)
    b = step_bytes(w, keep)
    assert (r.step_read(), r.step_written()) == (b["ssd_read"], b["ssd_write"])
    if cached == "none":
        loads = [t for t in r.last_step_tasks() if t.resource == "ssd-read" and t.nbytes == w.weight_bytes[0]]
        assert len(loads) == (3 if tied else 2)


def test_compute_bound_step_equals_compute_time():
    w = tiny_workload()
    h = hw(fwd_flops=1e11, bwd_flops=1e11, ssd_read=1e15, ssd_write=1e15, h2d=1e15, d2h=1e15, cpu_adam=1e15)
    costs = stage_costs(w)
    pol = ActivationPolicy.recompute_all(w.model.n_layer)
    r = simulate(w, costs, h, pol, set(range(len(costs))), steps=3)
    flops = sum(c.fwd_flops for c in costs[:-1]) + sum(c.backward_flops(set()) for c in costs)
    assert r.busy["compute"] == pytest.approx(flops / 1e11, rel=1e-9)
    assert r.step_time == pytest.approx(flops / 1e11, rel=0.01)


def test_the_head_and_lora_blocks_run_at_their_own_rates():
    """A LoRA step on the CPU took 1.45x its prediction: its blocks (thin adapter matmuls, no weight
    gradients) and the head (the loss's softmax over the vocabulary) run at rates of their own, which the
    probe times; each compute task is charged at its own, and a profile without them uses bwd_flops."""
    from fuyou.models.lora import LoRAConfig

    fast = dict(ssd_read=1e15, ssd_write=1e15, h2d=1e15, d2h=1e15, cpu_adam=1e15)
    rates = dict(fwd_flops=1e11, bwd_flops=1e11, lora_fwd_flops=5e10, lora_bwd_flops=2.5e10, head_flops=4e10,
                 lora_head_flops=2e10)
    for lora in (None, LoRAConfig(rank=8, targets=["all-linear"])):
        w = Workload(ModelConfig(**preset("gpt3-125m")), 4, 512, OffloadConfig(), lora=lora)
        costs = stage_costs(w)
        pol = ActivationPolicy.recompute_all(w.model.n_layer)
        r = simulate(w, costs, hw(**fast, **rates), pol, set(range(len(costs))), steps=3)
        frozen = lora is not None
        f, b, h = ((5e10, 2.5e10, 2e10) if frozen else (1e11, 1e11, 4e10))
        blocks = [c for c in costs if c.kind == "block"]
        expect = (sum(c.fwd_flops for c in blocks) / f + sum(c.backward_flops(set(), frozen) for c in blocks) / b
                  + costs[-1].backward_flops(set(), frozen) / h)
        assert r.busy["compute"] == pytest.approx(expect, rel=1e-9)
        plain = simulate(w, costs, hw(**fast, fwd_flops=1e11, bwd_flops=1e11), pol, set(range(len(costs))), steps=3)
        assert plain.busy["compute"] == pytest.approx(
            (sum(c.fwd_flops for c in blocks) + sum(c.backward_flops(set(), frozen) for c in costs[1:])) / 1e11,
            rel=1e-9)
        if frozen:  # attention's and the adapters' backward stay 2x with a frozen base
            c = blocks[0]
            base = sum(c.class_flops.values())
            assert c.backward_flops(set(), True) == pytest.approx(c.fwd_flops + base + 2 * (c.fwd_flops - base))


def test_cpu_device_shares_cores_between_compute_and_adam():
    w = tiny_workload()
    costs = stage_costs(w)
    cached = set(range(len(costs)))
    pol = ActivationPolicy.recompute_all(w.model.n_layer)
    fast_io = dict(ssd_read=1e15, ssd_write=1e15)
    gpu = simulate(w, costs, hw(**fast_io, fwd_flops=1e11, bwd_flops=1e11, cpu_adam=1e7), pol, cached)
    cpu = simulate(w, costs, hw(**fast_io, fwd_flops=1e11, bwd_flops=1e11, cpu_adam=1e7, device="cpu"), pol, cached)
    compute = gpu.busy["compute"]
    adam = w.stage_model.num_params / 1e7
    assert cpu.step_time == pytest.approx(compute + adam, rel=0.02)  # one queue: the sum
    assert gpu.step_time < compute + 0.5 * adam                     # separate: they mostly overlap


def test_one_job_alone_by_hand():
    """One chunk: read 12 B/param, kernel, write 12 B/param, in sequence; the SSD parts at
    ``adam_io_efficiency`` of the rates, the kernel unaffected."""
    n = 1 << 20
    for eff in (1.0, 0.5):
        h = hw(adam_io_efficiency=eff)
        expect = 12 * n / h.ssd_read / eff + n / h.cpu_adam + 12 * n / h.ssd_write / eff
        assert simulate_job(n, h, chunk=n, depth=2) == pytest.approx(expect, rel=1e-12)


def test_job_pipeline_hides_the_kernel_behind_the_ssd():
    """Four chunks, a kernel shorter than a chunk's write: each kernel runs while the SSD moves
    another chunk, so the job is the SSD's time alone."""
    n, chunk = 4 << 20, 1 << 20
    h = hw(cpu_adam=1e10)
    ssd = 12 * n / h.ssd_read + 12 * n / h.ssd_write
    assert simulate_job(n, h, chunk=chunk, depth=2) == pytest.approx(ssd, rel=1e-9)
    slow = hw(cpu_adam=1e7)  # a kernel far longer than the I/O: the job is the kernels' time plus one read and write
    t = simulate_job(n, slow, chunk=chunk, depth=2)
    assert t == pytest.approx(n / slow.cpu_adam + 12 * chunk / slow.ssd_read + 12 * chunk / slow.ssd_write, rel=1e-9)


def test_a_less_efficient_optimizer_io_never_predicts_faster():
    w = tiny_workload(cache_weights=False)
    costs = stage_costs(w)
    pol = ActivationPolicy.recompute_all(w.model.n_layer)
    times = [simulate(w, costs, hw(adam_io_efficiency=e), pol, set(), steps=2).makespan for e in (1.2, 1.0, 0.8, 0.5)]
    assert times == sorted(times) and times[-1] > times[0]


def test_io_cpu_is_charged_by_bytes_not_by_the_efficiency():
    """On a CPU device each SSD transfer costs ssd_cpu_s_per_gb per GB moved, whatever its speed."""
    w = tiny_workload()
    costs = stage_costs(w)
    pol = ActivationPolicy.recompute_all(w.model.n_layer)
    busy = [simulate(w, costs, hw(device="cpu", ssd_cpu_s_per_gb=0.1, adam_io_efficiency=e), pol,
                     set(range(len(costs))), steps=2).busy["io-cpu"] for e in (1.0, 0.5)]
    b = step_bytes(w, set(range(len(costs))))
    assert busy[0] == pytest.approx(busy[1], rel=1e-9)
    assert busy[0] == pytest.approx((b["ssd_read"] + b["ssd_write"]) * 0.1 / 1e9, rel=1e-6)


@pytest.mark.parametrize("model,batch", [("gpt3-1.3b", 8), ("gpt3-6.7b", 4)])
def test_more_ssds_never_predict_slower(model, batch):
    w = Workload(ModelConfig(**preset(model)), batch, 1024)
    h = hw(ssd_read=3e9, ssd_write=1.5e9, gpu_mem=40 * GiB)
    times = [search(w, with_more_ssds(h, n), 64 * GiB, whatif=False).best.step_time for n in (1, 2, 4)]
    assert times[0] >= times[1] >= times[2]


def test_larger_cpu_budget_never_predicts_more_ssd_traffic():
    w = Workload(ModelConfig(**preset("gpt3-1.3b")), 8, 1024)
    h = hw(gpu_mem=24 * GiB)
    traffic = []
    for cpu in (4, 8, 16, 32, 64):
        best = search(w, h, cpu * GiB, whatif=False).best
        t = [x for x in best.sim.last_step_tasks() if x.queue == "ssd"]
        traffic.append(sum(x.dur for x in t))
    assert all(a >= b - 1e-9 for a, b in zip(traffic, traffic[1:]))


def test_the_search_finds_the_exhaustive_minimum_in_a_fraction_of_the_simulations():
    """The swap split is searched on a coarse grid of prefix lengths, then by ternary refinement around the
    grid's best (near-convex curve). Here the best prefix (83 of 96 candidates) lies between grid points, and
    the search must find the step time that trying every prefix at every depth and tier order finds (a
    mutation audit: the refinement stepping the wrong way lost 0.6 % and no test saw it)."""
    from fuyou.planner.search import SEARCH_STEPS, _assign, evaluate

    w = Workload(ModelConfig(**preset("gpt3-1.3b")), 16, 1024)
    h = hw(gpu_mem=24 * GiB, h2d=8e9, d2h=8e9)
    cpu = 32 * GiB
    plan = search(w, h, cpu, whatif=False, ladder=False)
    costs = stage_costs(w)
    found = evaluate(plan.workload, h, costs, plan.best.policy, cpu, SEARCH_STEPS).step_time
    K = 4 * w.model.n_layer
    every = {(d, tiers, k): evaluate(w, h, costs, _assign(w, h, costs, d, tiers, k, cpu), cpu, SEARCH_STEPS).step_time
             for d in w.depths for tiers in (("gpu", "cpu", "ssd"), ("gpu", "ssd")) for k in range(K + 1)}
    (_, _, k_best), least = min(every.items(), key=lambda kv: kv[1])
    assert k_best % (K // 8) != 0  # between the coarse grid's points: the refinement has to find it
    assert found == pytest.approx(least, rel=1e-12)
    assert plan.evaluations < len(every) / 4


@pytest.mark.parametrize("policy", ["recompute", "fc2,proj=gpu;0:all=gpu", "fc2=ssd;1:qkv=gpu", "all=gpu"])
def test_planner_memory_plan_is_the_engines(tmp_path, policy):
    """The planner's memory plan for a policy has the engine's items, byte for byte, so a plan the
    planner finds feasible is one the engine accepts (a block with every class kept is kept whole)."""
    from fuyou.config import load_config
    from fuyou.engine.engine import Engine
    from fuyou.policy import parse_act_policy
    from fuyou.planner.search import memory_plan

    (tmp_path / "ssd").mkdir()
    cfg = load_config(overrides=["model.preset=gpt-test", "data.seq_len=32", "train.micro_batch_size=2",
                                 "train.grad_clip=none", "offload.mode=ssd", f"offload.ssd_dirs=[\"{tmp_path / 'ssd'}\"]",
                                 "offload.cpu_mem=256MiB", f"offload.act_policy={policy}", "train.device=cpu",
                                 "data.source=synthetic"])
    eng = Engine(cfg, None, "state")
    try:
        w = Workload.from_config(cfg)
        hw = HardwareProfile(source="test", device="cpu", fwd_flops=1e11, bwd_flops=1e11, matmul_flops=1e11,
                             gpu_mem=64 * GiB, h2d=1e15, d2h=1e15, ssd_read=1e9, ssd_write=1e9,
                             ssd_capacity=1 << 40, cpu_adam=1e9)
        pol = parse_act_policy(policy, cfg.model.n_layer, prefetch_depth=cfg.offload.prefetch_depth)
        plan, _ = memory_plan(w, hw, stage_costs(w), pol, cfg.offload.cpu_mem)
        assert plan.cpu_items == eng.plan.cpu_items
        assert plan.cached_stages == eng.plan.cached_stages and plan.resident_stages == eng.plan.resident_stages
    finally:
        eng.close()


@pytest.mark.parametrize("name", ["gpt3-125m", "llama3-8b", "qwen3-0.6b", "qwen3-32b"])
def test_block_matmul_flops_and_widths_follow_the_weights(name):
    """2 FLOPs per token per matmul weight, whatever the head width (Qwen3's queries are wider than
    d_model in 0.6B and 32B), and attention's 4·T FLOPs per token per query feature; the qkv class
    holds the query and key/value outputs."""
    from fuyou.engine.budget import class_widths

    w = Workload(ModelConfig(**preset(name)), 2, 256, OffloadConfig())
    block, cost = w.stage_model.stages[1], stage_costs(w)[1]
    N, cfg = 2 * 256, w.model
    assert sum(cost.class_flops.values()) == 2.0 * N * block.matmul_params
    assert cost.fwd_flops - sum(cost.class_flops.values()) == 4.0 * N * 256 * cfg.q_width
    assert class_widths(cfg)["qkv"] == (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim


def test_the_plan_fits_where_train_s_default_policy_fits():
    """A new-user pass: with a CPU profile the plan refused budgets that fuyou train ran in, because every
    policy it tried put the checkpoints that did not fit beside an SSD swap's staging buffers; train's
    default keeps them on the compute device and needs no staging."""
    from fuyou.planner.search import memory_plan

    h = hw(device="cpu", fwd_flops=1e11, bwd_flops=1e11, matmul_flops=1e11, ssd_cpu_s_per_gb=0.1)
    w = Workload(ModelConfig(**{**preset("llama-test"), "n_layer": 4, "d_model": 256, "n_head": 4, "n_kv_head": 2,
                                "d_ff": 512, "vocab_size": 2000}), 4, 256, OffloadConfig())
    costs = stage_costs(w)
    need = {c: memory_plan(w, h, costs, ActivationPolicy.recompute_all(4, checkpoint=c, prefetch_depth=1),
                           1 << 40)[0].cpu_minimum for c in ("gpu", "ssd")}
    assert need["gpu"] < need["ssd"], need  # the case: train's default is the leaner
    budget = (need["gpu"] + need["ssd"]) // 2
    plan = search(w, h, budget, whatif=False, ladder=False)
    assert plan.feasible and plan.best.memory.cpu_required <= budget
