"""``fuyou launch``: torchrun's launcher, exiting with the ranks' status (fuyou/launch.py).

torchrun exits 1 whatever its ranks exited with, so a scheduler could not tell a refused config (2) from a
rank killed mid-run (a retry fits). Real launches of two gloo ranks, as the data-parallel tests run them."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from test_data_parallel import env, free_port, metrics, torchrun, train_args

from fuyou.cli import main

pytestmark = pytest.mark.timeout(600)


def launch(args, nproc=2, **kw):
    cmd = [sys.executable, "-m", "fuyou.cli", "launch", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *args]
    return subprocess.run(cmd, env=env(**kw), capture_output=True, text=True, timeout=400)


def test_a_refused_config_exits_2_where_torchrun_exits_1(tmp_path):
    args = train_args(tmp_path, "odd", "train.grad_accum=3")
    assert torchrun(args, check=False).returncode == 1
    r = launch(args)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "train.grad_accum=3 is not a multiple of the 2 ranks" in r.stderr
    # (the rank that fails second may be ended by torchrun's SIGTERM first)
    assert re.search(r"fuyou launch: the ranks failed \(rank 0: (status 2|SIGTERM), rank 1: (status 2|SIGTERM)\); "
                     r"exit status 2, rank [01]'s", r.stderr), r.stderr[-3000:]
    assert not (tmp_path / "runs" / "odd").exists()


def test_a_killed_rank_exits_with_its_signal_and_the_advice_resumes_through_fuyou_launch(tmp_path):
    """Rank 1 is killed (SIGKILL) in step 2's backward; torchrun then ends rank 0 with SIGTERM. The launch
    exits 128 + SIGKILL, rank 1's (a retry fits), not rank 0's SIGTERM nor torchrun's 1; rank 0's advice, when
    it has the time to give it, names the launch to resume with, which finishes the run."""
    args = train_args(tmp_path, "cut", "train.grad_accum=2")
    r = launch(args, FUYOU_FAULT="backward@1", FUYOU_FAULT_RANK=1)
    assert r.returncode == 128 + signal.SIGKILL, r.stderr[-3000:]
    assert re.search(r"\(rank 0: (SIGTERM|status 4), rank 1: SIGKILL\); exit status 137, rank 1's", r.stderr), \
        r.stderr[-3000:]
    run = tmp_path / "runs" / "cut"
    if "another rank stopped" in r.stderr:  # (torchrun may end rank 0 with SIGTERM before it says so)
        assert f"continue with `fuyou launch --nproc_per_node=2 train --resume {run}`" in r.stderr, r.stderr[-3000:]
    r = launch(["train", "--resume", str(run)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in metrics(run) if "loss" in m][-1] == 4


def test_ctrl_c_to_the_launch_commits_every_ranks_step_and_exits_130(tmp_path):
    args = train_args(tmp_path, "sig", "train.grad_accum=2", "train.steps=400", "train.eval_every=0")
    cmd = [sys.executable, "-m", "fuyou.cli", "launch", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *args]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "sig"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # the launcher alone: torchrun passes it on to the ranks
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    stopped = [m for m in metrics(run) if "stopped" in m]
    assert len(stopped) == 1 and stopped[0]["step"] < 400, err[-3000:]
    assert f"continue with: fuyou launch --nproc_per_node=2 train --resume {run}" in err, err[-3000:]


def _failure(exitcode, timestamp):
    return SimpleNamespace(exitcode=exitcode, timestamp=timestamp)


def test_the_status_of_a_failed_launch_prefers_what_a_retry_cannot_mend():
    from fuyou.launch import exit_status

    # a mistake on rank 1 beats the failure it caused on rank 0, seen first
    assert exit_status({0: _failure(4, 1), 1: _failure(2, 2)}) == (1, 2)
    # of two that a retry cannot mend, the first seen; a bug (a traceback's 1) is one
    assert exit_status({0: _failure(5, 3), 1: _failure(1, 2)}) == (1, 1)
    # a rank killed outright beats the SIGTERM torchrun ends the others with, seen at the same moment
    assert exit_status({0: _failure(-signal.SIGTERM, 1), 1: _failure(-signal.SIGKILL, 1)}) == (1, 137)
    assert exit_status({0: _failure(-signal.SIGTERM, 1), 1: _failure(4, 1)}) == (1, 4)
    # ... and beats the 4 of a rank its death stopped, seen first
    assert exit_status({0: _failure(4, 1), 1: _failure(-signal.SIGKILL, 2)}) == (1, 137)
    # SIGTERM alone (sent to the ranks by someone else) is what there is
    assert exit_status({0: _failure(-signal.SIGTERM, 1)}) == (0, 143)


@pytest.mark.parametrize("argv,said", [
    (["launch", "--nproc_per_node=2"], "fuyou launch runs `fuyou train` on several processes"),
    (["launch", "--nproc_per_node=2", "-m", "fuyou.cli", "train"], "fuyou launch names the program itself"),
    (["launch", "--nproc_per_node=2", "--no-python", "train"], "drop --no-python"),
    # (abbreviated, as argparse takes them: a pass ran them into a traceback and a rank's FileNotFoundError)
    (["launch", "--nproc_per_node=2", "--no-py", "train"], "drop --no-py"),
    (["launch", "--nproc_per_node=2", "--run_p", "train"], "drop --run_p"),
    (["launch", "--nproc_per_node=2", "script.py", "train"], "script.py was given as one"),
    # torchrun's reading of its own values (a traceback and 1: a pass)
    (["launch", "--nproc_per_node=abc", "train"],
     "a torchrun option of fuyou launch: Unsupported nproc_per_node value: abc"),
    (["launch", "--nnodes=abc", "train"], "a torchrun option of fuyou launch: invalid literal for int()"),
    # counts torchrun takes and then fails on with an AssertionError's traceback, or waits on for ever (a hostile pass)
    (["launch", "--nproc_per_node=0", "train"], "--nproc_per_node=0: it counts, so it is at least 1"),
    (["launch", "--nnodes=0", "train"], "--nnodes=0: it counts"),
    (["launch", "--nnodes=2:1", "train"], "--nnodes=2:1: a range MIN:MAX with MIN at most MAX"),
    (["launch", "--max_restarts=-1", "train"], "--max_restarts=-1: it is 0 or more"),
    (["launch", "--nnodes=2", "--node_rank=5", "train"], "--node_rank=5: this machine's place among the --nnodes=2"),
])
def test_what_fuyou_launch_refuses(capsys, argv, said):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err


def test_a_port_taken_is_a_sentence_and_a_retry(tmp_path, capsys):
    """A pass: the launcher's own failure to start (its rendezvous port taken; likewise a machine that never
    joins) was a traceback and 1, "a bug"; it is 4, a retry once mended."""
    import os
    import socket

    environ = dict(os.environ)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["launch", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
                     *train_args(tmp_path, "port")]) == 4
    err = capsys.readouterr().err
    assert "fuyou launch could not start or meet the other machines' launchers (DistNetworkError" in err, err
    assert "Traceback" not in err and not (tmp_path / "runs" / "port").exists()
    # torchrun's launcher set OMP_NUM_THREADS=1 and its own variables in this process: the next test's training
    # ran on one thread (the commit fuzz's weights then differed in the last bits, in the full suite)
    assert dict(os.environ) == environ


def test_the_command_starts_at_the_first_train_that_is_no_options_value():
    from fuyou.launch import split

    assert split(["--role", "train", "--nproc_per_node", "2", "train", "a=1"]) == (
        ["--role", "train", "--nproc_per_node", "2"], ["train", "a=1"])
    assert split(["--role=train", "train"]) == (["--role=train"], ["train"])


@pytest.mark.parametrize("argv", [["launch", "--help"], ["launch", "--nproc_per_node=2", "--help"],
                                  ["launch", "-h", "train"]])
def test_fuyou_launch_help_is_its_own(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "exits with the ranks' status" in capsys.readouterr().out


def test_a_world_size_refusal_under_fuyou_launch_names_it(tmp_path, monkeypatch):
    """A pass: a resume with another number of processes, launched by fuyou launch, was told to resume with
    torchrun (whose statuses are 1)."""
    import json

    from fuyou.distributed import check_world
    from fuyou.errors import ConfigError
    from fuyou.launch import LAUNCHER_ENV

    (tmp_path / "distributed.json").write_text(json.dumps({"world_size": 2, "backend": "gloo"}))
    (tmp_path / "config.toml").write_text("[train]\ngrad_accum = 2\n")
    monkeypatch.setenv(LAUNCHER_ENV, "fuyou launch")
    with pytest.raises(ConfigError, match="resume with fuyou launch --nproc_per_node=2 "):
        check_world(tmp_path, 3)
    monkeypatch.delenv(LAUNCHER_ENV)
    with pytest.raises(ConfigError, match="resume with torchrun --nproc_per_node=2 "):
        check_world(tmp_path, 3)


def test_a_machine_that_never_joins_is_a_retry(tmp_path, monkeypatch, capsys):
    """The rendezvous of several machines timing out (one never started) is 4, as a port taken is (a pass
    waited for one: a traceback and 1). Here torchrun's run raises what its rendezvous raises then."""
    import torch.distributed.run as torchrun_module
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    def run(args):
        raise RendezvousTimeoutError("The node did not join the rendezvous in time")

    monkeypatch.setattr(torchrun_module, "run", run)
    assert main(["launch", "--nnodes=2", "--nproc_per_node=1", *train_args(tmp_path, "never")]) == 4
    err = capsys.readouterr().err
    assert "(RendezvousTimeoutError: The node did not join the rendezvous in time)" in err, err
