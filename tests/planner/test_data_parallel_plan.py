"""``fuyou plan --gpus N``: the planner's model of data parallelism (fuyou/distributed.py).

Hand-countable traffic of the simulated step, the engine's rules (micro-batches divide among the
ranks, each stage's optimizer state on its owner, the CPU budget shared), and the command line."""

import dataclasses
import json

import pytest

from fuyou.cli import main
from fuyou.distributed import stage_owners
from fuyou.engine.budget import plan_memory
from fuyou.engine.config import OffloadConfig
from fuyou.models import ModelConfig, preset
from fuyou.planner.cost import Workload, stage_costs
from fuyou.planner.hardware import HardwareProfile
from fuyou.planner.search import memory_plan, search
from fuyou.planner.simulate import simulate
from fuyou.policy import ActivationPolicy

GiB = 1024**3


def hw(**kw):
    base = dict(source="test", device="cuda", fwd_flops=1e14, bwd_flops=1e14, matmul_flops=1e14, gpu_mem=80 * GiB,
                h2d=25e9, d2h=25e9, ssd_read=6e9, ssd_write=3e9, ssd_capacity=10**14, cpu_adam=3e9)
    return HardwareProfile(**{**base, **kw})


def workload(ranks=1, accum=4, **kw):
    model = ModelConfig(**{**preset("gpt3-125m"), "n_layer": 4})
    return Workload(model, 4, 512, OffloadConfig(**kw.pop("offload", {})), grad_accum=accum, ranks=ranks, **kw)


def step(w, h, cached=(), resident=(), steps=3):
    pol = ActivationPolicy.recompute_all(w.model.n_layer, checkpoint="gpu", prefetch_depth=2)
    return simulate(w, stage_costs(w), h, pol, set(cached), steps=steps, resident=set(resident))


def test_two_ranks_share_the_micro_batches_and_own_disjoint_stages():
    w = workload(ranks=2)
    assert w.micro == 2 and w.tokens == workload(ranks=1).tokens
    assert sorted(set(w.owners)) == [0, 1] and w.owners == stage_owners(w.numels, 2)
    with pytest.raises(ValueError, match="do not divide"):
        workload(ranks=3)
    assert not workload(ranks=2, lora=None).lora_params  # full fine-tuning shards; LoRA replicates (below)


def test_stage_owners_balance_the_ranks_parameters():
    """Largest stages first, each to the least-loaded rank (the comparison above is the function with itself;
    smallest-first passed it: a mutation audit)."""
    assert stage_owners([10, 1, 1, 8], 2) == [0, 1, 1, 1]  # loads 10 and 10 (smallest first: 9 and 11)
    numels = [50_000, 3_000, 3_000, 3_000, 3_000, 3_000, 3_000, 3_000, 3_000, 40_000]  # embedding, blocks, head
    for world in (2, 3, 4):
        owners = stage_owners(numels, world)
        loads = [sum(n for n, r in zip(numels, owners) if r == rank) for rank in range(world)]
        assert sorted(set(owners)) == list(range(world)) and max(loads) - min(loads) <= max(numels), (world, loads)


def test_ssd_traffic_of_a_sharded_step_counts_every_ranks_weights_and_the_state_once():
    """No cache, no resident state, no clipping: each rank reads every stage's weights (forward and
    backward; the head once; the embedding a third time for a tied head); each stage's state is read
    and written once, by its owner, who writes its new compute weights, which the exchange reads back
    and each other rank writes into its store."""
    w = workload(ranks=2, grad_clip=None)
    sim = step(w, hw())
    last = sim.last_step_tasks()
    reads = sum(t.nbytes for t in last if t.resource == "ssd-read")
    writes = sum(t.nbytes for t in last if t.resource == "ssd-write")
    S, c = len(w.numels), w.csize
    uses = [2] * (S - 1) + [1]
    uses[0] += 1 if w.tied else 0
    state = sum(w.fmt.state_bytes(n) for n in w.numels)
    weights = sum(c * n for n in w.numels)
    assert reads == pytest.approx(2 * sum(u * c * n for u, n in zip(uses, w.numels)) + state + weights)
    assert writes == pytest.approx(state + weights + weights)  # the owners' copies, then the other rank's
    one = step(workload(ranks=1, grad_clip=None), hw()).last_step_tasks()
    assert sum(t.nbytes for t in one if t.resource == "ssd-write") == pytest.approx(state + weights)


