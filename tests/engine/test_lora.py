"""LoRA over a streamed, frozen base: the offloaded engine equals the in-memory LoRA reference bit for
bit (adapters and their moments, fp32, CPU), keeps nothing of the base but its compute weights, and a
run killed anywhere resumes bit-exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from engine_testutil import make_cfg, run_both


def assert_same_lora(ref, eng, rs, es) -> None:
    assert [s.loss for s in es] == [s.loss for s in rs]
    assert [s.grad_norm for s in es] == [s.grad_norm for s in rs]
    a, b = ref.adapter_state(), eng.adapter_state()
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, ea = ref.optimizer_state(), eng.optimizer_state()
    for k in a:
        for which in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ra[k][which], ea[k][which]), (k, which)
    assert eng.evaluate() == ref.evaluate()


CASES = {
    # the targets PEFT users write, weights cached in CPU memory, exact clipping and accumulation
    "llama-qv-clip-accum": ["model.preset=llama-test", "lora.targets=['q_proj','v_proj']", "train.grad_clip=0.5",
                            "train.grad_accum=2"],
    # every matmul, base weights streamed from the SSD, dropout
    "llama-all-ssd-dropout": ["model.preset=llama-test", "lora.targets=all-linear", "lora.dropout=0.1",
                              "offload.cache_weights=false", "offload.prefetch_depth=1"],
    # GPT-2's fused c_attn and both c_proj, tied head, rsLoRA, gaussian init
    "gpt-tied-rslora": ["lora.targets=['c_attn','c_proj']", "lora.use_rslora=true", "lora.init=gaussian",
                        "train.grad_clip=1e-3"],
    # activations kept (swapped to CPU and SSD, a block kept whole), dropout through the recompute
    "llama-kept-activations": ["model.preset=llama-test", "lora.targets=all-linear", "lora.dropout=0.2",
                               "offload.act_policy=fc2,proj=ssd;qkv,fc1=cpu", "offload.act_cpu_mem=32KiB"],
    "gpt-block-kept-whole": ["lora.targets=all-linear", "offload.act_policy=1-2:all=gpu", "lora.dropout=0.1"],
    # the CUDA code paths on the fake device
    "fake-device": ["model.preset=llama-test", "lora.targets=all-linear", "train.device=fake", "train.grad_accum=2",
                    "offload.cache_weights=false"],
    # an int8 base (fuyou/models/quant.py): streamed from the SSD, cached, a block kept whole (its saved
    # weights are the dequantised ones: rebuilt in backward, not swapped), on the fake device
    "llama-int8-base-ssd": ["model.preset=llama-test", "lora.targets=all-linear", "lora.base=int8",
                            "offload.cache_weights=false", "lora.dropout=0.1", "train.grad_clip=0.5"],
    "gpt-int8-base-cached-kept": ["lora.targets=['c_attn','c_fc']", "lora.base=int8", "train.grad_accum=2",
                                  "offload.act_policy=1:all=cpu;2:all=ssd;3:qkv=ssd", "offload.act_cpu_mem=1MiB"],
    "llama-nf4-base-ssd-accum": ["model.preset=llama-test", "lora.targets=all-linear", "lora.base=nf4",
                                 "offload.cache_weights=false", "train.grad_accum=2", "offload.act_policy=2:all=ssd"],
    "nf4-base-fake-device": ["lora.targets=all-linear", "lora.base=nf4", "train.device=fake",
                             "offload.act_policy=1:fc1=cpu", "offload.act_cpu_mem=1MiB"],
    # NF4 with double-quantised absmax values (QLoRA's), cached, and on the fake device
    "llama-nf4dq-base-cached": ["model.preset=llama-test", "lora.targets=all-linear", "lora.base=nf4dq",
                                "lora.dropout=0.1"],
    "nf4dq-base-fake-device": ["lora.targets=all-linear", "lora.base=nf4dq", "train.device=fake",
                               "offload.cache_weights=false"],
    "int8-base-fake-device": ["model.preset=llama-test", "lora.targets=all-linear", "lora.base=int8",
                              "train.device=fake", "offload.cache_weights=false", "offload.act_policy=1:all=cpu",
                              "offload.act_cpu_mem=1MiB"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_offloaded_lora_equals_in_memory_lora(tmp_path, case):
    cfg = make_cfg(tmp_path, "model.n_layer=4", "lora.rank=4", "train.steps=3", *CASES[case])
    ref, eng, rs, es = run_both(cfg)
    try:
        assert_same_lora(ref, eng, rs, es)
        # the base did not move, and only its compute weights are stored: no master, moments or gradients
        base = {k: v for k, v in eng.state().items() if "lora_" not in k}
        for k, v in ref.state().items():
            if "lora_" not in k:
                assert torch.equal(base[k], v), k
        assert all(k.endswith("/weights") for k in eng.store.keys() if not k.startswith("act/"))  # and activations
        assert eng.plan.resident_stages == [] and eng.plan.cpu_items["gradients in flight"] == 0
        assert "LoRA adapters, gradients and AdamW moments" in eng.plan.device_items
        if not any("act_policy" in o for o in CASES[case]):  # no activation goes to the SSD either:
            assert eng.counters.ssd_write_bytes == 0          # nothing of a step is written
    finally:
        eng.close()


@pytest.mark.parametrize("clip, clipped", [(1e-6, True), (1e6, False)])
def test_a_clipped_lora_step_is_recorded_as_clipped(tmp_path, clip, clipped):
    """metrics.jsonl said "clipped": false on LoRA steps whose adapters' norm was clipped (the progress line
    said clipped): the LoRA update never set the step's counter."""
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine

    cfg = make_cfg(tmp_path, "model.n_layer=4", "lora.rank=4", "train.steps=2", f"train.grad_clip={clip}")
    eng = Engine(cfg, load_data(cfg.data), "clip")
    try:
        for s in range(2):
            norm = eng.train_step(s).grad_norm
            assert eng.step_counters()["clipped"] is clipped and (norm > clip) is clipped
    finally:
        eng.close()


