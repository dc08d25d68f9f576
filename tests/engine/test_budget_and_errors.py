"""Budgets are promises, and impossible configurations are refused before any work starts."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fuyou.cli import main
from fuyou.errors import BudgetError

from engine_testutil import make_cfg


@pytest.mark.parametrize("budget,ratio", [("380MiB", 4), ("850MiB", 2)])
def test_peak_resident_memory_stays_under_budget(tmp_path, budget, ratio):
    """A model whose training state is 2-4x the CPU budget trains with peak RSS under fixed overhead
    + budget (measured from /proc/self/status in a fresh process): at 380 MiB part of the weights are
    cached; at 850 MiB all are and the rest of the budget holds resident optimizer state. (fp32 compute, on
    any CPU: 4-byte compute weights, so the state is 16 B a parameter.)"""
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    script = textwrap.dedent(f"""
        import json, sys
        from fuyou.config import load_config
        from fuyou.data import load_data
        from fuyou.engine.engine import Engine
        from fuyou.engine.malloc import resident_bytes
        cfg = load_config(overrides=[
            "model.n_layer=24", "model.d_model=640", "model.n_head=8", "model.vocab_size=320",
            "data.seq_len=64", "train.micro_batch_size=2", "train.steps=2", "train.grad_clip=none",
            "offload.mode=ssd", "offload.ssd_dirs={ssd}", "offload.cpu_mem={budget}", "train.threads=2",
            "offload.optimizer_chunk=1", "train.precision=fp32"])
        eng = Engine(cfg, load_data(cfg.data), "state")
        for step in range(2):
            eng.train_step(step)
        eng.worker.wait_all()
        state = sum(s.numel for s in eng.states) * 16
        print(json.dumps({{"peak": resident_bytes("VmHWM"), "overhead": eng.fixed_overhead,
                          "budget": cfg.offload.cpu_mem, "state": state,
                          "cached": len(eng.plan.cached_stages), "stages": len(eng.states),
                          "resident": len(eng.plan.resident_stages)}}))
        eng.close()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["state"] >= ratio * r["budget"], r
    if ratio == 4:
        assert 0 < r["cached"] < r["stages"] and r["resident"] <= 1, r  # part cached (the small embedding's state resident)
    else:
        assert r["cached"] == r["stages"] and 0 < r["resident"] < r["stages"], r
    assert r["peak"] <= r["overhead"] + r["budget"], r


@pytest.mark.parametrize("commit", ["every", "interval", "none"])
def test_resident_optimizer_state_reads_nothing_from_ssd(tmp_path, commit):
    """Every stage resident and cached: a step reads nothing from the SSD; a commit writes the 12 B/param
    of state (every step, or every second step with an interval), and between commits, or with commit
    'none', nothing is written until the state is read back."""
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine

    setting = {"every": "offload.commit_every=1", "interval": "offload.commit_every=2", "none": "offload.commit=none"}
    cfg = make_cfg(tmp_path, "offload.mode=ssd", setting[commit])
    eng = Engine(cfg, load_data(cfg.data), "state")
    try:
        assert eng.plan.resident_stages == list(range(len(eng.states)))
        n = sum(s.numel for s in eng.states)
        for step, commits in enumerate({"every": [1, 1], "interval": [0, 1], "none": [0, 0]}[commit]):
            eng.train_step(step)
            eng.worker.wait_all()
            assert eng.counters.ssd_read_bytes == 0
            assert eng.counters.ssd_write_bytes == 12 * n * commits
            assert all(s.dirty == (not commits) for s in eng.states)
    finally:
        eng.close()


def test_cpu_budget_too_small_is_refused_with_numbers(tmp_path):
    cfg = make_cfg(tmp_path, "offload.cpu_mem=1MiB", "offload.mode=ssd")
    with pytest.raises(BudgetError, match=r"(?s)CPU memory budget 1.00 MiB cannot hold.*optimizer buffers.*raise offload.cpu_mem"):
        __import__("fuyou.engine.engine").engine.engine.Engine(cfg, None, "state")
    assert list((tmp_path / "ssd0").iterdir()) == []  # refused before creating anything


