"""The default offloaded run on a real model, commit intervals, deadlines and signals, through the CLI.

The first wave's default offloaded command (gpt-tiny, exact clipping at 1.0) hung forever; these run
it as a user does, with a timeout, and check what the issue promised around it: a killed run resumes
from the last commit of an interval bit-exactly, a stalled wait becomes a typed error that leaves the
last commit intact, and a second signal always ends the process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_resume import run, train_cmd


def resume_and_compare(tmp_path, name: str, at_step: int) -> None:
    """`--resume` the run ``name``: it starts at ``at_step`` and ends bit-identical to run ``ref``."""
    run_dir = tmp_path / "runs" / name
    resumed = run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {at_step}" in resumed.stderr
    got, want = load_file(str(run_dir / "model.safetensors")), load_file(str(tmp_path / "runs/ref/model.safetensors"))
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.timeout(180)
def test_default_offloaded_run_finishes(tmp_path):
    """Regression: `fuyou train --offload ssd --ssd DIR` with every default (gpt-tiny, 4 blocks, exact
    clipping at 1.0) hung in the gradient pool on any model of more than four stages."""
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    r = subprocess.run([sys.executable, "-m", "fuyou.cli", "train", "--offload", "ssd", "--ssd", str(ssd),
                        "--out", str(tmp_path / "runs"), "train.steps=3"],
                       capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stderr
    assert "done: 3 steps" in r.stderr and "exact clipping at 1.0" in r.stderr
    assert not any(ssd.iterdir())  # a completed run's state is removed after the weights are saved


@pytest.mark.timeout(300)
@pytest.mark.parametrize("resident", ["all", "0"])
def test_kill_between_commits_resumes_from_the_last_one(tmp_path, resident):
    """Commits every 2 steps: killed in step 4 (after the commit of step 2), the resumed run starts at
    step 2 and ends bit-identical to an uninterrupted run that committed at the same steps."""
    extra = ["train.steps=5", "train.grad_clip=1e-3", "offload.commit_every=2", f"offload.resident_mem={resident}"
             if resident != "all" else "offload.resident_mem=1GiB"]
    ref = run(train_cmd(tmp_path, "ref", *extra))
    assert ref.returncode == 0, ref.stderr
    cmd = train_cmd(tmp_path, "k", *extra)
    killed = run(cmd, fault="forward@3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resume_and_compare(tmp_path, "k", at_step=2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("at", [2, 3])  # 3: the last step's update, found by the final commit's wait
def test_a_stalled_optimizer_is_a_typed_error_and_the_commit_survives(tmp_path, at):
    ref = run(train_cmd(tmp_path, "ref", "train.grad_clip=1.0", "offload.resident_mem=0"))
    assert ref.returncode == 0, ref.stderr
    cmd = train_cmd(tmp_path, "s", "train.grad_clip=1.0", "offload.resident_mem=0", "offload.stall_timeout=2")
    t0 = time.monotonic()
    stalled = run(cmd, fault=f"stall:optimizer@{at}")
    assert stalled.returncode == 4, stalled.stderr
    assert time.monotonic() - t0 < 120
    assert "fuyou: error: the engine waited" in stalled.stderr and "update of" in stalled.stderr, stalled.stderr
    assert "Traceback" not in stalled.stderr
    resume_and_compare(tmp_path, "s", at_step=at)


@pytest.mark.timeout(300)
def test_a_stalled_weight_load_at_a_given_step_is_a_typed_error_and_the_commit_survives(tmp_path):
    """``FUYOU_FAULT=stall:load@N`` never fired (the load's hook was given no step): a load stalled in step
    N is the watchdog's typed error, and the run resumes from the commit before it bit-identically."""
    ref = run(train_cmd(tmp_path, "ref", "train.grad_clip=1.0", "offload.resident_mem=0"))
    assert ref.returncode == 0, ref.stderr
    cmd = train_cmd(tmp_path, "s", "train.grad_clip=1.0", "offload.resident_mem=0", "offload.stall_timeout=2")
    stalled = run(cmd, fault="stall:load@2")
    assert stalled.returncode == 4, stalled.stderr
    assert "fuyou: error: the engine waited" in stalled.stderr and "weights of" in stalled.stderr, stalled.stderr
    assert "Traceback" not in stalled.stderr
    resume_and_compare(tmp_path, "s", at_step=2)  # (commits every step: stalled in the third, not before)


@pytest.mark.timeout(120)
def test_a_second_signal_always_ends_the_process(tmp_path):
    """The first SIGTERM asks for a stop at the step boundary; while the step is stuck (a stalled
    optimizer, long deadline) a second one ends the process at once."""
    env = {k: v for k, v in os.environ.items() if k != "FUYOU_FAULT"}
    env["FUYOU_FAULT"] = "stall:optimizer@1"
    proc = subprocess.Popen(train_cmd(tmp_path, "t", "offload.resident_mem=0", "train.grad_clip=none"),
                            stderr=subprocess.PIPE, text=True, env=env)
    run_dir = tmp_path / "runs" / "t"
    deadline = time.time() + 60
    m = run_dir / "metrics.jsonl"
    while time.time() < deadline and not (m.exists() and '"loss"' in m.read_text()):
        time.sleep(0.05)
    time.sleep(1.0)  # inside step 2, waiting on the stalled worker
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # the same stop delivered twice at once (a process group's, forwarded) is one
    time.sleep(1.0)
    assert proc.poll() is None  # the first signal only asks
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "second signal" in err


def test_under_torchrun_a_sigterm_after_a_stop_is_the_same_stop(tmp_path):
    """torchrun passes a stop on to its workers; a second one reaching it (`timeout` forwarding a Ctrl-C
    sent to the process group, two SIGHUPs of a dropped session) it passes on as SIGTERM in the same
    millisecond, which ended the workers without the stop's commit (a hostile pass: 12 steps lost). Under
    torchrun a SIGTERM after a stop is the same stop; another SIGINT still ends the process at once."""
    env = {k: v for k, v in os.environ.items() if k != "FUYOU_FAULT"}
    env.update(FUYOU_FAULT="stall:optimizer@1", TORCHELASTIC_RUN_ID="test")
    proc = subprocess.Popen(train_cmd(tmp_path, "t", "offload.resident_mem=0", "train.grad_clip=none"),
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        m = tmp_path / "runs" / "t" / "metrics.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and not (m.exists() and '"loss"' in m.read_text()):
            time.sleep(0.05)
        time.sleep(1.0)  # inside step 2, waiting on the stalled worker
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)  # torchrun's escalation
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)  # later too: torchrun's own shutdown
        time.sleep(1.0)
        assert proc.poll() is None  # still only asked
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert err.count("SIGTERM after SIGINT: taken as the same stop (torchrun passing it on)") == 2, err
    assert "second signal" in err


def test_a_ranks_own_copy_of_an_agreed_stop_is_the_same_stop(capfd):
    """A rank stopped because another rank was (``StopOnSignal.agree``) exited at once, without the stop's
    commit, when its own copy of the same signal arrived later (signals that reach each process apart, as
    Slurm's; a review): it is the stop under way."""
    from fuyou.train.signals import StopOnSignal

    stop = StopOnSignal()
    try:
        stop.requested, stop.from_other = "SIGINT", True  # as ``agree`` leaves a rank another rank's stop reached
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # (the handler runs at the next bytecode boundary)
        assert stop.requested == "SIGINT" and not stop.from_other
        assert "fuyou: SIGINT: the stop under way, from another rank" in capfd.readouterr().err
    finally:
        stop.restore()