def test_bf16_lora_equals_reference(tmp_path):
    cfg = make_cfg(tmp_path, "model.preset=llama-test", "model.n_layer=4", "lora.rank=8", "lora.targets=all-linear",
                   "train.precision=bf16", "train.steps=3")
    ref, eng, rs, es = run_both(cfg)
    try:
        # bf16 compute: the engine multiplies by the base's bf16 copy where autocast leaves the reference's
        # fp32 weight (the norms' scales), so the two agree to bf16 rounding, not bit for bit
        for a, b in zip(rs, es):
            assert abs(a.loss - b.loss) <= 1e-4 * abs(a.loss)
        # Adam turns tiny gradient differences into whole-step updates where a gradient is near zero, so
        # elementwise differences say little; the adapters' learned update (B from zero) is compared by
        # direction and size over all adapters
        ra, ea = ref.adapter_state(), eng.adapter_state()
        a = torch.cat([ra[k].flatten() for k in ra if k.endswith("lora_B")])
        b = torch.cat([ea[k].flatten() for k in ra if k.endswith("lora_B")])
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        size = float(b.norm() / a.norm())
        print(f"bf16 LoRA: learned update cosine {cos:.5f}, norm ratio {size:.4f}")
        assert cos > 0.99 and abs(size - 1) < 0.02
    finally:
        eng.close()


def test_lora_refuses_compressed_state_and_unknown_targets():
    from fuyou.config import load_config
    from fuyou.errors import ConfigError

    with pytest.raises(ConfigError, match="leave them at fp32"):
        load_config(overrides=["lora.rank=4", "optim.moments=int8"])
    with pytest.raises(ConfigError, match="'q_proj' is no matmul of a gpt block"):
        load_config(overrides=["lora.rank=4", "lora.targets=q_proj"])
    with pytest.raises(ConfigError, match="lora.rank=4096 exceeds"):
        from fuyou.models import StageModel
        from fuyou.models.lora import attach

        cfg = load_config(overrides=["lora.rank=4096"])
        attach(StageModel(cfg.model), cfg.lora)


# -- kill and resume ----------------------------------------------------------------------------
ARGS = ["model.preset=llama-test", "model.n_layer=4", "train.precision=fp32", "train.steps=4", "train.warmup_steps=1",
        "data.seq_len=32", "train.micro_batch_size=2", "train.eval_batches=1", "train.eval_every=0",
        "offload.commit_every=1", "lora.rank=4", "lora.targets=all-linear", "lora.dropout=0.1", "train.grad_clip=0.5"]


def train_cmd(tmp_path, name, *extra):
    ssd = tmp_path / "ssd"
    ssd.mkdir(exist_ok=True)
    return [sys.executable, "-m", "fuyou.cli", "train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "256MiB",
            "--out", str(tmp_path / "runs"), f"run.name={name}", *ARGS, *extra]


def run(cmd, fault=None):
    env = {k: v for k, v in os.environ.items() if k != "FUYOU_FAULT"}
    if fault:
        env["FUYOU_FAULT"] = fault
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-ref")
    r = run(train_cmd(tmp, "ref"))
    assert r.returncode == 0, r.stderr
    return load_file(str(tmp / "runs" / "ref" / "adapter.safetensors"))


