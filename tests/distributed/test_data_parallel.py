"""Data parallelism on torch.distributed with gloo (issue 17): several processes train one model.

Every test launches real processes: ``python -m torch.distributed.run`` (torchrun) or, to kill one
rank deterministically, the processes torchrun would start, with its environment. The model has
four blocks, the state streams from the SSD (``offload.resident_mem=0``, no weight cache), exact
clipping is on and triggers, and there are several micro-batches per step.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fuyou.engine.committed import CommittedWeights
from fuyou.errors import ConfigError

pytestmark = pytest.mark.timeout(600)

BASE = ["model.preset=gpt-test", "model.n_layer=4", "data.seq_len=32", "train.micro_batch_size=2",
        "train.precision=fp32", "train.steps=4", "train.eval_every=2", "train.eval_batches=2", "train.log_every=1",
        "train.grad_clip=1.0", "offload.resident_mem=0", "offload.cache_weights=false", "offload.keep_state=true",
        "offload.commit_every=1", "offload.stall_timeout=60"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(tmp_path, name, *extra, ssd=("ssd",)):
    dirs = []
    for d in ssd:
        (tmp_path / d).mkdir(exist_ok=True)
        dirs += ["--ssd", str(tmp_path / d)]
    return ["train", "--offload", "ssd", *dirs, "--cpu-mem", "1GiB", *BASE, f"run.out_dir={tmp_path / 'runs'}",
            f"run.name={name}", *extra]


def env(**kw):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in kw.items()}}
    for k in ("FUYOU_FAULT", "FUYOU_FAULT_RANK", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        if k not in kw:
            e.pop(k, None)
    return e


def single(args, **kw):
    r = subprocess.run([sys.executable, "-m", "fuyou.cli", *args], env=env(**kw), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def torchrun(args, nproc=2, check=True, extra=(), **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *extra, "-m", "fuyou.cli", *args]
    r = subprocess.run(cmd, env=env(**kw), capture_output=True, text=True, timeout=400)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def open_state(run_dir):
    """The last commit's weights and moments, from every rank's state (each holds the stages it owns),
    read as ``fuyou export`` reads a stopped run."""
    with CommittedWeights(run_dir) as cw:
        w, o = {}, {}
        for st in cw.states:
            flat = {role: cw.read(st, role) for role in ("master", "exp_avg", "exp_avg_sq")}
            views = {role: st.views(t) for role, t in flat.items()}
            for n in st.slots:
                k = st.stage.key(n)
                w[k] = views["master"][n].float()
                o[k] = {"exp_avg": views["exp_avg"][n], "exp_avg_sq": views["exp_avg_sq"][n]}
        return cw.step, w, o


def state_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


LR_STEPS = 1e-3 * 4  # optim.lr x train.steps: how far Adam can move a weight in BASE's run


def assert_weights(a, b, exact):
    """Bit-identical, or every weight within 1e-3 of lr x steps: a sum in another order changes the last
    bits of a gradient, and Adam turns a gradient that is only rounding noise (the key bias's: softmax
    ignores it) into full steps of noise (measured: 8.9e-5 of lr x steps at grad_accum=4)."""
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            assert float((a[k] - b[k]).abs().max()) <= 1e-3 * LR_STEPS, k


def assert_states(a, b, exact=True):
    """Weights as ``assert_weights``; moments bit-identical or within 1e-3 of their tensor's largest."""
    (sa, wa, oa), (sb, wb, ob) = a, b
    assert sa == sb
    assert_weights(wa, wb, exact)
    for k in oa:
        for m in ("exp_avg", "exp_avg_sq"):
            x, y = oa[k][m], ob[k][m]
            if exact:
                assert torch.equal(x, y), (k, m)
            else:
                assert float((x - y).abs().max()) <= 1e-3 * float(x.abs().max().clamp_min(1e-30)), (k, m)