def test_a_budget_that_cannot_fit_is_refused_before_the_data_is_tokenized(tmp_path, capsys, monkeypatch):
    """``fuyou train`` on a text file with a CPU budget that cannot fit: the refusal comes from the memory
    plan before any token is made (a large corpus took its tokenization time to be told), and with the
    budget fixed the same command trains."""
    import fuyou.train.records as records

    ssd, corpus = tmp_path / "ssd", tmp_path / "corpus.txt"
    ssd.mkdir()
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    tokenized = []
    real = records.load_data
    monkeypatch.setattr(records, "load_data", lambda cfg, **kw: tokenized.append(1) or real(cfg, **kw))
    args = ["train", "--offload", "ssd", "--ssd", str(ssd), "--out", str(tmp_path / "runs"), "data.source=text",
            f"data.path={corpus}", "model.preset=gpt-test", "model.n_layer=4", "data.seq_len=32", "train.steps=1", "train.eval_every=0"]
    assert main([*args, "--cpu-mem", "1MiB"]) == 2
    assert "CPU memory budget 1.00 MiB cannot hold" in capsys.readouterr().err
    assert tokenized == [] and list(ssd.iterdir()) == []
    assert main([*args, "--cpu-mem", "256MiB"]) == 0
    assert tokenized == [1]


@pytest.mark.parametrize("policy", ["fc2,proj=cpu", "all=cpu"])
def test_the_budget_a_refusal_names_is_enough_with_a_cpu_tier_policy(tmp_path, policy):
    """The activations' cpu tier takes a quarter of the budget by default, up to what the policy keeps
    there: the least budget the refusal names fits, first time (a new-user pass raised the budget to
    the named figure three times, the share growing with it). With "all=cpu" the quarter binds."""
    import re

    from fuyou.engine.engine import Engine
    from fuyou.units import parse_size

    opts = ["offload.mode=ssd", "model.n_layer=4", "train.micro_batch_size=4", "data.seq_len=64",
            f"offload.act_policy={policy}"]
    with pytest.raises(BudgetError) as e:
        Engine(make_cfg(tmp_path, *opts, "offload.cpu_mem=1MiB"), None, "state")
    least = parse_size(re.search(r"to at least ([\d.]+ [KMG]iB)", str(e.value)).group(1).replace(" ", ""))
    Engine(make_cfg(tmp_path, *opts, f"offload.cpu_mem={least + 2**14}"), None, "state").close()  # (3 digits)
    with pytest.raises(BudgetError):
        Engine(make_cfg(tmp_path, *opts, f"offload.cpu_mem={int(least * 0.98)}"), None, "state")
    # the figure before the items is what they sum to at the refused budget, not called "the minimum" (a pass
    # retried at it and was refused again)
    assert "the engine's minimum" not in str(e.value) and "the engine needs at that budget" in str(e.value)


def test_a_refusal_names_what_lowers_its_largest_items(tmp_path):
    """The advice named prefetch_depth and optimizer_chunk whatever the items were: under LoRA, which has no
    optimizer buffers, too, and never offload.act_cpu_mem where that was the cause (a pass)."""
    from fuyou.engine.engine import Engine

    opts = ["offload.mode=ssd", "model.n_layer=4", "train.micro_batch_size=4", "data.seq_len=64"]
    with pytest.raises(BudgetError) as e:
        Engine(make_cfg(tmp_path, *opts, "offload.act_policy=fc2,proj=cpu", "offload.act_cpu_mem=2GiB",
                        "offload.cpu_mem=500MiB"), None, "state")
    assert "the engine's minimum of" in str(e.value)
    assert "or lower what takes the most: offload.act_cpu_mem; " in str(e.value)
    with pytest.raises(BudgetError) as e:
        Engine(make_cfg(tmp_path, *opts, "lora.rank=8", "lora.targets=all-linear", "offload.cpu_mem=1MiB"), None,
               "state")
    assert "optimizer_chunk" not in str(e.value) and "or lower what takes the most: " in str(e.value)