def test_gradient_sums_use_nvlink_or_each_gpus_pcie_link_and_the_exchange_gloo():
    w = workload(ranks=2, grad_clip=None)
    nv = step(w, hw(gpu_link=360e9)).last_step_tasks()
    sums = [t for t in nv if t.resource == "reduce"]
    # every stage's gradient is summed, (N-1)/N of it over each link; a tied head's embedding gradient too
    assert w.tied
    grads = (sum(w.numels) + w.numels[0]) * w.gsize
    assert {t.queue for t in sums} == {"link"}
    assert sum(t.dur for t in sums) == pytest.approx(grads / 2 / 360e9)
    pcie = step(w, hw()).last_step_tasks()
    assert {t.queue for t in pcie if t.resource == "reduce" and t.dur} == {"d2h", "d2h1", "h2d", "h2d1"}
    ex = [t for t in nv if t.resource == "exchange" and t.queue != "marker"]
    assert {t.queue for t in ex} == {"gloo"}
    assert sum(t.dur for t in ex) == pytest.approx(sum(w.numels) * w.csize / hw().gloo_broadcast)  # to N-1 = 1


def test_compute_bound_step_halves_on_two_gpus_and_the_shared_cache_needs_no_exchange():
    """The same global batch: each GPU runs half the micro-batches. With the weights cached (one cache
    the ranks map: the exchange is a token) the step is about half, whatever gloo's speed; streamed
    from the SSD, each stage's weights go through gloo, and a slow gloo can undo the gain."""
    kw = dict(grad_clip=None)
    slow_gpu = dict(fwd_flops=2e12, bwd_flops=2e12, matmul_flops=2e12)
    cached = range(6)
    one = step(workload(ranks=1, accum=8, **kw), hw(**slow_gpu), cached, cached).step_time
    fast = hw(**slow_gpu, gpu_link=360e9, gloo_broadcast=50e9)
    two = step(workload(ranks=2, accum=8, **kw), fast, cached, cached).step_time
    assert 0.45 < two / one < 0.65
    assert step(workload(ranks=2, accum=8, **kw), fast.model_copy(update={"gloo_broadcast": 0.05e9}), cached,
                cached).step_time == pytest.approx(two)
    one_ssd = step(workload(ranks=1, accum=8, **kw), hw(**slow_gpu)).step_time
    slower = [step(workload(ranks=2, accum=8, **kw), fast.model_copy(update={"gloo_broadcast": b})).step_time
              for b in (50e9, 5e9, 0.05e9)]
    assert slower == sorted(slower) and slower[0] < one_ssd < slower[-1]  # never faster with a slower exchange


def test_cpu_device_ranks_share_the_cores():
    cpu = hw(device="cpu", fwd_flops=5e10, bwd_flops=5e10, matmul_flops=5e10)
    one = step(workload(ranks=1, grad_clip=None), cpu, range(6)).step_time
    two = step(workload(ranks=2, grad_clip=None), cpu, range(6)).step_time
    assert two >= one  # the same work on the same cores, plus the sums and the exchange