@pytest.mark.parametrize("fault", ["forward@2", "backward@2", "optimizer@2", "commit@3", "optimizer@0"])
def test_sigkill_then_resume_is_bit_exact(tmp_path, uninterrupted, fault):
    killed = run(train_cmd(tmp_path, "r"), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / "runs" / "r"
    assert not (run_dir / "adapter.safetensors").exists()
    resumed = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    got = load_file(str(run_dir / "adapter.safetensors"))
    assert got.keys() == uninterrupted.keys()
    for k in got:
        assert torch.equal(got[k], uninterrupted[k]), k


def test_an_int8_base_resumes_bit_exactly_and_refuses_another_base(tmp_path):
    """The packed base is what the store holds: a run killed mid-step resumes from it bit for bit (the
    resumed run refills its cache from the packed stages), and a resume cannot change lora.base."""
    ref = run(train_cmd(tmp_path, "ref", "lora.base=int8"))
    assert ref.returncode == 0, ref.stderr
    killed = run(train_cmd(tmp_path, "r", "lora.base=int8"), fault="backward@2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / "runs" / "r"
    other = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(run_dir), "lora.base=compute"])
    assert other.returncode != 0 and "lora.base" in other.stderr and "Traceback" not in other.stderr
    resumed = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    want, got = (load_file(str(d / "adapter.safetensors")) for d in (tmp_path / "runs" / "ref", run_dir))
    assert got.keys() == want.keys()
    for k in got:
        assert torch.equal(got[k], want[k]), k


def test_a_commit_recorded_before_lora_base_existed_resumes(tmp_path):
    """A record written by an earlier fuyou has no lora.base: it was a plain base, and resumes as one
    (found by review: the comparison took the missing key for a changed setting)."""
    import json

    from fuyou.engine.commit import RECORD, write_record

    r = run(train_cmd(tmp_path, "old", "train.steps=2", "offload.keep_state=true"))
    assert r.returncode == 0, r.stderr
    state = tmp_path / "ssd" / "old.fuyou-state"
    rec = json.loads((state / RECORD).read_text())
    rec.pop("checksum")
    assert rec["lora"].pop("base") == "compute"
    write_record(state, rec)
    resumed = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(tmp_path / "runs" / "old"),
                   "train.steps=3"])
    assert resumed.returncode == 0, resumed.stderr


def test_a_damaged_adapter_commit_is_refused(tmp_path):
    r = run(train_cmd(tmp_path, "d", "train.steps=2", "run.save_weights=false", "offload.keep_state=true"))
    assert r.returncode == 0, r.stderr
    (state,) = (tmp_path / "ssd" / "d.fuyou-state").glob("lora-state.*.safetensors")
    data = bytearray(state.read_bytes())
    data[-3] ^= 0xFF
    state.write_bytes(bytes(data))
    resumed = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(tmp_path / "runs" / "d"),
                   "train.steps=3"])
    assert resumed.returncode != 0 and "damaged" in resumed.stderr and "Traceback" not in resumed.stderr


