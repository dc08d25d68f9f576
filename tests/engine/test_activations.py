"""Activation swapping: every policy gives the same gradients and weights as recomputing everything."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fuyou.engine.device import HostDevice
from fuyou.engine.swapper import ActivationSwapper
from fuyou.engine.trace import StepCounters, Tracer
from fuyou.store import PinnedPool, StoreCorruptError, TensorStore

from engine_testutil import make_cfg, run_both

POLICIES = [
    "recompute",
    "fc2=gpu",
    "fc2,proj=ssd",                    # the paper's first two classes, to SSD
    "qkv,fc1=cpu",                     # CPU tier (overflows to SSD past its share)
    "all=gpu",                         # whole blocks kept: no recomputation
    "all=ssd",
    "0:all=cpu;1:fc2,qkv=ssd;1:checkpoint=ssd",  # mixed, checkpoint off the device
]


@pytest.mark.parametrize("family", ["gpt-test", "llama-test"])
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_equals_recompute_everything(tmp_path, policy, family):
    """Same losses, weights and Adam moments as in-memory training (which the recompute-everything
    engine equals bit for bit, tests/engine/test_equivalence.py)."""
    cfg = make_cfg(tmp_path, f"model.preset={family}", f"offload.act_policy={policy}", "offload.act_cpu_mem=64KiB",
                   "train.grad_accum=2")
    ref, eng, ref_stats, eng_stats = run_both(cfg)
    try:
        assert [s.loss for s in eng_stats] == [s.loss for s in ref_stats]
        rw, ew = ref.state(), eng.state()
        for k in rw:
            assert torch.equal(rw[k], ew[k]), k
        ro, eo = ref.optimizer_state(), eng.optimizer_state()
        for k in ro:
            assert torch.equal(ro[k]["exp_avg_sq"], eo[k]["exp_avg_sq"]), k
        if "ssd" in policy or "cpu" in policy:
            c = eng.counters
            assert c.act_ssd_write_bytes > 0 and c.act_ssd_read_bytes == c.act_ssd_write_bytes
    finally:
        eng.close()


@pytest.mark.parametrize("policy", ["all=ssd", "qkv,fc1=cpu", "fc2,proj=ssd;checkpoint=ssd"])
def test_activations_swapped_in_many_chunks_equal_recompute(tmp_path, policy):
    """Activations of several staging chunks (offload.act_chunk=1MiB, the least: the store's checksum block;
    3-12 MiB each here): every chunk read back lands at its own offset. At the default 8 MiB every tested
    activation was one chunk, and a read-back of every chunk to offset 0 passed (a mutation audit)."""
    cfg = make_cfg(tmp_path, "model.preset=llama-test", "model.d_model=256", "model.d_ff=640", "data.seq_len=64",
                   "train.micro_batch_size=48", "train.steps=2", f"offload.act_policy={policy}",
                   "offload.act_cpu_mem=64KiB", "offload.act_chunk=1MiB", "train.grad_accum=2", "offload.cpu_mem=1GiB")
    ref, eng, ref_stats, eng_stats = run_both(cfg)
    try:
        assert [s.loss for s in eng_stats] == [s.loss for s in ref_stats]
        rw, ew = ref.state(), eng.state()
        assert all(torch.equal(rw[k], ew[k]) for k in rw)
        c = eng.counters
        assert c.act_ssd_write_bytes > 16 * 2**20 and c.act_ssd_read_bytes == c.act_ssd_write_bytes
    finally:
        eng.close()


@pytest.mark.parametrize("policy,replayed", [("recompute", 4), ("fc2=gpu", 3), ("fc2,proj,qkv=ssd", 1), ("all=gpu", 0)])
def test_kept_matmuls_are_not_recomputed(tmp_path, monkeypatch, policy, replayed):
    calls = {"n": 0}
    real = F.linear

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    cfg = make_cfg(tmp_path, f"offload.act_policy={policy}", "train.steps=1")
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine

    eng = Engine(cfg.model_copy(update={"offload": cfg.offload.model_copy(update={"mode": "ssd"})}), load_data(cfg.data), "s")
    try:
        monkeypatch.setattr(F, "linear", counting)
        eng.train_step(0)
        eng.worker.wait_all()
    finally:
        monkeypatch.setattr(F, "linear", real)
        eng.close()
    blocks = cfg.model.n_layer
    # forward: 4 matmuls per block (the LM head's are inside the chunked loss); backward: `replayed` per
    # block recomputed
    assert calls["n"] == 4 * blocks + replayed * blocks


def test_activations_beyond_the_cpu_budget_flow_through_ssd(tmp_path):
    """Kept activations larger than the whole CPU budget: peak RSS stays under overhead + budget and the
    overflow goes to SSD (that it comes back correctly, in many chunks as here, is
    ``test_activations_swapped_in_many_chunks_equal_recompute``'s)."""
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    script = textwrap.dedent(f"""
        import json
        from fuyou.config import load_config
        from fuyou.data import load_data
        from fuyou.engine.engine import Engine
        from fuyou.engine.malloc import resident_bytes
        def run(policy, name):
            cfg = load_config(overrides=[
                "model.n_layer=12", "model.d_model=256", "model.n_head=4", "model.vocab_size=320",
                "model.max_seq_len=512", "data.seq_len=512", "train.micro_batch_size=16", "train.steps=1", "train.grad_clip=none",
                "train.precision=fp32", "offload.mode=ssd", "offload.ssd_dirs={ssd}", "offload.cpu_mem=900MiB", "offload.act_prefetch_blocks=0",
                "offload.optimizer_chunk=1", "offload.act_cpu_mem=16MiB", "train.threads=2",
                "offload.act_policy=" + policy])
            eng = Engine(cfg, load_data(cfg.data), name)
            loss = eng.train_step(0).loss
            eng.worker.wait_all()
            out = dict(loss=loss, act=eng.counters.act_ssd_write_bytes, budget=cfg.offload.cpu_mem,
                       overhead=eng.fixed_overhead, peak=resident_bytes("VmHWM"))
            eng.close()
            return out
        print(json.dumps(run("all=cpu", "a")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["act"] > r["budget"], r                # more activation bytes than the whole budget
    assert r["peak"] <= r["overhead"] + r["budget"], r


def _swapper(store, tmp_path):
    return ActivationSwapper(store, HostDevice(), None, PinnedPool(8 << 20), 1 << 20, Tracer(), StepCounters)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_activation_is_reported_not_returned(tmp_path, damage):
    with TensorStore.create([tmp_path / "s"]) as store:
        counters = StepCounters()
        sw = ActivationSwapper(store, HostDevice(), None, PinnedPool(8 << 20), 1 << 20, Tracer(), lambda: counters)
        t = torch.randn(3, 700_000)
        slot = sw.put("act/3/fc2.0", t, "ssd")
        for f in slot.writes:
            f.result()
        ext = store.record(slot.key).extents[0]
        path = store.paths[ext.dir_index]
        with open(path, "r+b") as fh:
            if damage == "flip":
                fh.seek(ext.offset + 5 * 4096 + 7)
                b = fh.read(1)
                fh.seek(ext.offset + 5 * 4096 + 7)
                fh.write(bytes([b[0] ^ 1]))
            else:
                fh.truncate(ext.offset + 4096)
        with pytest.raises(StoreCorruptError, match="act/3/fc2.0"):
            sw.get(slot)
        sw.close()


def test_corrupt_activation_stops_training(tmp_path, monkeypatch):
    """Corruption injected on disk between forward and backward: the step raises, naming the
    activation; no update is made from it."""
    cfg = make_cfg(tmp_path, "offload.act_policy=fc2=ssd", "train.steps=1")
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine

    eng = Engine(cfg.model_copy(update={"offload": cfg.offload.model_copy(update={"mode": "ssd"})}), load_data(cfg.data), "s")
    real = ActivationSwapper._read_ssd

    def corrupt_then_read(self, slot):
        for f in slot.writes:
            f.result()
        ext = self.store.record(slot.key).extents[0]
        with open(self.store.paths[ext.dir_index], "r+b") as fh:
            fh.seek(ext.offset + 100)
            fh.write(b"\xff\xfe")
        return real(self, slot)

    monkeypatch.setattr(ActivationSwapper, "_read_ssd", corrupt_then_read)
    before = eng.state()
    with pytest.raises(StoreCorruptError, match="act/1.0/fc2.0"):
        eng.train_step(0)
    monkeypatch.setattr(ActivationSwapper, "_read_ssd", real)
    after = eng.state()
    # block.1's backward never ran, so neither it nor the stages before it were updated
    for k in before:
        if k.startswith(("block.1.", "block.0.", "embed.")):
            assert torch.equal(before[k], after[k]), k
    eng.close()


def test_a_swapped_tensor_comes_back_with_its_layout(tmp_path):
    """Autograd saves transposed views (LoRA's kept blocks): through the SSD tier they come back with the
    strides they left with, so backward runs the same matmul kernels (a contiguous copy changed the
    rounding: LoRA over a block kept whole was 1e-8 off the reference, tests/engine/test_lora.py)."""
    with TensorStore.create([tmp_path / "s"]) as store:
        sw = _swapper(store, tmp_path)
        base = torch.randn(5, 7, 3)
        for t in (base, base.transpose(0, 1), base.permute(2, 0, 1), base[:, ::2]):  # the last is not dense
            slot = sw.put(f"act/0/x{t.stride()}", t, "ssd")
            back = sw.get(slot)
            assert torch.equal(back, t)
            assert back.stride() == (t.stride() if slot.perm is not None or t.is_contiguous()
                                     else t.contiguous().stride())
            sw.free(slot)
        assert sw.put("act/0/t", base.transpose(0, 1), "ssd").perm == (1, 0, 2)
        sw.close()


# What a block kept whole saves, across the code paths that change it: the planner and the budget count it
# with ``budget.saved_block_bytes``, the engine swaps what autograd saves (``recompute.GraphKeeper``).
WHOLE = {
    "gpt-fp32": ["model.preset=gpt-test"],
    "gpt-bf16": ["model.preset=gpt-test", "train.precision=bf16"],
    "llama-bf16": ["model.preset=llama-test", "train.precision=bf16"],
    "llama-fp32-qknorm": ["model.preset=llama-test", "model.qk_norm=true"],
    "llama-bf16-qknorm-mqa": ["model.preset=llama-test", "train.precision=bf16", "model.qk_norm=true",
                              "model.n_kv_head=1", "model.d_head=32"],
    "llama-window": ["model.preset=llama-test", "train.precision=bf16", "model.sliding_window=8"],
    "gpt-lora": ["model.preset=gpt-test", "lora.rank=4"],
    "gpt-lora-bf16-dropout": ["model.preset=gpt-test", "train.precision=bf16", "lora.rank=4",
                              "lora.targets=all-linear", "lora.dropout=0.1"],
    "llama-lora": ["model.preset=llama-test", "train.precision=bf16", "lora.rank=4", "lora.targets=all-linear"],
    "llama-lora-dropout": ["model.preset=llama-test", "train.precision=bf16", "lora.rank=4", "lora.dropout=0.1"],
    "llama-packed": ["model.preset=llama-test", "train.precision=bf16", "PACKED"],
    "gpt-packed-lora": ["model.preset=gpt-test", "lora.rank=2", "lora.targets=c_fc", "PACKED"],
}


@pytest.mark.parametrize("case", list(WHOLE), ids=list(WHOLE))
def test_a_block_kept_whole_swaps_what_the_estimate_counts(tmp_path, case):
    """The SSD bytes of ``all=ssd`` are ``saved_block_bytes`` per block and micro-batch, exactly (they were
    counted as the four classes, half to a third of it); the planner counts the same."""
    from fuyou.data import load_data
    from fuyou.engine.budget import saved_block_bytes
    from fuyou.engine.engine import Engine
    from fuyou.planner.cost import Workload, placement_bytes, stage_costs
    from fuyou.policy import read_act_policy

    over = list(WHOLE[case])
    if "PACKED" in over:  # fine-tuning records, several to a row: attention takes a mask
        over.remove("PACKED")
        data = tmp_path / "qa.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f" {i}."}) + "\n" for i in range(60)))
        over += [f"data.path={data}", "data.format=prompt_completion"]
    cfg = make_cfg(tmp_path, "model.n_layer=4", "offload.act_policy=all=ssd;checkpoint=ssd", "offload.mode=ssd",
                   "train.grad_accum=2", *over)
    data = load_data(cfg.data)
    eng = Engine(cfg, data, "whole")
    try:
        eng.train_step(0)
        swapped = eng.counters.act_ssd_write_bytes
    finally:
        eng.close()
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len
    est = saved_block_bytes(cfg.model, B, T, 2 if cfg.train.precision == "bf16" else 4, cfg.lora,
                            cfg.data.may_pack)
    assert swapped == 4 * 2 * est  # four blocks, two micro-batches; the input stays on the device
    w = Workload.from_config(cfg)
    placed = placement_bytes(w, stage_costs(w), read_act_policy(cfg.offload.act_policy, 4))
    inputs = 2 * 4 * 4 * B * T * cfg.model.d_model  # two micro-batches' fp32 inputs of four blocks, on the device
    assert (placed["ssd"], placed["ckpt_ssd"], placed["ckpt_gpu"]) == (swapped, 0, inputs)


@pytest.mark.parametrize("policy, share", [("fc1,qkv=cpu;checkpoint=cpu", "300KiB"), ("all=cpu", "2MiB"),
                                           ("fc1,qkv=cpu", None)])
def test_what_the_cpu_tier_cannot_hold_is_counted_on_the_ssd(tmp_path, policy, share):
    """The cpu tier is a share of the budget (offload.act_cpu_mem); what overflows it goes to the SSD,
    in forward order. The planner counted the whole policy's cpu items in CPU memory (a pass measured
    141 MiB/step written where the plan said 82); it now overflows the same items. A block kept whole is
    tensor by tensor to the engine and, where the share cannot take all of it, to the planner the share less its
    largest tensor: they agree within that tensor (the whole block, as one item: a hostile pass saw 31 % over)."""
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine
    from fuyou.planner.cost import Workload, placement_bytes, stage_costs
    from fuyou.policy import read_act_policy

    cfg = make_cfg(tmp_path, "model.n_layer=4", "model.preset=gpt-tiny", "train.grad_accum=2", "offload.mode=ssd",
                   f"offload.act_policy={policy}", *([f"offload.act_cpu_mem={share}"] if share else []))
    eng = Engine(cfg, load_data(cfg.data), "spill")
    try:
        eng.train_step(0)
        first = (eng.counters.act_ssd_write_bytes, eng.counters.act_cpu_bytes, eng.counters.act_overflow_bytes)
        eng.train_step(1)  # the share is given back after each step: the second places as the first (its release
        c = eng.counters  # dropped, everything after step 1 overflowed and every test passed: a mutation audit)
        assert (c.act_ssd_write_bytes, c.act_cpu_bytes, c.act_overflow_bytes) == first
    finally:
        eng.close()
    assert share is None or c.act_ssd_write_bytes > 0  # (the case overflows)
    assert c.act_overflow_bytes == c.act_ssd_write_bytes  # (every SSD write is the cpu tier's overflow: counted)
    w = Workload.from_config(cfg)
    placed = placement_bytes(w, stage_costs(w), read_act_policy(policy, 4), eng.act_cpu_mem, cuda=False)
    total = c.act_ssd_write_bytes + c.act_cpu_bytes
    assert placed["ssd"] + placed["ckpt_ssd"] + placed["cpu"] + placed["ckpt_cpu"] == total
    boundary = w.largest_saved if policy.startswith("all") else 0
    assert 0 <= placed["ssd"] + placed["ckpt_ssd"] - c.act_ssd_write_bytes <= boundary  # (never under the engine's)
    assert boundary < w.whole / 4


@pytest.mark.parametrize("policy", ["qkv,fc1=cpu", "checkpoint=cpu"])
def test_no_cpu_tier_on_a_device_overflows_to_the_ssd(tmp_path, policy):
    """offload.act_cpu_mem=0 with a cpu-tier policy on a device (the fake one runs the CUDA paths): there is no
    pinned pool, and the first swap was an AttributeError traceback (a hostile pass); it overflows to the SSD."""
    cfg = make_cfg(tmp_path, "model.preset=gpt-test", f"offload.act_policy={policy}", "offload.act_cpu_mem=0",
                   "train.device=fake")
    ref, eng, ref_stats, eng_stats = run_both(cfg)
    try:
        assert [s.loss for s in eng_stats] == [s.loss for s in ref_stats]
        rw, ew = ref.state(), eng.state()
        assert all(torch.equal(rw[k], ew[k]) for k in rw)
        assert eng.counters.act_ssd_write_bytes > 0
    finally:
        eng.close()


def test_a_cpu_share_is_not_charged_when_the_policy_keeps_nothing_there(tmp_path):
    """offload.act_cpu_mem with a policy that keeps nothing in the cpu tier: the share was charged to the
    budget all the same (a pass saw 80 MiB of a 300 MiB budget taken from resident optimizer state, without
    a word). It is now unused, not charged, and the run says so."""
    from fuyou.data import load_data
    from fuyou.engine.budget import ACT_SHARE
    from fuyou.engine.engine import Engine

    plans = {}
    for share in (None, "80MiB"):
        (tmp_path / str(share)).mkdir()
        cfg = make_cfg(tmp_path / str(share), "model.n_layer=4", "model.preset=gpt-tiny", "offload.mode=ssd",
                       "offload.cpu_mem=420MiB", "offload.act_policy=fc2,proj=ssd",
                       *([f"offload.act_cpu_mem={share}"] if share else []))
        eng = Engine(cfg, load_data(cfg.data), "share")
        try:
            plans[share] = (eng.plan.cpu_items, eng.plan.resident_bytes, eng.act_cpu_mem, eng.startup_lines())
        finally:
            eng.close()
    (items, resident, act, lines), (items80, resident80, act80, lines80) = plans[None], plans["80MiB"]
    assert ACT_SHARE not in items80 and items80 == items and resident80 == resident and act80 == act == 0
    assert not any("act_cpu_mem" in line for line in lines)
    assert any("offload.act_cpu_mem=80.00 MiB is unused" in line for line in lines80)