def metrics(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("accum,exact", [(2, True), (4, False)])
def test_two_ranks_train_the_model_one_process_trains(tmp_path, accum, exact):
    """The same global batch (grad_accum micro-batches) on one process and on two ranks: with one
    micro-batch per rank the sum of the two ranks' gradients is the reference's two-addend sum, so the
    weights and moments are bit-identical; with two per rank the order of the four addends differs
    (``assert_states``' tolerance). Each rank holds the optimizer state of the stages it owns, about
    half of it."""
    single(train_args(tmp_path, "one", f"train.grad_accum={accum}"))
    r = torchrun(train_args(tmp_path, "two", f"train.grad_accum={accum}"))
    runs = tmp_path / "runs"
    one, two = runs / "one", runs / "two"
    assert "data parallel: rank 0 of 2" in r.stderr and "run directory" in r.stderr
    assert sum(m["exchange_bytes"] for m in metrics(runs / "two") if "loss" in m) > 0  # streamed: weights cross
    assert r.stderr.count("done: 4 steps") == 1  # one progress: rank 0's
    assert_weights(load_file(one / "model.safetensors"), load_file(two / "model.safetensors"), exact)
    m1, m2 = metrics(one), metrics(two)
    steps1 = [m for m in m1 if "loss" in m]
    steps2 = [m for m in m2 if "loss" in m]
    assert [m["step"] for m in steps2] == [1, 2, 3, 4]
    assert all(m["grad_norm"] > 1.0 for m in steps2[:1])  # the first step clipped: the redo path ran
    for x, y in zip(steps1, steps2):
        assert x["tokens"] == y["tokens"] and x["loss_tokens"] == y["loss_tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=0) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    evals1, evals2 = [m["eval_loss"] for m in m1 if "eval_loss" in m], [m["eval_loss"] for m in m2 if "eval_loss" in m]
    assert evals2 == pytest.approx(evals1, rel=1e-6)
    ssd = tmp_path / "ssd"
    assert_states(open_state(one), open_state(two), exact)
    assert sorted(p.name for p in ssd.iterdir()) == ["one.fuyou-state", "two.fuyou-state", "two.fuyou-state.rank1"]
    whole = state_bytes(ssd / "one.fuyou-state")
    r0, r1 = state_bytes(ssd / "two.fuyou-state"), state_bytes(ssd / "two.fuyou-state.rank1")
    # each rank: the masters and moments of its stages plus the compute weights of the others' (1/3 of fp32's)
    assert max(r0, r1) < 0.8 * whole, (r0, r1, whole)


def test_each_rank_owns_its_ssd_directories_and_its_share_of_the_cpu_budget(tmp_path):
    r = torchrun(train_args(tmp_path, "dirs", "train.grad_accum=2", "train.steps=1", ssd=("a", "b")))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["dirs.fuyou-state"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["dirs.fuyou-state.rank1"]
    assert "CPU budget 512.00 MiB" in r.stderr and "(1/2)" in r.stderr  # --cpu-mem 1GiB per machine, 2 ranks


def rank_procs(tmp_path, args, fault_rank=None, fault=None, world=2):
    """The processes torchrun starts, with its environment (so that one can be killed alone). ``args``: every
    rank's, or a list of each rank's (a command line per machine)."""
    port, procs = free_port(), []
    each = args if isinstance(args[0], list) else [args] * world
    for r, args in enumerate(each):
        kw = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=r, WORLD_SIZE=world, LOCAL_RANK=r,
                  LOCAL_WORLD_SIZE=world)
        if fault:
            kw.update(FUYOU_FAULT=fault, FUYOU_FAULT_RANK=fault_rank)
        procs.append(subprocess.Popen([sys.executable, "-m", "fuyou.cli", *args], env=env(**kw),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_a_dead_rank_stops_the_others_with_a_sentence_and_resume_is_exact(tmp_path):
    """Rank 1 is killed (SIGKILL) in the backward of step 3: rank 0 stops within a bounded time with a
    sentence naming what failed, not a hang; the committed state (step 2) resumes under torchrun and
    ends bit-identical to an uninterrupted two-rank run."""
    torchrun(train_args(tmp_path, "whole", "train.grad_accum=2"))
    args = train_args(tmp_path, "cut", "train.grad_accum=2")
    t0 = time.monotonic()
    procs = rank_procs(tmp_path, args, fault_rank=1, fault="backward@2")
    outs = [p.communicate(timeout=180) for p in procs]
    took = time.monotonic() - t0
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode not in (0, None), outs[0][1][-3000:]
    err = outs[0][1]
    assert "another rank stopped" in err and "Traceback" not in err, err[-3000:]
    assert f"--resume {tmp_path / 'runs' / 'cut'}`" in err, err[-3000:]  # the run's own directory
    assert took < 120
    run = tmp_path / "runs" / "cut"
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2]
    torchrun(["train", "--resume", str(run)])
    assert_states(open_state(tmp_path / "runs" / "whole"), open_state(run))
    a, b = load_file(tmp_path / "runs" / "whole" / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Ctrl-C reaches the ranks at different moments (here: only rank 1): they agree at the step
    boundary, commit the same step and stop; the resume finishes the run."""
    args = train_args(tmp_path, "sig", "train.grad_accum=2", "train.steps=400", "train.eval_every=0")
    procs = rank_procs(tmp_path, args)
    run = tmp_path / "runs" / "sig"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for a few steps
        if (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3:
            break
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGINT)
    outs = [p.communicate(timeout=120) for p in procs]
    # a stopped run is not a finished one: 128 + SIGINT on both ranks, which agree on the signal's name (the
    # other said SIGTERM's, and torchrun named it the root cause: a pass)
    assert [p.returncode for p in procs] == [128 + signal.SIGINT] * 2, outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "stopped by SIGINT on another rank after step" in outs[0][1]
    assert f"continue with: torchrun --nproc_per_node=2 -m fuyou.cli train --resume {run}" in outs[0][1]
    stopped = [m for m in metrics(run) if "stopped" in m]
    assert len(stopped) == 1 and stopped[0]["step"] < 400
    assert open_state(run)[0] == stopped[0]["step"]  # both ranks' records name it (else CommittedWeights refuses)
    end = stopped[0]["step"] + 2  # the resume finishes a shorter run (a resume may change train.steps)
    torchrun(["train", "--resume", str(run), f"train.steps={end}"])
    assert [m["step"] for m in metrics(run) if "loss" in m][-1] == end


def test_two_machines_on_loopback(tmp_path):
    """Two torchrun launches (--nnodes=2), one rank each, meeting through torchrun's rendezvous: each
    "machine" keeps its own state, rank 0 the run directory; the model is the one-process model."""
    port = free_port()
    args = train_args(tmp_path, "nodes", "train.grad_accum=2", "train.steps=2")
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "fuyou.cli", *args]
        procs.append(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    single(train_args(tmp_path, "one", "train.grad_accum=2", "train.steps=2"))
    a = load_file(tmp_path / "runs" / "one" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "nodes" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "rank 0 of 2 (1 on this machine)" in outs[0][1] + outs[1][1]



def test_ranks_started_with_different_settings_are_refused(tmp_path):
    """Two machines, each with its own command line: another learning rate on one trained to other weights in
    silence, another model hung (a hostile pass). Every rank refuses, naming the settings; paths and budgets
    may differ."""
    port = free_port()
    procs = []
    for node, (budget, *extra) in enumerate([("1GiB",), ("900MiB", "optim.lr=0.01", "model.n_layer=6")]):
        args = train_args(tmp_path, "unlike", "train.grad_accum=2", "train.steps=2", ssd=(f"ssd{node}",)) + extra
        args[args.index("1GiB")] = budget  # (an option given twice is refused)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "fuyou.cli", *args]
        procs.append(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] != [0, 0]
    for _, err in outs:
        assert "the ranks were started with different settings: rank 1: model.n_layer=6 (rank 0: 4), " \
               "optim.lr=0.01 (rank 0: " in err, err[-3000:]
    assert not (tmp_path / "runs" / "unlike").exists()  # refused before anything was written


def test_ranks_whose_devices_auto_resolves_differently_are_told_so(tmp_path):
    """The same command on two machines, one computing bf16 natively (simulated: its bf16_native patched), one
    not: train.precision=auto chose bf16 on one and fp32 on the other, and the refusal said the ranks had been
    given different settings, which they had not (a pass). It says auto chose by the device, and what to give."""
    port = free_port()
    procs = []
    for node, native in enumerate((False, True)):  # (rank 0's machine without native bf16, whatever this one is)
        script = tmp_path / f"native_{native}.py"
        script.write_text(f"import sys\nfrom fuyou.models import precision\nprecision.bf16_native = lambda kind: "
                          f"{native}\nfrom fuyou.cli import main\nsys.exit(main(sys.argv[1:]))\n")
        args = train_args(tmp_path, "mixed", "train.grad_accum=2", "train.steps=1", ssd=(f"ssd{node}",))
        args = [a for a in args if not a.startswith("train.precision=")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--master_addr=127.0.0.1", f"--master_port={port}", str(script), *args]
        procs.append(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] != [0, 0]
    for _, err in outs:
        assert "rank 1: train.precision='bf16' (rank 0: 'fp32')" in err, err[-3000:]
        assert "train.precision=auto chooses by each machine's device" in err, err[-3000:]
    assert not (tmp_path / "runs" / "mixed").exists()


def test_ranks_that_read_different_data_are_refused_and_equal_spellings_are_not(tmp_path):
    """data.path may differ between machines (each has its own copy), so the settings did not catch two
    different files: each rank trained on its own in silence. The ranks now compare the data's fingerprint.
    And settings that act the same but are spelled differently (600s and 10min) were refused."""
    files = []
    for node, text in enumerate(["the cat sat on the mat. " * 400, "a dog ran in the park. " * 400]):
        files.append(tmp_path / f"data{node}.txt")
        files[-1].write_text(text)

    def launch(name, per_node):
        port, procs = free_port(), []
        for node, extra in enumerate(per_node):
            args = train_args(tmp_path, name, "train.grad_accum=2", "train.steps=2",
                              ssd=(f"{name}{node}",)) + list(extra)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                   "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "fuyou.cli", *args]
            procs.append(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        return procs, [p.communicate(timeout=300) for p in procs]

    procs, outs = launch("other", [(f"data.path={files[0]}",), (f"data.path={files[1]}",)])
    assert [p.returncode for p in procs] != [0, 0]
    for _, err in outs:
        assert "the ranks read different data" in err and "Traceback" not in err.split("fuyou: error")[0], err[-3000:]
    procs, outs = launch("same", [(f"data.path={files[0]}", "offload.commit_every=600s"),
                                  (f"data.path={files[0]}", "offload.commit_every=10min")])
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-3000:]


def test_what_data_parallelism_refuses(tmp_path):
    """A global batch that does not split evenly, and a resume at another world size, are refused
    with a sentence before anything is written or opened."""
    r = torchrun(train_args(tmp_path, "odd", "train.grad_accum=3"), check=False)
    assert r.returncode != 0 and "not a multiple of the 2 ranks" in r.stderr
    assert "fuyou: error (rank 0 of 2): " in r.stderr and "fuyou: error (rank 1 of 2): " in r.stderr  # whose is whose
    assert r.stderr.count("Traceback") == 1 and "ChildFailedError" in r.stderr  # torchrun's own report, not ours
    assert not (tmp_path / "runs" / "odd").exists()
    torchrun(train_args(tmp_path, "two", "train.grad_accum=2", "train.steps=1", "run.save_weights=false"))
    r = subprocess.run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(tmp_path / "runs" / "two")],
                       env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "trained by 2 process(es)" in r.stderr and "Traceback" not in r.stderr
    # --cpu-mem is the machine's: a refusal names the machine's minimum (it named one rank's, refused again)
    import re

    small = ("train.grad_accum=2", "train.steps=1", "run.save_weights=false")
    r = torchrun(train_args(tmp_path, "small", *small, "offload.cpu_mem=64MiB"), check=False)
    assert r.returncode != 0 and "(this rank's 1/2 of offload.cpu_mem, which the 2 ranks" in r.stderr, r.stderr
    least = re.search(r"to at least ([\d.]+) MiB \(2 x ([\d.]+) MiB\)", r.stderr)
    assert least and float(least.group(1)) >= 2 * float(least.group(2)) - 0.01, r.stderr
    r = torchrun(train_args(tmp_path, "small2", *small, f"offload.cpu_mem={least.group(1)}MiB"))
    assert "(rank 0; a machine's 2 ranks together" in r.stderr  # the end summary counts the machine's ranks
    # three SSD directories for two ranks: the third went unused in silence
    r = torchrun(train_args(tmp_path, "three", *small, ssd=("d1", "d2", "d3")), check=False)
    assert r.returncode != 0 and "3 --ssd directories among the 2 processes of this machine" in r.stderr
    # the ranks of a machine map one weight cache or none: one without it hung the other (a pass)
    procs = rank_procs(tmp_path, [train_args(tmp_path, "cache", *small, f"offload.cache_weights={c}")
                                  for c in ("true", "false")])
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode not in (0, None) for p in procs)
    assert all("offload.cache_weights=False (rank 0: True)" in err for _, err in outs), outs[0][1][-2000:]


@pytest.mark.parametrize("extra,saved", [
    (("train.device=fake", "model.preset=llama-test", "train.precision=bf16"), "model.safetensors"),
    (("lora.rank=4", "lora.targets=all-linear", "model.preset=llama-test"), "adapter.safetensors"),
])
def test_two_ranks_through_the_device_paths_and_with_lora(tmp_path, extra, saved):
    """The CUDA code paths (the fake device: gradients leaving the device, the tied and untied heads'
    sums), in bf16, and LoRA (a frozen base: the adapters' gradients are summed, their optimizer is
    replicated) give what one process gives, bit for bit, with one micro-batch per rank."""
    single(train_args(tmp_path, "one", "train.grad_accum=2", *extra))
    torchrun(train_args(tmp_path, "two", "train.grad_accum=2", *extra))
    a, b = load_file(tmp_path / "runs" / "one" / saved), load_file(tmp_path / "runs" / "two" / saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def shm_caches() -> set[str]:
    from fuyou.store.shared import SHM_DIR

    return {p.name for p in SHM_DIR.glob("fuyou-cache-*")} if SHM_DIR.is_dir() else set()


@pytest.mark.parametrize("extra, saved", [
    ((), "model.safetensors"),
    (("train.device=fake", "model.preset=llama-test", "train.precision=bf16"), "model.safetensors"),
    # rank 0 fills it, here with an int8 base (the packed stages: fuyou/models/quant.py)
    (("lora.rank=4", "lora.targets=all-linear", "model.preset=llama-test", "lora.base=int8"), "adapter.safetensors"),
])
def test_the_ranks_of_one_machine_share_one_weight_cache(tmp_path, extra, saved):
    """With the weight cache on (the default), the ranks of a machine map one cache (fuyou/store/shared.py):
    each stage's owner writes its new weights there, the exchange sends a token. Bit-identical to one
    process (and, on the CPU, a rank killed mid-step resumes to the uninterrupted run's state); each
    rank is charged half the cache; nothing stays under /dev/shm."""
    before = shm_caches()
    cache = ("train.grad_accum=2", "offload.cache_weights=true", *extra)
    single(train_args(tmp_path, "one", *cache))
    r = torchrun(train_args(tmp_path, "two", *cache))
    assert "the weight cache is one for the 2 ranks of this machine" in r.stderr, r.stderr[-3000:]
    assert "stages; this rank's 1/2 of one cache the ranks share)" in r.stderr  # each charged half
    a, b = load_file(tmp_path / "runs" / "one" / saved), load_file(tmp_path / "runs" / "two" / saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [m for m in metrics(tmp_path / "runs" / "two") if "loss" in m]
    assert steps and all(m["exchange_bytes"] == 0 for m in steps)  # every stage cached: tokens only
    assert shm_caches() == before
    lora = saved == "adapter.safetensors"
    if "train.device=fake" in extra:
        return
    if not lora:  # a rank killed between the cache's creation and the removal of its name: the other stops, nothing stays
        procs = rank_procs(tmp_path, train_args(tmp_path, "early", *cache), fault_rank=1, fault="map_cache")
        outs = [p.communicate(timeout=180) for p in procs]
        assert procs[1].returncode == -signal.SIGKILL and procs[0].returncode not in (0, None), outs[0][1][-3000:]
        assert "shared weight cache" in outs[0][1] and "Traceback" not in outs[0][1], outs[0][1][-3000:]
        assert shm_caches() == before
    args = train_args(tmp_path, "cut", *cache)
    procs = rank_procs(tmp_path, args, fault_rank=1, fault="backward@2")
    outs = [p.communicate(timeout=180) for p in procs]
    assert procs[1].returncode == -signal.SIGKILL, outs[1][1][-3000:]
    assert procs[0].returncode not in (0, None), outs[0][1][-3000:]
    assert shm_caches() == before  # unlinked once mapped: a crash leaves nothing
    run = tmp_path / "runs" / "cut"
    torchrun(["train", "--resume", str(run)])  # (LoRA: rank 0 refills the base's cache from its store)
    if lora:
        a, b = load_file(tmp_path / "runs" / "two" / saved), load_file(run / saved)
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert_states(open_state(tmp_path / "runs" / "two"), open_state(run))


@pytest.mark.parametrize("extra,saved,step", [
    ((), "model.safetensors", 3),
    (("lora.rank=4", "lora.targets=all-linear", "model.preset=llama-test"), "adapter.safetensors", 3),
    ((), "model.safetensors", 0),
    (("lora.rank=4", "model.preset=llama-test"), "adapter.safetensors", 0),
])
def test_a_rank_killed_between_the_ranks_commit_records_resumes_at_the_newer_commit(tmp_path, extra, saved, step):
    """Rank 1 is killed while writing its record of step 3, after every rank synced step 3's state (the
    commit barrier) and rank 0 wrote its record: the records differ by a commit. The resume rewrites
    rank 1's record from its store (its step-3 state is complete) and ends bit-identical to an
    uninterrupted run (a new-user pass found this run refused forever, "start a new run"). Killed writing
    its first record (step 0's) it has none: rank 0 said "start it again", which the run directory refused,
    and the resume was refused ("no commit record"); now rank 0 names the resume, which writes the record."""
    torchrun(train_args(tmp_path, "whole", "train.grad_accum=2", *extra))
    args = train_args(tmp_path, "cut", "train.grad_accum=2", *extra)
    procs = rank_procs(tmp_path, args, fault_rank=1, fault=f"commit@{step}")
    outs = [p.communicate(timeout=300) for p in procs]
    assert procs[1].returncode == -signal.SIGKILL, outs[1][1][-2000:]
    run = tmp_path / "runs" / "cut"
    assert f"--resume {run}" in outs[0][1], outs[0][1][-2000:]
    records = [json.loads(p.read_text())["step"] for p in sorted((tmp_path / "ssd").rglob("fuyou-commit.json"))
               if "cut" in str(p)]
    assert sorted(records) == ([2, 3] if step else [0]), records  # rank 0's is the step's, rank 1's one behind
    r = torchrun(["train", "--resume", str(run)])
    assert "its record was rewritten" in r.stderr
    a, b = load_file(tmp_path / "runs" / "whole" / saved), load_file(run / saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rank_0_killed_before_the_run_directory_leaves_a_run_that_starts_again(tmp_path):
    """Rank 0 killed writing its step-0 record, before it made the run directory: rank 1 (step 0 committed)
    advised `--resume` of a directory that never existed, and starting again was refused by rank 1's
    state ("continue it with --resume"), in a loop (review). Now rank 1 says start again, and it starts."""
    args = train_args(tmp_path, "cut", "train.grad_accum=2")
    procs = rank_procs(tmp_path, args, fault_rank=0, fault="commit@0")
    outs = [p.communicate(timeout=300) for p in procs]
    assert procs[0].returncode == -signal.SIGKILL, outs[0][1][-2000:]
    assert "start it again" in outs[1][1] and "--resume" not in outs[1][1], outs[1][1][-2000:]
    assert not (tmp_path / "runs" / "cut").exists()
    r = torchrun(args)
    assert "removing the initial (its run's directory was never made) SSD state" in r.stderr


def test_rank_0_killed_after_the_run_directory_leaves_a_run_to_resume(tmp_path):
    """Rank 0 killed once it made the run directory and its records, before it told rank 1: step 0 is committed
    on every rank and the directory is whole, so rank 1 names the resume (it said "nothing was started"), and the
    resume ends bit-identical to an uninterrupted run."""
    torchrun(train_args(tmp_path, "whole", "train.grad_accum=2"))
    args = train_args(tmp_path, "cut", "train.grad_accum=2")
    procs = rank_procs(tmp_path, args, fault_rank=0, fault="run_dir")
    outs = [p.communicate(timeout=300) for p in procs]
    assert procs[0].returncode == -signal.SIGKILL, outs[0][1][-2000:]
    run = tmp_path / "runs" / "cut"
    assert f"--resume {run}" in outs[1][1] and "after it made the run directory" in outs[1][1], outs[1][1][-2000:]
    torchrun(["train", "--resume", str(run)])
    a, b = load_file(tmp_path / "runs" / "whole" / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_directory_taken_meanwhile_leaves_no_rank_s_state(tmp_path):
    """Another process makes the run's directory between rank 0's check and its own: every rank's state, made
    for a run that never was, is removed (rank 1's was left committed, named later as another run's: a pass),
    and every rank says why rather than waiting on rank 0."""
    taken = ("import sys; from fuyou.train import loop; real = loop.make_run_dir\n"
             "def make(cfg, path, rid):\n    path.mkdir(parents=True)\n    return real(cfg, path, rid)\n"
             "loop.make_run_dir = make\nfrom fuyou.cli import main\nsys.exit(main(sys.argv[1:]))")
    port, procs = free_port(), []
    for r in range(2):
        kw = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=r, WORLD_SIZE=2, LOCAL_RANK=r, LOCAL_WORLD_SIZE=2)
        args = train_args(tmp_path, "race", "train.grad_accum=2")
        procs.append(subprocess.Popen([sys.executable, "-c", taken, *args], env=env(**kw),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [o[1][-2000:] for o in outs]
    assert "already exists" in outs[0][1], outs[0][1][-2000:]
    assert "rank 0 refused the run (making the run directory)" in outs[1][1], outs[1][1][-2000:]
    assert list((tmp_path / "ssd").iterdir()) == []


@pytest.mark.parametrize("killed", [1, 0])
def test_a_rank_killed_after_the_final_save_leaves_no_state_that_asks_to_be_resumed(tmp_path, killed):
    """A rank is killed after rank 0 saved the weights (the barrier before the states are deleted): the other
    finishes and removes its state, the killed one's stays. A resume said to one rank that the state was never
    committed or deleted and to the other that its commit was intact ("continue with --resume"), in a loop
    (rank 1 killed: a first pass; rank 0 killed, which alone decided whether the run finished: a second).
    Now every rank says the run finished, and the leftover state is removed."""
    args = [a for a in train_args(tmp_path, "cut", "train.grad_accum=2") if a != "offload.keep_state=true"]
    procs = rank_procs(tmp_path, args, fault_rank=killed, fault="saved")
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [0, 0]
    codes[killed] = -signal.SIGKILL
    assert [p.returncode for p in procs] == codes, outs[1 - killed][1][-2000:]
    assert [p.name for p in (tmp_path / "ssd").iterdir()] == ["cut.fuyou-state" + (".rank1" if killed else "")]
    run = tmp_path / "runs" / "cut"
    r = torchrun(["train", "--resume", str(run)], check=False)
    assert r.returncode != 0
    assert r.stderr.count(f"{run} finished: its weights are in") == 2, r.stderr[-3000:]
    assert "removing the SSD state" in r.stderr and "--resume" not in r.stderr.split("finished")[0]
    assert list((tmp_path / "ssd").iterdir()) == []


def test_ranks_resuming_other_runs_or_starting_afresh_beside_a_resume_are_refused(tmp_path):
    """Each machine names its run directory, so nothing compared them: ranks given two runs' directories
    resumed each its own state as one run (the first run's weights changed in silence, the second's left
    unresumable), and a rank started afresh beside one resuming failed with a bare path (a hostile pass).
    The ranks compare the run's id; nothing is changed."""
    torchrun(train_args(tmp_path, "ra", "train.grad_accum=2", "train.steps=1", "run.save_weights=false"))
    run, other = tmp_path / "runs" / "ra", tmp_path / "runs" / "rb"
    shutil.copytree(run, other)
    (other / "fuyou-run.json").write_text('{"run_id": "another"}\n')
    before = open_state(run)
    fresh = train_args(tmp_path, "rc", "train.grad_accum=2", "train.steps=2")
    for second in (["train", "--resume", str(other), "train.steps=2"], fresh):
        procs = rank_procs(tmp_path, [["train", "--resume", str(run), "train.steps=2"], second])
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode not in (0, None) for p in procs), outs[0][1][-2000:]
        for _, err in outs:
            assert "the ranks were started with different settings: rank 1: --resume=" in err, err[-2000:]
            assert "every rank resumes the same run" in err and "Traceback" not in err, err[-2000:]
    assert_states(before, open_state(run))
    assert not (tmp_path / "runs" / "rc").exists()


def test_ranks_initialised_from_different_checkpoints_are_refused(tmp_path):
    """model.init_from may name another path on each machine, and each rank initialises the stages it owns
    from its own: two checkpoints trained one model made of both, in silence (a hostile pass). The ranks
    compare the checkpoints' fingerprints; a copy at another path is the same checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    single(train_args(tmp_path, "base", "train.grad_accum=2", "train.steps=1"))
    a, same, b = tmp_path / "runs" / "base", tmp_path / "copy", tmp_path / "other"
    shutil.copytree(a, same)
    (same / "pytorch_model.bin").write_bytes(b"another file beside the weights read: no difference (a review)")
    b.mkdir()
    with safe_open(a / "model.safetensors", "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    k = sorted(tensors)[-1]
    tensors[k] = tensors[k] + 1e-3
    save_file(tensors, b / "model.safetensors", metadata=meta)
    procs = rank_procs(tmp_path, [train_args(tmp_path, f"mix{r}", "train.grad_accum=2", "train.steps=1",
                                             "model.init_from=" + str(d)) for r, d in enumerate((a, b))])
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode not in (0, None) for p in procs), outs[0][1][-2000:]
    for _, err in outs:
        assert "the ranks' model.init_from hold different weights" in err and "Traceback" not in err, err[-2000:]
    procs = rank_procs(tmp_path, [train_args(tmp_path, "same", "train.grad_accum=2", "train.steps=1",
                                             "model.init_from=" + str(d)) for d in (a, same)])
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-2000:]
    # notes are rank 0's to print (every rank printed them, interleaved: a pass)
    assert "fine-tuning defaults" in outs[0][1] and "fine-tuning defaults" not in outs[1][1], outs[1][1]


def test_ranks_whose_budget_caches_no_stage_still_meet_at_the_shared_cache(tmp_path):
    """A budget just over the minimum caches no stage: every rank still takes part in the shared cache's
    collectives before returning (one that returned early hung the others, a pass), and the run equals one
    process's. The budget is the refusal's minimum (per rank) plus less than half the smallest stage."""
    before = shm_caches()
    cache = ("train.grad_accum=2", "offload.cache_weights=true")

    def at(budget, name):
        args = train_args(tmp_path, name, *cache)
        args[args.index("1GiB")] = budget
        return args

    low = torchrun(at("200MiB", "low"), check=False)
    found = re.search(r"to at least [\d.]+ MiB \(2 x ([\d.]+) MiB\)", low.stderr)  # (per rank)
    assert low.returncode != 0 and found, low.stderr[-3000:]
    per_rank = math.ceil(float(found.group(1)) * 2**20) + 8192  # (the figure is rounded to 0.01 MiB)
    r = torchrun(at(str(2 * per_rank), "two"))
    assert re.search(r"weight cache\s+0 B \(0 stages; this rank's 1/2 of one cache", r.stderr), r.stderr[-3000:]
    single(train_args(tmp_path, "one", "train.grad_accum=2"))
    runs = tmp_path / "runs"
    assert_weights(load_file(runs / "one" / "model.safetensors"), load_file(runs / "two" / "model.safetensors"), True)
    assert shm_caches() == before


def test_two_ranks_with_resident_state_and_spare_copies(tmp_path):
    """Each rank's owned stages resident in CPU memory with spare copies (engine.py, Note: [Spare copies]),
    exact clipping redone on every step: bit-identical to one process (one micro-batch per rank)."""
    extra = ["train.grad_accum=2", "offload.resident_mem=1GiB", "offload.cache_weights=true", "train.grad_clip=0.05",
             "offload.clip_schedule=speculate"]
    one = single(train_args(tmp_path, "one", *extra))
    r = torchrun(train_args(tmp_path, "two", *extra))
    assert "the 6 resident stages with a spare copy" in one.stderr, one.stderr
    assert "the 3 resident stages with a spare copy" in r.stderr, r.stderr  # rank 0's: it owns 3 of the 6 stages
    runs = tmp_path / "runs"
    assert all(m["grad_norm"] > 0.05 for m in metrics(runs / "two") if "loss" in m)  # every step redone
    assert_weights(load_file(runs / "one" / "model.safetensors"), load_file(runs / "two" / "model.safetensors"), True)
    assert_states(open_state(runs / "one"), open_state(runs / "two"), True)


def test_a_stop_commit_longer_than_torchruns_shutdown_timeout_is_named(tmp_path, monkeypatch, capsys):
    """torchrun kills its workers 30 s after passing a stop on: a stop's commit of much resident state needs
    longer (a pass saw it killed mid-commit). Rank 0 names torchrun's --shutdown-timeout when it would."""
    from types import SimpleNamespace

    from fuyou.distributed import Dist
    from fuyou.train.loop import _note_torchrun_shutdown

    trainer = SimpleNamespace(plan=SimpleNamespace(resident_bytes=80 * 10**9))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    _note_torchrun_shutdown(trainer, Dist(0, 2, 0, 2, "gloo"), sys.stderr)
    assert "--shutdown-timeout 160" in capsys.readouterr().err
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    _note_torchrun_shutdown(trainer, Dist(0, 2, 0, 2, "gloo"), sys.stderr)
    trainer.plan.resident_bytes = 10**9
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    _note_torchrun_shutdown(trainer, Dist(0, 2, 0, 2, "gloo"), sys.stderr)
    _note_torchrun_shutdown(SimpleNamespace(plan=SimpleNamespace(resident_bytes=10**12)), Dist(1, 2, 1, 2, "gloo"),
                            sys.stderr)
    assert capsys.readouterr().err == ""
    # torchrun's flag reaches its workers only on its own command line, which the note reads
    trainer.plan.resident_bytes = 80 * 10**9
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"\x00".join([b"python", b"-m", b"torch.distributed.run", b"--shutdown-timeout", b"600", b"-m",
                                       b"fuyou.cli"]))
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: real(cmdline) if str(p).endswith("/cmdline") else real(p))
    _note_torchrun_shutdown(trainer, Dist(0, 2, 0, 2, "gloo"), sys.stderr)
    assert capsys.readouterr().err == ""


def test_a_stop_on_one_rank_in_an_evaluation_abandons_it_on_every_rank(tmp_path):
    """Ctrl-C reaches rank 1 in the middle of the evaluation after step 2 (three held-out batches: rank 1
    has one, rank 0 two; the signal comes where rank 1 has none left and still asks): both ranks abandon
    the evaluation at the same batch, commit step 2 and stop, with nothing of it logged; the resume ends
    bit-identical to an uninterrupted run."""
    extra = ("train.eval_batches=3", "train.grad_accum=2")
    torchrun(train_args(tmp_path, "whole", *extra))
    procs = rank_procs(tmp_path, train_args(tmp_path, "cut", *extra), fault_rank=1, fault="sigint:evaluation@1")
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [128 + signal.SIGINT] * 2, outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "the evaluation at step 2 was abandoned (SIGINT on another rank)" in outs[0][1], outs[0][1][-2000:]
    run = tmp_path / "runs" / "cut"
    lines = metrics(run)
    assert [m["step"] for m in lines if "eval_loss" in m] == [0] and lines[-1]["stopped"] and lines[-1]["step"] == 2
    torchrun(["train", "--resume", str(run)])
    a, b = load_file(tmp_path / "runs" / "whole" / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_runs_resume_with_another_process_count_says_it_finished(tmp_path):
    """--resume of a finished two-process run without torchrun advised `fuyou reshard`, which then refused:
    the run finished and its state is gone (a hostile pass). The world check leaves a finished run to the
    resume's own message; a run that kept its state is still checked."""
    from fuyou.distributed import WORLD_FILE, check_world
    from fuyou.errors import ConfigError

    run = tmp_path / "run"
    run.mkdir()
    (run / WORLD_FILE).write_text('{"world_size": 2}')
    (run / "config.toml").write_text("[train]\ngrad_accum = 2\n[offload]\nkeep_state = false\n")
    with pytest.raises(ConfigError, match="fuyou reshard"):
        check_world(run, 1)  # stopped: its state is there to reshard
    (run / "adapter.safetensors").write_bytes(b"")
    check_world(run, 1)  # finished: the resume says so, with how to go on
    (run / "config.toml").write_text("[train]\ngrad_accum = 2\n[offload]\nkeep_state = true\n")
    with pytest.raises(ConfigError, match="fuyou reshard"):
        check_world(run, 1)  # finished, its state kept: it resumes, with two processes or after a reshard
    (run / "adapter.safetensors").unlink()
    (run / "config.toml").write_text("[train]\ngrad_accum = 2\n[offload]\ncommit = \"none\"\n")
    check_world(run, 1)  # stopped without commits: nothing to reshard; the resume names the snapshot instead


def test_a_stop_on_one_rank_before_the_first_step_stops_every_rank(tmp_path):
    """A stop that reached rank 1 after the first evaluation (or in a run with none to abandon) made it return
    alone while rank 0 went into the first step's collectives (a review): the ranks agree before the first
    step, both stop at the commit of step 0, and the resume trains the run."""
    procs = rank_procs(tmp_path, train_args(tmp_path, "early", "train.grad_accum=2"), fault_rank=1,
                       fault="sigint:loop_start")
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [128 + signal.SIGINT] * 2, outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "before step 1: nothing was trained in this launch; the commit of step 0 is intact" in outs[0][1]
    run = tmp_path / "runs" / "early"
    assert not any("loss" in m for m in metrics(run))
    torchrun(["train", "--resume", str(run)])
    assert [m["step"] for m in metrics(run) if "loss" in m][-1] == 4


def test_a_stop_of_a_run_without_commits_keeps_rank_0s_snapshot_and_no_rank_s_state(tmp_path):
    """offload.commit=none under torchrun, stopped (SIGINT to rank 1): rank 1 died of a TypeError writing
    rank 0's snapshot path (None on it) and left its never-committed state on the SSD. Every rank stops with
    the signal's status, rank 0 names the snapshot, and no rank's state is left."""
    args = train_args(tmp_path, "cn", "train.grad_accum=2", "train.steps=50", "train.eval_every=0",
                      "offload.commit=none", "offload.keep_state=false", ssd=("a", "b"))
    procs = rank_procs(tmp_path, args, fault_rank=1, fault="sigint:backward@1")
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [128 + signal.SIGINT] * 2, outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "Traceback" not in outs[1][1], outs[1][1][-3000:]
    run = tmp_path / "runs" / "cn"
    snap = run / "snapshots" / "step-000002"
    assert f"the weights of step 2 are in {snap}" in outs[0][1], outs[0][1][-2000:]
    assert (snap / "model.safetensors").is_file()
    assert list((tmp_path / "a").iterdir()) == [] and list((tmp_path / "b").iterdir()) == []


def test_plan_auto_under_torchrun_names_the_plan_for_the_ranks(tmp_path):
    """--plan auto measures one process and is refused under torchrun; it pointed at planning one GPU, and plan
    --gpus 2 offered --plan auto beside its torchrun line. The refusal names plan --gpus N and --act-policy."""
    procs = rank_procs(tmp_path, train_args(tmp_path, "auto", "train.grad_accum=2", "--plan", "auto"))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 2 for p in procs), outs[0][1][-2000:]
    assert "`fuyou plan --gpus 2 ... --json > plan.json`" in outs[0][1] and "--act-policy plan.json" in outs[0][1]
    assert not (tmp_path / "runs" / "auto").exists()


@pytest.mark.parametrize("given,says", [
    (["train.global_batch=6"], "train.global_batch=6 was split as micro_batch_size 6 x grad_accum 1; give "
                               "train.micro_batch_size=3 with it (grad_accum 2)"),
    (["train.global_batch=3"], "give a train.global_batch that is a multiple of 2"),
    (["train.grad_accum=3"], "set train.grad_accum to a multiple of 2")])
def test_a_global_batch_the_ranks_cannot_share_says_how_to_split_it(tmp_path, monkeypatch, given, says):
    """train.global_batch=6 alone under 2 ranks was split 6 x 1 without them, and refused naming a
    train.grad_accum=1 the user never gave. Refused before joining the ranks, with the split that works."""
    from fuyou import distributed
    from fuyou.config import load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(overrides=["offload.mode=ssd", *given], flags={"offload.ssd_dirs": [str(tmp_path)]})
    with pytest.raises(ConfigError, match="is not a multiple of the 2 ranks") as e:
        distributed.init(cfg, None, None)
    assert says in str(e.value)


def test_a_rank_waiting_for_one_that_never_joins_says_so(tmp_path, monkeypatch, capsys):
    """Across machines a rank that fails before joining (a path missing there) is not stopped by torchrun: the
    others waited for it until offload.stall_timeout, ten minutes, in silence, then blamed the address. Rank 0 of
    2, alone: it says it is waiting, then fails naming a rank that never joined."""
    from fuyou import distributed
    from fuyou.config import load_config

    monkeypatch.setattr(distributed, "JOIN_NOTE_S", 0.5)
    monkeypatch.setattr(distributed, "MIN_COLLECTIVE_S", 3.0)
    for k, v in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    cfg = load_config(overrides=["offload.mode=ssd", "train.grad_accum=2", "offload.stall_timeout=1",
                                 "train.device=cpu"], flags={"offload.ssd_dirs": [str(tmp_path)]})
    t0 = time.monotonic()
    with pytest.raises(distributed.DistributedError, match="another rank failed before joining"):
        distributed.init(cfg, None, None)
    assert time.monotonic() - t0 < 60
    assert "still waiting for the other ranks to join after 0 s" in capsys.readouterr().err


def test_ranks_with_different_optimizer_chunks_do_not_agree(tmp_path):
    """A mutation audit: the weight exchange sends a stage chunk by chunk, so offload.optimizer_chunk is one of the
    settings every rank must share (two chunk sizes passed the comparison, then hung in the exchange)."""
    from fuyou import distributed
    from fuyou.config import load_config

    a, b = (distributed.agreed_settings(load_config(overrides=["offload.mode=ssd", f"offload.optimizer_chunk={c}"],
                                                    flags={"offload.ssd_dirs": [str(tmp_path)]}))
            for c in (1 << 20, 1 << 21))
    assert a != b and a["offload.optimizer_chunk"] != b["offload.optimizer_chunk"]