def test_each_rank_plans_its_share_of_memory_and_only_its_own_stages_resident():
    w = workload(ranks=2)
    pol = ActivationPolicy.recompute_all(w.model.n_layer, checkpoint="gpu", prefetch_depth=2)
    plan, _ = memory_plan(w, hw(), stage_costs(w), pol, 8 * GiB)
    assert plan.resident_all == list(range(len(w.numels)))  # every stage resident on its owner
    assert len({w.owners[i] for i in plan.resident_stages}) == 1  # the plan shown is one rank's: its own stages
    assert not set(plan.resident_stages) & set(plan.resident_elsewhere)
    assert "weight exchange buffer" in plan.cpu_items
    # one weight cache for the machine: each rank is charged half of every cached stage
    assert plan.cache_share == 2 and plan.cached_stages == list(range(len(w.numels)))
    whole = sum(-(-n * w.csize // 4096) * 4096 for n in w.numels)
    assert abs(plan.cache_bytes - whole / 2) <= len(w.numels)
    # the engine's rule: a rank never plans residency for another rank's stage
    off = OffloadConfig(cpu_mem=8 * GiB)
    mine = {i for i, o in enumerate(w.owners) if o == 1}
    p1 = plan_memory(w.numels, off, chunk=w.chunk, io_buffer_bytes=1 << 20,
                     act={"checkpoint": 1, "block_work": 1, "head_work": 1, "batch": 1}, csize=2, gsize=4,
                     deferred=True, micro_batches=2, tied=w.tied, compute_on_cpu=False, owned=mine)
    assert p1.resident_stages and set(p1.resident_stages) <= mine


def test_lora_under_data_parallel_is_replicated():
    from fuyou.models.lora import LoRAConfig

    w = workload(ranks=2, lora=LoRAConfig(rank=8, targets=["qkv"]))
    assert not w.sharded and w.owners == [0] * len(w.numels)
    sim = step(w, hw())
    assert not [t for t in sim.tasks if t.resource in ("exchange", "cpu-adam")]


def test_search_finds_a_plan_and_a_lower_per_rank_budget_caches_less():
    w1, w2 = workload(ranks=1), workload(ranks=2)
    p1 = search(w1, hw(), 4 * GiB, whatif=False, ladder=False)
    p2 = search(w2, hw(), 2 * GiB, whatif=False, ladder=False)
    assert p1.feasible and p2.feasible
    assert len(p2.best.memory.cached_stages) <= len(p1.best.memory.cached_stages)


def test_plan_gpus_on_the_command_line(capsys):
    args = ["plan", "--model", "gpt3-1.3b", "--gpu", "rtx4090", "--ssd", "990-pro", "--cpu-mem", "64GiB",
            "--batch", "4", "--seq", "1024"]
    assert main(args + ["--gpus", "2"]) == 0
    out = capsys.readouterr().out
    for needle in ("x 2 micro-batches on 2 GPUs", "planned for each of 2 ranks", "data parallel       2 GPUs, 1 "
                   "micro-batch(es) each", "gradient sums", "weight exchange", "through host memory over PCIe",
                   "twice the bandwidth between ranks", "grad sum", "@r1"):
        assert needle in out, needle
    assert main(args + ["--gpus", "2", "--json", "--grad-accum", "4"]) == 0
    s = json.loads(capsys.readouterr().out)
    dp = s["data_parallel"]
    assert dp["gpus"] == 2 and dp["micro_batches_per_gpu"] == 2 and sum(dp["stages_per_rank"]) == 26
    assert s["cpu_budget_bytes"] < 32 * GiB  # each rank plans with its half of the machine's 64 GiB
    assert main(["plan", "--model", "gpt3-1.3b", "--gpu", "h100", "--ssd", "990-pro", "--cpu-mem", "64GiB",
                 "--batch", "4", "--gpus", "4"]) == 0
    assert "over NVLink" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--batch", "4", "--gpus", "2", "--grad-accum", "3"], "does not divide among --gpus 2"),
    (["--gpus", "0"], "at least 1"),
    (["--gpus", "2", "--global-batch", "5"], "divides among --gpus 2"),
    (["--gpus", "3", "--global-batch", "4-5"], "divides among --gpus 3"),
    (["--gpus", "64"], "use at most 26 GPUs"),
])
def test_plan_gpus_refuses_what_train_would_refuse(extra, message, capsys):
    rc = main(["plan", "--model", "gpt3-1.3b", "--gpu", "rtx4090", "--ssd", "990-pro", "--cpu-mem", "64GiB", *extra])
    assert rc != 0
    assert message in capsys.readouterr().err


