"""Crash-safe resume: a run killed with SIGKILL anywhere resumes to bit-identical final weights."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fuyou.cli import main

ARGS = ["model.preset=gpt-test", "train.precision=fp32", "train.steps=4", "train.warmup_steps=1",
        "data.seq_len=32", "train.micro_batch_size=2", "train.eval_batches=1", "train.eval_every=0",
        "offload.optimizer_chunk=1", "offload.commit_every=1"]


def train_cmd(tmp_path, name, *extra):
    ssd = tmp_path / "ssd"
    ssd.mkdir(exist_ok=True)
    return [sys.executable, "-m", "fuyou.cli", "train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "256MiB",
            "--out", str(tmp_path / "runs"), f"run.name={name}", *ARGS, *extra]


def run(cmd, fault=None, timeout=300):
    env = dict(os.environ)
    env.pop("FUYOU_FAULT", None)
    if fault:
        env["FUYOU_FAULT"] = fault
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final weights of an uninterrupted run, per clipping mode."""
    out = {}
    for clip in ("none", "0.5", "1e-3"):
        tmp = tmp_path_factory.mktemp(f"ref-{clip}")
        r = run(train_cmd(tmp, "ref", f"train.grad_clip={clip}"))
        assert r.returncode == 0, r.stderr
        out[clip] = load_file(str(tmp / "runs" / "ref" / "model.safetensors"))
    return out


@pytest.mark.parametrize("fault,clip,resident", [
    ("forward@2", "none", "all"), ("backward@2", "none", "all"), ("optimizer@2", "none", "all"),
    ("optimizer@0", "none", "all"), ("commit@3", "none", "all"), ("optimizer@1", "0.5", "all"),
    ("backward@3", "0.5", "all"),
    # optimizer state streamed from SSD (the large-model case), and the embedding's alone resident
    ("optimizer@2", "none", "0"), ("commit@3", "none", "0"), ("optimizer@1", "0.5", "300KiB"),
    # exact clipping that triggers on every step: killed while a speculative update or its redo runs
    # (the first step; later ones defer), in deferred updates, and in redos of every step (speculate)
    ("optimizer@0", "1e-3", "0"), ("redo@0", "1e-3", "0"), ("optimizer@2", "1e-3", "300KiB"),
    ("redo@2", "1e-3", "300KiB;speculate"),
])
def test_sigkill_anywhere_then_resume_is_bit_exact(tmp_path, reference, fault, clip, resident):
    resident, _, schedule = resident.partition(";")
    extra = [] if resident == "all" else [f"offload.resident_mem={resident}"]
    extra += [f"offload.clip_schedule={schedule}"] if schedule else []
    cmd = train_cmd(tmp_path, "r", f"train.grad_clip={clip}", *extra)
    killed = run(cmd, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / "runs" / "r"
    assert not (run_dir / "model.safetensors").exists()
    resumed = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stderr
    got = load_file(str(run_dir / "model.safetensors"))
    ref = reference[clip]
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: an ssh session dropped (lost work before)
def test_sigterm_stops_at_a_step_boundary_and_resumes(tmp_path, sig):
    steps = ["train.grad_clip=none", "train.steps=60", "train.log_every=1"]
    ref = run(train_cmd(tmp_path, "ref", *steps))
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(train_cmd(tmp_path, "t", *steps), stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "FUYOU_FAULT"})
    run_dir = tmp_path / "runs" / "t"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first step's metrics line, then ask it to stop
        m = run_dir / "metrics.jsonl"
        if m.exists() and any('"loss"' in l for l in m.read_text().splitlines()):
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err  # not 0: `fuyou train ... && fuyou export ...` must stop there
    assert f"stopped by {sig.name}" in err and "fuyou train --resume" in err, err
    assert not (run_dir / "model.safetensors").exists()
    resumed = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    got = load_file(str(run_dir / "model.safetensors"))
    for k, v in load_file(str(tmp_path / "runs" / "ref" / "model.safetensors")).items():
        assert torch.equal(got[k], v), k