def _refused_budget(tmp_path, capsys, *flags) -> tuple[str, Path]:
    """A small offloaded run with ``flags`` that must be refused: its error, and the SSD directory."""
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    rc = main(["train", "--offload", "ssd", "--ssd", str(ssd), *flags, "--out", str(tmp_path / "runs"),
               "model.preset=gpt-test", "data.seq_len=32", "train.steps=1"])
    assert rc == 2
    return capsys.readouterr().err, ssd


def test_stage_larger_than_device_budget_is_refused(tmp_path, capsys):
    err, ssd = _refused_budget(tmp_path, capsys, "--gpu-mem", "64KiB", "train.device=fake")
    assert "device memory budget 64.00 KiB cannot hold one stage's working set" in err and "offload.gpu_mem" in err
    assert not (tmp_path / "runs").exists() and list(ssd.iterdir()) == []


def test_a_gpu_budget_with_the_compute_on_the_cpu_is_ignored_and_said_so(tmp_path, capsys):
    """A pass: --gpu-mem with no GPU held a "device plan" of the CPU's own compute items to it, in silence."""
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    assert main(["train", "--offload", "ssd", "--ssd", str(ssd), "--gpu-mem", "64KiB", "--out", str(tmp_path / "runs"),
                 "model.preset=gpt-test", "data.seq_len=32", "train.steps=1", "train.device=cpu"]) == 0
    err = capsys.readouterr().err
    assert "offload.gpu_mem (--gpu-mem) is a GPU's budget and is ignored: the compute runs on the CPU" in err
    assert "device budget unlimited" in err  # (as without --gpu-mem)


def test_budget_without_unit_gets_a_hint(tmp_path, capsys):
    """`--cpu-mem 12` is 12 bytes (sizes without a unit are bytes); the refusal says what was probably meant."""
    err, _ = _refused_budget(tmp_path, capsys, "--cpu-mem", "12")
    assert "CPU memory budget 12 B (a size without a unit is bytes: did you mean 12GiB?)" in err
    assert not (tmp_path / "runs").exists()