def test_global_batch_splits_into_micro_batches_each_gpu_can_share(capsys):
    assert main(["plan", "--model", "gpt3-1.3b", "--gpu", "rtx4090", "--ssd", "990-pro", "--cpu-mem", "64GiB",
                 "--global-batch", "8", "--gpus", "2", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert all(d["micro_batches"] % 2 == 0 for d in s["split"]["tried"])
    assert s["grad_accum"] % 2 == 0


def test_data_parallel_workload_is_a_dataclass_field():
    assert "ranks" in {f.name for f in dataclasses.fields(Workload)}


def test_a_run_directory_is_planned_on_the_processes_that_trained_it(tmp_path, capsys):
    """A pass: `plan --model RUN` of a 2-rank run planned one GPU, and `--gpus 7` then named "--grad-accum 2", a
    flag never given (the value was the run's)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('[model]\npreset = "gpt3-1.3b"\nmax_seq_len = 2048\n[data]\nseq_len = 512\n'
                                     '[train]\nmicro_batch_size = 4\ngrad_accum = 2\n')
    (run / "distributed.json").write_text(json.dumps({"world_size": 2, "backend": "gloo"}))
    args = ["plan", "--model", str(run), "--gpu", "rtx4090", "--ssd", "990-pro", "--cpu-mem", "64GiB"]
    assert main(args + ["--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["data_parallel"]["gpus"] == 2 and "was trained by 2 processes: planned on 2 GPUs" in err
    assert main(args + ["--gpus", "1", "--json"]) == 0
    assert "data_parallel" not in json.loads(capsys.readouterr().out)
    assert main(args + ["--gpus", "7"]) == 2
    assert f"train.grad_accum=2 (of {run}) does not divide among --gpus 7" in capsys.readouterr().err


def test_the_plans_caps_are_the_machines_as_train_takes_them(tmp_path, capsys):
    """A pass: --gpus 2 printed (and wrote in its JSON policy) one rank's offload.resident_mem, which train
    takes as the machine's and divides among its ranks (``Dist.rank_config``): half the planned state stayed on
    the SSD (28.64 MiB written a step against the plan's 84 B). The plan now writes the machine's caps, and a cap
    given to plan is the machine's, as train reads it."""
    from fuyou.config import load_config
    from fuyou.distributed import Dist

    args = ["plan", "--model", "gpt-tiny", "--gpus", "2", "--cpu-mem", "600MiB", "--cpu-reserve", "0", "--batch", "2",
            "--grad-accum", "2", "--seq", "64", "--gpu", "h100", "--ssd", "2x990-pro"]
    assert main([*args, "--json"]) in (0, 1)
    p = json.loads(capsys.readouterr().out)
    cap = p["policy"]["resident_mem"]
    assert cap and p["memory"]["resident_bytes"] <= cap // 2  # (each rank's resident state within its share)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "written per step, the 2 ranks' together" in out  # (train's progress line shows rank 0's: a review)
    line = next(x for x in out.splitlines() if x.startswith("train as planned"))
    assert f"offload.resident_mem={cap // 1024}KiB" in line and "--plan auto" not in line  # (one process's only)
    cfg = load_config(overrides=["model.preset=gpt-tiny", f"offload.resident_mem={cap}"])
    share = Dist(rank=1, world=2, local_rank=1, local_world=2).rank_config(cfg).offload
    assert share.resident_mem == cap // 2 >= p["memory"]["resident_bytes"]  # (train's rank 1, given the plan's cap)
    # the plan, given to a run of another number of processes, is said to be another run's (its caps are shared
    # among its ranks; a review)
    import io

    from fuyou.train.loop import _adopt_planned_settings

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(p))
    (tmp_path / "ssd").mkdir()
    one = load_config(overrides=["model.preset=gpt-tiny", "offload.mode=ssd", f"offload.act_policy={plan}",
                                 "train.micro_batch_size=2", "train.grad_accum=2", "data.seq_len=64"],
                      flags={"offload.ssd_dirs": [str(tmp_path / "ssd")]})
    said = io.StringIO()
    _adopt_planned_settings(one, said, True)
    assert "was made for another run: processes on a machine (--gpus) 2 (this run: 1)" in said.getvalue()
    # a cap given to plan is the machine's: each rank plans half of it
    assert main([*args, "--json", f"offload.resident_mem={8 * 2**20}"]) in (0, 1)
    assert json.loads(capsys.readouterr().out)["memory"]["resident_bytes"] <= 4 * 2**20