def _digest(paths):
    h = hashlib.sha256()
    for p in sorted(paths):
        if p.name == "fuyou-store.lock":  # the owner's PID, not state
            continue
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("damage", ["commit-record", "store-manifest", "truncated-extent"])
def test_damaged_state_is_refused_and_left_untouched(tmp_path, capsys, damage):
    killed = run(train_cmd(tmp_path, "d", "train.grad_clip=none"), fault="forward@2")
    assert killed.returncode == -signal.SIGKILL
    state = tmp_path / "ssd" / "d.fuyou-state"
    if damage == "commit-record":
        (state / "fuyou-commit.json").write_text('{"step": 2, "cop')
    elif damage == "store-manifest":
        m = state / "fuyou-store.json"
        m.write_text(m.read_text()[:-40])
    else:
        data = next(state.glob("*.dat"))
        with open(data, "r+b") as fh:
            fh.truncate(data.stat().st_size // 2)
    before = _digest([p for p in state.iterdir() if p.is_file()])
    rc = main(["train", "--resume", str(tmp_path / "runs" / "d")])
    assert rc == 5
    err = capsys.readouterr().err
    named = {"commit-record": "fuyou-commit.json", "store-manifest": "fuyou-store.json", "truncated-extent": ".dat"}
    assert "fuyou: error:" in err and named[damage] in err, err
    assert _digest([p for p in state.iterdir() if p.is_file()]) == before  # nothing overwritten


def test_resume_needs_a_run_directory(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_full_disk_while_committing_keeps_the_previous_commit(tmp_path, monkeypatch):
    import errno

    from fuyou.engine import commit
    from fuyou.engine.commit import CommitError
    from engine_testutil import make_cfg
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine

    cfg = make_cfg(tmp_path, "offload.mode=ssd", "offload.commit_every=1")
    eng = Engine(cfg, load_data(cfg.data), "s")
    record = eng.store_dirs[0] / commit.RECORD
    before = record.read_text()
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(commit.os, "write", full)
    eng.train_step(0)
    with pytest.raises(CommitError, match=r"(?s)committing step 1 failed.*No space left.*previous commit \(step 0\) is intact"):
        eng.worker.wait_all()
    monkeypatch.setattr(commit.os, "write", real_write)
    assert record.read_text() == before
    eng.worker._error = None  # the test's cleanup only
    eng.close()
    assert record.exists()  # a failed run keeps its state for --resume


def test_a_resume_refuses_another_run_directorys_state(tmp_path):
    """Two runs named alike in two run.out_dir share one SSD state directory: the second (with
    offload.replace_state) took it over, and `--resume` of the first continued the second's weights in
    silence (a new-user pass). The first is refused now, naming the owner, and the refusal of a new run
    names the run whose state is in the way."""
    ssd = tmp_path / "ssd"
    ssd.mkdir()

    def cmd(out, *extra):
        return [sys.executable, "-m", "fuyou.cli", "train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "256MiB",
                "--out", str(tmp_path / out), "run.name=chat", *ARGS, *extra]

    killed = run(cmd("runsB", "train.steps=6"), fault="forward@2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    second = run(cmd("runsA", "train.steps=6"))
    assert second.returncode == 2 and f"the run in {(tmp_path / 'runsB' / 'chat').resolve()}" in second.stderr, second.stderr
    taken = run(cmd("runsA", "train.steps=6", "offload.replace_state=true"), fault="forward@3")
    assert taken.returncode == -signal.SIGKILL, taken.stderr
    resumed = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(tmp_path / "runsB" / "chat")])
    assert resumed.returncode == 2, resumed.stderr
    assert f"(the run in {(tmp_path / 'runsA' / 'chat').resolve()})" in resumed.stderr, resumed.stderr
    # a copy of the run beside the original (the same id) shares no state with it
    import shutil

    shutil.copytree(tmp_path / "runsA", tmp_path / "runsC")
    copy = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(tmp_path / "runsC" / "chat")])
    assert copy.returncode == 2 and f"(the run in {(tmp_path / 'runsA' / 'chat').resolve()})" in copy.stderr, \
        copy.stderr
    shutil.rmtree(tmp_path / "runsC")
    # the owner moved away: still its state (a new-user pass resumed the other run's state once the owner's
    # directory was gone); the runs' ids decide
    (tmp_path / "runsA").rename(tmp_path / "runsA.moved")
    resumed = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(tmp_path / "runsB" / "chat")])
    assert resumed.returncode == 2 and "another run named 'chat'" in resumed.stderr, resumed.stderr
    assert "That run's directory is no longer there" in resumed.stderr, resumed.stderr
    ok = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(tmp_path / "runsA.moved" / "chat")])
    assert ok.returncode == 0 and "resuming at step 2" in ok.stderr, ok.stderr
    import json

    log = tmp_path / "runsA.moved" / "chat" / "metrics.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    at = lines.index(next(m for m in lines if "resumed" in m))
    assert lines[at]["resumed"] == 2 and min(m["step"] for m in lines[at:] if "loss" in m) > 2  # redone from 3


def test_a_renamed_run_directory_is_told_why_its_state_is_not_found(tmp_path):
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    cmd = [sys.executable, "-m", "fuyou.cli", "train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "256MiB",
           "--out", str(tmp_path / "runs"), "run.name=AB", *ARGS, "train.steps=4"]
    assert run(cmd, fault="forward@2").returncode == -signal.SIGKILL
    (tmp_path / "runs" / "AB").rename(tmp_path / "runs" / "AB-renamed")
    r = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(tmp_path / "runs" / "AB-renamed")])
    assert r.returncode == 2 and "AB.fuyou-state (of " in r.stderr and "give it its old name back" in r.stderr, r.stderr


def test_only_an_initial_state_whose_run_never_started_is_taken_for_unstarted(tmp_path):
    """A new start removes a committed state only where it is a run's initial one (step 0) whose run directory
    was never made, or that was never claimed (no owner file): data parallel, rank 0 killed between the ranks'
    step-0 commit and the run directory left its peers' state refusing every start. A later step is kept."""
    import json

    from fuyou.engine.commit import RECORD
    from fuyou.engine.state import _unstarted

    d = tmp_path / "state"
    d.mkdir()
    (d / RECORD).write_text(json.dumps({"step": 0}))
    assert _unstarted(d, None) and _unstarted(d, str(tmp_path / "never-made"))
    (tmp_path / "run").mkdir()
    assert not _unstarted(d, str(tmp_path / "run"))
    (d / RECORD).write_text(json.dumps({"step": 3}))
    assert not _unstarted(d, None)