def test_missing_ssd_directory_is_refused(tmp_path, capsys):
    rc = main(["train", "--offload", "ssd", "--ssd", str(tmp_path / "nope"), "train.steps=1"])
    assert rc == 2
    assert "SSD directory" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--offload", "ssd", "--ssd", str(tmp_path / "afile"), "train.steps=1"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_an_ssd_directory_inside_a_runs_state_is_refused(tmp_path, capsys):
    """A new-user pass gave a run's state directory as another run's --ssd: when the first run finished, it
    deleted its state directory, and with it the second run's committed state."""
    nested = tmp_path / "ssd" / "x.fuyou-state" / "sub"
    nested.mkdir(parents=True)
    for d in (nested.parent, nested, tmp_path / "ssd" / "x.fuyou-state.rank1"):
        d.mkdir(exist_ok=True)
        rc = main(["train", "--offload", "ssd", "--ssd", str(d), "--out", str(tmp_path / "runs"), "train.steps=1"])
        assert rc == 2
        assert "a run's SSD state, which fuyou deletes when that run ends" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_ssd_too_small_is_refused(tmp_path):
    """A directory without the space the state needs: refused with the missing amount (a 1 MiB tmpfs
    is not available unprivileged, so use a model far larger than the disk)."""
    cfg = make_cfg(tmp_path, "offload.mode=ssd", "model.preset=gpt3-175b", "offload.cpu_mem=64GiB",
                   "train.precision=bf16", "data.source=synthetic", "data.seq_len=16", "train.micro_batch_size=1")
    with pytest.raises(BudgetError, match="missing"):
        __import__("fuyou.engine.engine").engine.engine.Engine(cfg, None, "state")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trace_and_metrics_from_the_cli(tmp_path, capsys, precision):
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    trace = tmp_path / "trace.json"
    rc = main(["train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "512MiB", "--out", str(tmp_path / "runs"),
               "--trace", str(trace), "model.preset=gpt-test", "train.steps=3", "train.grad_clip=none",
               "offload.cache_weights=false", "offload.resident_mem=0", "data.seq_len=32", "train.micro_batch_size=2",
               "train.eval_batches=1", f"train.precision={precision}"])
    assert rc == 0, capsys.readouterr().err
    events = json.loads(trace.read_text())["traceEvents"]
    cats = {e.get("cat") for e in events if e["ph"] == "X"}
    assert {"compute", "ssd-read", "cpu-adam", "ssd-write"} <= cats  # (the SSD writes were missing)
    writes = [e for e in events if e.get("cat") == "ssd-write"]
    assert all(e["args"]["bytes"] > 0 for e in writes)
    # bf16 compute writes a compute copy of the weights; in fp32 the master is it, and only it is written
    assert any("weights" in e["name"] for e in writes) == (precision == "bf16"), sorted({e["name"] for e in writes})
    assert any(re.fullmatch(r"write [\w.]+/master\.\d", e["name"]) for e in writes)
    reads = [e for e in events if e.get("cat") == "ssd-read"]  # the weights' and, no state resident, the optimizer's
    assert all(e["args"]["bytes"] > 0 for e in reads)
    names = sorted(e["name"] for e in reads)
    assert any(n.startswith("read weights ") for n in names), names
    for part in ("master", "exp_avg", "exp_avg_sq"):  # a stage's state is "STAGE/PART.COPY" in the store
        # in fp32 the master is the weights, which backward read and handed to the update: no update reads it
        # (engine.py, Note: [Master in memory]); under bf16 the fp32 master is read
        want = part != "master" or precision == "bf16"
        assert any(re.fullmatch(rf"read [\w.]+/{part}\.\d", n) for n in names) == want, (part, names)
    rows: dict = {}  # a row's events apart in time: overlapping ones (threads writing at once) were dropped or
    for e in sorted((e for e in events if e["ph"] == "X"), key=lambda e: e["ts"]):  # garbled by Perfetto (a pass)
        assert e["ts"] >= rows.get(e["tid"], float("-inf")) - 1e-3, e
        rows[e["tid"]] = e["ts"] + e["dur"]
    named = {e["tid"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert set(rows) <= named
    adam = [e for e in events if e.get("cat") == "cpu-adam"]
    # every stage's update (the previous step's last updates may overlap into the traced step too)
    assert {e["name"] for e in adam} == {"adam embed", "adam block.0", "adam block.1", "adam head"}
    assert all(e["args"]["written_bytes"] > 0 for e in adam)
    (run_dir,) = (tmp_path / "runs").iterdir()
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(l for l in lines if "loss" in l)
    for key in ("compute_s", "wait_weights_s", "wait_optimizer_s", "ssd_read_bytes", "ssd_write_bytes", "tflops"):
        assert key in step
    assert step["ssd_write_bytes"] > 0
    assert (run_dir / "model.safetensors").stat().st_size > 0
    assert list(ssd.iterdir()) == []  # state deleted after saving (offload.keep_state=false)
    err = capsys.readouterr().err
    assert "wait w/opt" in err and "ssd r/w" in err
    # a run of one step, and a resume, write their trace too (both were skipped in silence)
    one = tmp_path / "one.json"
    assert main(["train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "512MiB", "--out", str(tmp_path / "runs"),
                 "--trace", str(one), "model.preset=gpt-test", "train.steps=1", "data.seq_len=32",
                 "train.micro_batch_size=2", "train.eval_batches=1", "run.name=one", "offload.keep_state=true",
                 "run.save_weights=false"]) == 0
    assert "wrote a trace of step 1" in capsys.readouterr().err and one.is_file()
    again = tmp_path / "again.json"
    assert main(["train", "--resume", str(tmp_path / "runs" / "one"), "--trace", str(again), "train.steps=2"]) == 0
    assert "wrote a trace of step 2" in capsys.readouterr().err and again.is_file()
    # a trace that cannot be written (a full disk) is a warning: it ended the run in a traceback (a pass)
    from fuyou.engine.engine import Engine

    def full(self, path):
        raise OSError(28, "No space left on device")

    mp = pytest.MonkeyPatch()
    mp.setattr(Engine, "write_trace", full)
    try:
        assert main(["train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "512MiB", "--out",
                     str(tmp_path / "runs"), "--trace", str(tmp_path / "full.json"), "model.preset=gpt-test",
                     "train.steps=2", "data.seq_len=32", "train.micro_batch_size=2", "train.eval_batches=1",
                     "run.name=full"]) == 0
    finally:
        mp.undo()
    err = capsys.readouterr().err
    assert "could not be written" in err and "No space left on device" in err and "training goes on" in err


def test_saved_weights_equal_reference(tmp_path):
    """The safetensors written from the SSD store equal the in-memory run's."""
    from safetensors.torch import load_file
    import torch

    outs = {}
    for mode in ("none", "ssd"):
        ssd = tmp_path / f"ssd-{mode}"
        ssd.mkdir()
        args = ["train", "--out", str(tmp_path / f"runs-{mode}"), "model.preset=llama-test", "train.steps=2",
                "train.precision=fp32", "data.seq_len=32", "train.micro_batch_size=2", "train.eval_batches=1"]
        if mode == "ssd":
            args += ["--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "256MiB", "offload.optimizer_chunk=1"]
        assert main(args) == 0
        (run_dir,) = (tmp_path / f"runs-{mode}").iterdir()
        outs[mode] = load_file(str(run_dir / "model.safetensors"))
    assert outs["none"].keys() == outs["ssd"].keys()
    for k in outs["none"]:
        assert torch.equal(outs["none"][k], outs["ssd"][k]), k


def test_an_earlier_runs_state_is_named_before_the_data_is_tokenized(tmp_path, capsys, monkeypatch):
    """A new run whose SSD directory holds an earlier run's committed state of the same name is refused
    before its data is tokenized (a new-user pass waited 6 s on a 28 MB chat file to be told)."""
    import fuyou.train.records as records

    ssd, corpus = tmp_path / "ssd", tmp_path / "corpus.txt"
    ssd.mkdir()
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    base = ["train", "--offload", "ssd", "--ssd", str(ssd), "model.preset=gpt-test", "data.seq_len=32",
            "train.steps=1", "train.eval_every=0", "run.name=x"]
    assert main([*base, "--out", str(tmp_path / "a"), "offload.keep_state=true", "run.save_weights=false"]) == 0
    tokenized = []
    real = records.load_data
    monkeypatch.setattr(records, "load_data", lambda cfg: tokenized.append(1) or real(cfg))
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "b"), "data.source=text", f"data.path={corpus}"]) == 2
    assert f"holds the committed SSD state of the run in {(tmp_path / 'a' / 'x').resolve()}" in capsys.readouterr().err
    assert tokenized == []


