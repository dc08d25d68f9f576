"""The trained state is never deleted before the weights are durably saved (issue 14, item 1)."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors.torch import load_file

from fuyou.cli import main

ARGS = ["model.preset=gpt-test", "model.n_layer=4", "train.precision=fp32", "train.steps=2", "data.seq_len=32",
        "train.micro_batch_size=2", "train.eval_batches=1", "train.eval_every=0"]


def _train(tmp_path, name, *extra):
    ssd = tmp_path / "ssd"
    ssd.mkdir(exist_ok=True)
    return main(["train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "256MiB", "--out",
                 str(tmp_path / "runs"), f"run.name={name}", *ARGS, *extra])


def test_a_failed_final_save_keeps_the_state_and_resume_saves_it(tmp_path, monkeypatch, capsys):
    from fuyou.train import run

    real = run.write_safetensors

    def full_disk(path, shapes, chunks, metadata=None):
        def failing():
            yield next(iter(chunks))
            raise OSError(errno.ENOSPC, "No space left on device")

        return real(path, shapes, failing(), metadata)

    monkeypatch.setattr(run, "write_safetensors", full_disk)
    assert _train(tmp_path, "r") == 4
    err = capsys.readouterr().err
    assert "No space left" in err and "The trained state is kept on the SSD" in err and "--resume" in err
    state = tmp_path / "ssd" / "r.fuyou-state"
    run_dir = tmp_path / "runs" / "r"
    assert state.is_dir() and (state / "fuyou-commit.json").is_file()
    assert not list(run_dir.glob("model.safetensors*"))  # no half-written file left behind
    monkeypatch.setattr(run, "write_safetensors", real)
    assert main(["train", "--resume", str(run_dir)]) == 0
    got = load_file(str(run_dir / "model.safetensors"))
    assert _train(tmp_path, "ref") == 0
    want = load_file(str(tmp_path / "runs" / "ref" / "model.safetensors"))
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert not state.exists()  # saved now: the state went


def test_save_weights_false_keeps_the_state(tmp_path, capsys):
    assert _train(tmp_path, "k", "run.save_weights=false") == 0
    assert "stays on the SSD" in capsys.readouterr().err
    assert (tmp_path / "ssd" / "k.fuyou-state" / "fuyou-commit.json").is_file()


def _cmd(tmp_path, name, *extra):
    import sys

    ssd = tmp_path / "ssd"
    ssd.mkdir(exist_ok=True)
    return [sys.executable, "-m", "fuyou.cli", "train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "256MiB",
            "--out", str(tmp_path / "runs"), f"run.name={name}", *ARGS, *extra]


@pytest.mark.timeout(300)
def test_a_second_process_on_a_live_state_is_refused_with_the_holders_pid(tmp_path):
    """Issue 14, item 2: a running job plus a concurrent --resume of the same run used to corrupt
    the manifest. Two real processes: the second is refused at once, the first finishes unharmed."""
    import os
    import signal
    import subprocess
    import time

    env = {k: v for k, v in os.environ.items() if k != "FUYOU_FAULT"}
    steps = ["train.steps=60", "train.log_every=1", "offload.commit_every=1"]
    first = subprocess.Popen(_cmd(tmp_path, "live", *steps), stderr=subprocess.PIPE, text=True, env=env)
    run_dir = tmp_path / "runs" / "live"
    m = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (m.exists() and '"loss"' in m.read_text()):
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # paused mid-run, still holding its state
    try:
        assert first.poll() is None, "the first run ended before the second started"
        second = subprocess.run(_cmd(tmp_path, "x")[:4] + ["--resume", str(run_dir)], capture_output=True,
                                text=True, timeout=120, env=env)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert f"in use by process {first.pid}" in second.stderr, second.stderr
    _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    ref = subprocess.run(_cmd(tmp_path, "ref", *steps), capture_output=True, text=True, timeout=240, env=env)
    assert ref.returncode == 0, ref.stderr
    got = load_file(str(run_dir / "model.safetensors"))
    want = load_file(str(tmp_path / "runs" / "ref" / "model.safetensors"))
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_symlink_planted_in_the_state_directory_is_refused_and_not_followed(tmp_path, capsys):
    """Issue 14, item 3: a pre-existing fuyou-store.0.dat symlink made fuyou truncate its target."""
    victim = tmp_path / "precious.bin"
    victim.write_bytes(b"do not touch" * 1000)
    state = tmp_path / "ssd" / "s.fuyou-state"
    state.mkdir(parents=True)
    (state / "fuyou-store.0.dat").symlink_to(victim)
    assert _train(tmp_path, "s") == 2
    err = capsys.readouterr().err
    assert "fuyou-store.0.dat" in err and ("did not make" in err), err
    assert victim.read_bytes() == b"do not touch" * 1000


@pytest.mark.parametrize("resident", ["offload.resident_mem=0", "train.log_every=1"])  # (the default: resident)
def test_a_run_whose_final_commit_fails_still_saves_what_it_trained(tmp_path, monkeypatch, capsys, resident):
    """A hostile pass removed the SSD directory during step 3 of a run that commits every 10 minutes: it
    trained to the end, the final commit failed, and no weights were saved (everything since step 0 lost).
    The weights are in CPU memory (resident stages) and in the store's open files: they are saved, the
    same as a run that was never disturbed, and the error says so."""
    import shutil

    from fuyou.engine.engine import Engine

    steps = ["train.steps=4", "offload.cpu_mem=1GiB", resident]
    assert _train(tmp_path, "ref", *steps) == 0
    real_step = Engine.train_step

    def train_step(self, step):
        if step == 2:  # the directory goes while the run trains (the last commit: step 0's)
            shutil.rmtree(tmp_path / "ssd" / "gone.fuyou-state")
        return real_step(self, step)

    monkeypatch.setattr(Engine, "train_step", train_step)
    capsys.readouterr()
    assert _train(tmp_path, "gone", *steps) == 4
    err = capsys.readouterr().err
    assert "The run had trained all 4 steps: their weights are saved in" in err
    assert "holds no commit of step 4: a --resume would go back to an earlier one" in err
    got = load_file(str(tmp_path / "runs" / "gone" / "model.safetensors"))
    want = load_file(str(tmp_path / "runs" / "ref" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("cause", ["full", "read-only"])
def test_a_disk_that_fills_during_training_names_the_intact_commit_and_the_resume(tmp_path, monkeypatch, capsys,
                                                                                  cause):
    """A pass: a full SSD at a commit mid-run said to free space and nothing of the commit that is intact or how
    to go on. The commit of step 3 fails (ENOSPC); the error names step 2's, and the resume from it ends as an
    undisturbed run. A directory that stops taking writes mid-run (remounted read-only) is the same: a failure
    while running (4, once mended a resume goes on), not a mistake in the command (2, which a permission error
    at the start is)."""
    import errno as _errno

    from fuyou.engine.state import TrainingState
    from fuyou.store.errors import StoreFullError, StorePermissionError

    steps = ["train.steps=4", "offload.commit_every=1"]
    assert _train(tmp_path, "ref", *steps) == 0
    real = TrainingState.write_commit
    error, code, said = {"full": (StoreFullError, _errno.ENOSPC, "raise the quota / file-size limit (ulimit -f)"),
                         "read-only": (StorePermissionError, _errno.EROFS, "make the directory writable")}[cause]

    def write_commit(self, steps_done, copies):
        if steps_done == 3:
            raise error(str(tmp_path / "ssd"), 0, 0, code, "manifest write")
        return real(self, steps_done, copies)

    monkeypatch.setattr(TrainingState, "write_commit", write_commit)
    capsys.readouterr()
    assert _train(tmp_path, "full", *steps) == 4
    err = capsys.readouterr().err
    assert os.strerror(code) in err and said in err
    run_dir = tmp_path / "runs" / "full"
    assert f"the commit of step 2 is intact, and once that is mended `fuyou train --resume {run_dir}`" in err
    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir)]) == 0
    got, want = load_file(str(run_dir / "model.safetensors")), load_file(str(tmp_path / "runs/ref/model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_disk_error_while_a_commit_is_queued_says_that_commit_may_be_the_resumes(tmp_path, monkeypatch, capsys):
    """A note: an SSD error on the main thread while the next commit was still being written named only the
    commit before it, and the resume then started at the later one. Step 3's commit is held until step 4
    fails; the error names step 2's as intact and step 3's as maybe; the resume starts at step 3 and ends
    as an undisturbed run."""
    import errno as _errno
    import threading

    from fuyou.engine.engine import Engine
    from fuyou.engine.state import TrainingState
    from fuyou.store.errors import StoreFullError

    steps = ["train.steps=5", "offload.commit_every=1"]
    assert _train(tmp_path, "ref", *steps) == 0
    real_commit, real_step = TrainingState.write_commit, Engine.train_step
    failing = threading.Event()

    def write_commit(self, steps_done, copies):
        if steps_done == 3:
            assert failing.wait(30)
        return real_commit(self, steps_done, copies)

    def train_step(self, step, *a, **k):
        if step == 3:
            raise StoreFullError(str(tmp_path / "ssd"), 0, 0, _errno.ENOSPC, "swap write")
        return real_step(self, step, *a, **k)

    def resume_advice(*a, **k):  # step 3's commit is written once the error is composed, as the run closes
        try:
            return real_advice(*a, **k)
        finally:
            failing.set()

    from fuyou.train import loop

    real_advice = loop._resume_advice
    monkeypatch.setattr(TrainingState, "write_commit", write_commit)
    monkeypatch.setattr(Engine, "train_step", train_step)
    monkeypatch.setattr(loop, "_resume_advice", resume_advice)
    capsys.readouterr()
    assert _train(tmp_path, "q", *steps) == 4
    err = capsys.readouterr().err
    run_dir = tmp_path / "runs" / "q"
    assert ("the commit of step 2 is intact (step 3's, still being written then, may be too: a resume starts at "
            f"the latest whole one), and once that is mended `fuyou train --resume {run_dir}`") in err
    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "resuming at step 3 from the last commit" in capsys.readouterr().err
    got, want = load_file(str(run_dir / "model.safetensors")), load_file(str(tmp_path / "runs/ref/model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_metrics_lines_carry_the_launchs_running_totals_of_ssd_bytes_and_commits(tmp_path):
    """A pass: a line's counters are its own step's, so with train.log_every=3 the commits of the steps between
    two lines were in no line, and the lines' commit bytes summed to a quarter of the summary's. Each line now
    carries the launch's running totals: monotone, and the summary's SSD bytes are the last line's plus what
    landed after it (the final commit)."""
    import json

    assert _train(tmp_path, "t", "train.steps=7", "train.log_every=3", "offload.commit_every=2",
                  "offload.resident_mem=0") == 0
    lines = [json.loads(x) for x in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 3, 6, 7]
    for a, b in zip(steps, steps[1:]):
        for k in ("ssd_read_bytes_total", "ssd_write_bytes_total", "commit_write_bytes_total", "commits_total"):
            assert a[k] <= b[k], k
        assert b["ssd_write_bytes_total"] - a["ssd_write_bytes_total"] >= b["ssd_write_bytes"] > 0
    assert steps[-1]["commits_total"] >= 2  # steps 2 and 4's at least (6's may land after step 7's line)
    summary = lines[-1]
    assert summary["summary"] and summary["ssd_written_bytes"] >= steps[-1]["ssd_write_bytes_total"]


def test_a_resume_of_a_run_still_training_says_so_before_the_process_count(tmp_path, capsys):
    """A pass: `fuyou train --resume RUN` on one process while RUN's two ranks were still training advised
    `fuyou reshard`, which then refused the state as locked. A state a process holds is refused as in use
    first, naming the holder; once it is free the process count's advice follows."""
    import json
    import os

    from fuyou.store.lock import lock_dirs, unlock

    assert _train(tmp_path, "live", "offload.keep_state=true") == 0
    run_dir = tmp_path / "runs" / "live"
    (run_dir / "distributed.json").write_text(json.dumps({"world_size": 2, "backend": "gloo"}))
    held = lock_dirs([tmp_path / "ssd" / "live.fuyou-state"])  # (as the run's rank 0 holds it while it trains)
    try:
        capsys.readouterr()
        assert main(["train", "--resume", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert f"{run_dir} is still training: its state in {tmp_path / 'ssd' / 'live.fuyou-state'} is in use by " \
               f"process {os.getpid()}" in err and "reshard" not in err
    finally:
        unlock(held)
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "was trained by 2 process(es) and this resume has 1" in capsys.readouterr().err