def test_lora_peak_resident_memory_stays_under_budget(tmp_path):
    """LoRA on a model whose base (fp32 compute, on any CPU) is over 3x the CPU budget: peak RSS (fresh process)
    under fixed overhead + budget, the base streamed from the SSD for the stages the cache cannot hold."""
    import json
    import textwrap

    ssd = tmp_path / "ssd"
    ssd.mkdir()
    script = textwrap.dedent(f"""
        import json
        from fuyou.config import load_config
        from fuyou.data import load_data
        from fuyou.engine.engine import Engine
        from fuyou.engine.malloc import resident_bytes
        cfg = load_config(overrides=[
            "model.preset=llama-test", "model.n_layer=32", "model.d_model=1024", "model.n_head=16",
            "model.n_kv_head=4", "model.d_ff=2816", "model.vocab_size=320", "data.seq_len=64",
            "train.micro_batch_size=2", "train.steps=2", "lora.rank=8", "lora.targets=[q_proj,v_proj]",
            "offload.mode=ssd", "offload.ssd_dirs={ssd}", "offload.cpu_mem=340MiB", "train.threads=2",
            "train.precision=fp32"])
        eng = Engine(cfg, load_data(cfg.data), "state")
        for step in range(2):
            eng.train_step(step)
        print(json.dumps({{"peak": resident_bytes("VmHWM"), "overhead": eng.fixed_overhead,
                          "budget": cfg.offload.cpu_mem, "base": 4 * sum(s.numel for s in eng.states),
                          "cached": len(eng.plan.cached_stages), "stages": len(eng.states)}}))
        eng.close()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["base"] >= 3 * r["budget"] and r["cached"] < r["stages"], r
    assert r["peak"] <= r["overhead"] + r["budget"], r
    print(f"LoRA peak RSS {r['peak'] / 2**20:.1f} MiB, fixed overhead + budget {(r['overhead'] + r['budget']) / 2**20:.1f} MiB")


def test_resume_refuses_another_adapter_shape_but_takes_new_dropout(tmp_path):
    r = run(train_cmd(tmp_path, "s", "train.steps=2", "run.save_weights=false", "offload.keep_state=true"))
    assert r.returncode == 0, r.stderr
    run_dir = str(tmp_path / "runs" / "s")
    for change in ("lora.rank=8", "lora.rank=0", "lora.targets=[q_proj]"):
        refused = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", run_dir, "train.steps=3", change])
        assert refused.returncode != 0 and "a resumed run cannot change lora." in refused.stderr, refused.stderr
    ok = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", run_dir, "train.steps=3", "lora.dropout=0.2"])
    assert ok.returncode == 0 and "lora.dropout 0.1 -> 0.2" in ok.stderr, ok.stderr


def test_the_adapters_commits_count_in_the_ssd_written_figures(tmp_path):
    """A LoRA run committing every step said "SSD written: 0 B per step": its commits write the adapters and
    their moments (a small file), which the figures now count."""
    from fuyou.train.loop import run_training

    cfg = make_cfg(tmp_path, "model.n_layer=4", "lora.rank=4", "train.steps=3", "offload.mode=ssd",
                   "offload.commit_every=1", "train.log_every=1", "train.eval_every=0", "run.name=lw")
    res = run_training(cfg)
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = next(x for x in lines if x.get("summary"))
    adapters = (res.run_dir / "adapter.safetensors").stat().st_size  # the adapters alone, in fp32
    assert 2 * adapters < summary["ssd_write_per_step_bytes"] < 4 * adapters  # with m and v: about 3x


def test_lora_runs_are_named_as_such_in_messages_and_targets_compare_as_resolved(tmp_path, capsys):
    """From a new-user pass of LoRA: a resume with another batch advised --init-from a run that never holds
    model.safetensors; --init-from a LoRA run said "weights but no config.json"; lora.init_from of a run
    directory was "not a PEFT adapter"; lora.targets=[q_proj,v_proj] (the default's) on resume was refused as
    a change; an in-memory LoRA run did not say LoRA was on."""
    from fuyou.cli import main

    ssd = tmp_path / "ssd"
    ssd.mkdir()
    base = ["model.preset=llama-test", "data.seq_len=32", "train.micro_batch_size=2", "train.eval_every=0",
            "lora.rank=4"]
    assert main(["train", "--out", str(tmp_path / "runs"), "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem",
                 "256MiB", "run.name=ks", "train.steps=2", "offload.keep_state=true", *base]) == 0
    run = tmp_path / "runs" / "ks"
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.steps=3", "train.grad_accum=2"]) == 2
    err = capsys.readouterr().err
    assert "lora.init_from its exported adapter" in err and "model.safetensors" not in err, err
    for other in ("lora.targets=[q_proj]", "lora.targets=all-linear"):  # other matmuls: still refused
        assert main(["train", "--resume", str(run), "train.steps=3", other]) == 2
        assert "lora.targets" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "train.steps=3", "lora.targets=[q_proj,v_proj]"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "runs"), "--init-from", str(run), "train.steps=1", *base]) == 2
    assert "is a LoRA run: it holds adapters, not a model" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "runs"), f"lora.init_from={run}", "train.steps=1", *base]) == 2
    assert "is a fuyou LoRA run directory: export its adapter first" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "runs"), "train.steps=1", *base]) == 0
    assert "LoRA: rank 4 adapters on q, v of every block" in capsys.readouterr().err


def test_the_adapter_file_is_the_same_bytes_for_the_same_adapters(tmp_path):
    """A resumed run's adapter.safetensors differed in bytes from an uninterrupted run's, its tensors equal
    (safetensors' writer orders the metadata as a hash map does; a new-user pass): the file's bytes follow
    from the adapters and settings alone, whatever order they come in."""
    from safetensors.torch import load_file

    from fuyou.config import load_config
    from fuyou.train.run import save_adapters

    cfg = load_config(overrides=["model.preset=llama-test", "lora.rank=2"])
    g = torch.Generator().manual_seed(0)
    a = {f"blocks.{i}.attn.{w}.lora_{ab}": torch.randn(2, 8, generator=g) for i in range(2) for w in "qv"
         for ab in "AB"}
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    save_adapters(tmp_path / "x", a, cfg, step=3)
    save_adapters(tmp_path / "y", dict(reversed(list(a.items()))), cfg, step=3)
    x, y = (tmp_path / d / "adapter.safetensors" for d in "xy")
    assert x.read_bytes() == y.read_bytes()
    back = load_file(str(tmp_path / "x" / "adapter.safetensors"))
    assert back.keys() == a.keys() and all(torch.equal(back[k], a[k]) for k in a)