def test_a_config_mistake_is_named_before_a_budget_refusal(tmp_path, capsys):
    """A sequence longer than GPT's position table is the error to fix, not the budget that length
    would need (the review found the budget refusal first, its figures for the impossible length)."""
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    rc = main(["train", "--offload", "ssd", "--ssd", str(ssd), "--out", str(tmp_path / "runs"), "--cpu-mem", "1MiB",
               "model.preset=gpt-test", "data.seq_len=128", "train.steps=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "data.seq_len=128 exceeds model.max_seq_len=64" in err and "budget" not in err


def test_a_new_run_over_a_live_runs_state_is_not_told_to_resume_it(tmp_path):
    """Two `fuyou train` of one name started at once: the second was told to `--resume` the first, which
    was still training (the resume then met the lock)."""
    import os
    from types import SimpleNamespace

    from fuyou.engine.commit import RECORD
    from fuyou.engine.state import refuse_committed_state
    from fuyou.errors import ConfigError
    from fuyou.store.lock import lock_dirs, lock_holder, unlock

    d = tmp_path / "x.fuyou-state"
    d.mkdir()
    (d / RECORD).write_text("{}")
    cfg = SimpleNamespace(offload=SimpleNamespace(replace_state=False), run=SimpleNamespace(name="x"))
    fds = lock_dirs([d])
    try:
        assert lock_holder(d) == str(os.getpid())
        with pytest.raises(ConfigError, match=f"still training \\(process {os.getpid()}\\); choose another run.name"):
            refuse_committed_state([d], cfg, d.name)
    finally:
        unlock(fds)
    assert lock_holder(d) is None
    with pytest.raises(ConfigError, match="continue it with `fuyou train --resume"):
        refuse_committed_state([d], cfg, d.name)


@pytest.mark.parametrize("extra", [[], ["offload.prefetch_depth=1"], ["model.tie_embeddings=false"]])
def test_the_minimum_a_refusal_names_is_the_least_that_fits(tmp_path, extra):
    """The refusal named the minimum with nothing cached: streaming a large embedding needs weight buffers
    sized for it, and caching it instead needs less (a pass: refused ~5-15 % below what would fit). The
    minimum named fits, and 1 % less does not."""
    import re

    from fuyou.data import load_data
    from fuyou.engine.engine import Engine

    def refusal(mem: int):
        cfg = make_cfg(tmp_path, "model.preset=gpt-tiny", "model.vocab_size=32000", "data.seq_len=64",
                       f"offload.cpu_mem={mem}", "offload.mode=ssd", *extra)
        try:
            Engine(cfg, load_data(cfg.data), f"m{mem}").close()
            return None
        except BudgetError as e:
            return str(e)

    named = re.search(r"to at least ([\d.]+) MiB", refusal(40 * 2**20))
    least = int(float(named.group(1)) * 2**20) + 2**20 // 100  # (its rounding up to 0.01 MiB)
    assert refusal(least) is None
    assert refusal(int(least * 0.99)) is not None


@pytest.mark.parametrize("extra", [[], ["optim.master=bf16", "optim.moments=int8"]])
def test_the_space_a_store_asks_for_holds_what_it_writes(tmp_path, extra):
    """The SSD space check asked a constant 64 MiB beyond the tensors: 1.5x what a small state used (a pass),
    and a third of a 175B state's manifest. It now asks for each tensor's 4 KiB padding and the manifest,
    which must hold what a run writes: the data files within the tensors and their padding, the manifest
    within half its share (it is rewritten beside itself), on 2 directories with clipping and commits."""
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine
    from fuyou.store.layout import ALIGN, MANIFEST

    cfg = make_cfg(tmp_path, "model.n_layer=4", "train.grad_clip=1.0", "offload.commit_every=1",
                   "offload.resident_mem=0", *extra, dirs=2)
    eng = Engine(cfg, load_data(cfg.data), "state")
    try:
        for step in range(3):
            eng.train_step(step)
        eng.commit(3)
        ts = eng.ts
        tensors, n = ts.tensor_bytes(), len(ts.specs())
        spread, head = ts.ssd_margin()
        files = [p for d in ts.store_dirs for p in d.iterdir() if p.suffix == ".dat"]
        assert len(files) == 2 and sum(p.stat().st_size for p in files) <= tensors + ALIGN * n < tensors + spread
        assert (ts.store_dirs[0] / MANIFEST).stat().st_size <= head / 2
        assert spread + head < 4 * 2**20  # (it was 64 MiB: 23 times this state)
    finally:
        eng.close()
