"""``fuyou reshard``: a run's last commit rewritten for another number of data-parallel processes
(fuyou/reshard.py), then resumed at that number.

The reference is always one process that trains the whole run uninterrupted. A run cut after step 2
(its commit of step 2 is the state of record), resharded and resumed at the other world size must
end bit-identical to it: with one micro-batch per rank and two ranks, the two ranks' gradient sum is
the one-process sum (tests/distributed/test_data_parallel.py), and the state moves bit for bit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_data_parallel import assert_states, env, open_state, rank_procs, single, torchrun, train_args

pytestmark = pytest.mark.timeout(900)


def fuyou(*args, check=True, **kw):
    r = subprocess.run([sys.executable, "-m", "fuyou.cli", *args], env=env(**kw), capture_output=True, text=True,
                       timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def cut_after_step_2(tmp_path, name, extra, world):
    """A run killed (SIGKILL; with two ranks rank 0, and rank 1 stops on its error) in the backward of step 3: its last commit is step 2 (or 1,
    if the kill came before the commit job of step 2 had finished)."""
    args = train_args(tmp_path, name, "train.grad_accum=2", *extra)
    if world == 1:
        r = fuyou(*args, check=False, FUYOU_FAULT="backward@2")
        assert r.returncode == -9, r.stderr[-3000:]
    else:
        procs = rank_procs(tmp_path, args, fault_rank=0, fault="backward@2")
        [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode not in (0, None) for p in procs)
    return tmp_path / "runs" / name


def resume(run, world):
    if world == 1:
        return single(["train", "--resume", str(run)])
    return torchrun(["train", "--resume", str(run)], nproc=world)


@pytest.mark.parametrize("before,after,extra,saved", [
    (1, 2, (), "model.safetensors"),
    (2, 1, (), "model.safetensors"),
    (1, 2, ("optim.master=bf16", "optim.moments=int8"), "model.safetensors"),
    (2, 1, ("lora.rank=4", "lora.targets=all-linear", "model.preset=llama-test", "lora.base=int8"),
     "adapter.safetensors"),
])
def test_a_resharded_run_ends_as_one_process_would(tmp_path, extra, saved, before, after):
    """Cut at step 2 on ``before`` processes, resharded for ``after``, resumed to step 4: the weights (and,
    for full fine-tuning, the committed master weights and moments) equal one uninterrupted process's,
    bit for bit; the state lies where a run of ``after`` processes keeps it."""
    single(train_args(tmp_path, "whole", "train.grad_accum=2", *extra))
    run = cut_after_step_2(tmp_path, "cut", extra, before)
    before_state = open_state(run) if not extra else None  # (open_state reads fp32 moments)
    r = fuyou("reshard", str(run), "--nproc", str(after))
    assert f"from {before} to {after} process(es) at its step-" in r.stdout, r.stdout
    states = sorted(p.name for p in (tmp_path / "ssd").iterdir())
    assert states == sorted(["cut.fuyou-state", "whole.fuyou-state"] + (["cut.fuyou-state.rank1"] if after == 2 else []))
    assert json.loads((run / "distributed.json").read_text())["world_size"] == after
    if before_state is not None:
        assert_states(before_state, open_state(run))  # the move changed no bit
        world = run / "distributed.json"
        saved_world = world.read_bytes()
        world.unlink()  # lost: export and reshard count the ranks' states (a KeyError traceback before)
        assert_states(before_state, open_state(run))
        r = fuyou("reshard", str(run), "--nproc", str(after))  # (the same N: nothing to do, not an error)
        assert f"nothing to do: {run} was trained by {after} process(es) already" in r.stdout
        world.write_bytes(saved_world)
    resume(run, after)
    a, b = load_file(tmp_path / "runs" / "whole" / saved), load_file(run / saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if before_state is not None:
        assert_states(open_state(tmp_path / "runs" / "whole"), open_state(run))


def test_a_reshard_killed_before_its_decision_changes_nothing(tmp_path):
    """Killed while copying: the old state is the state of record (the run resumes at its old world
    size and exports), and the next reshard starts over from it."""
    run = cut_after_step_2(tmp_path, "cut", (), 1)
    state = open_state(run)
    r = fuyou("reshard", str(run), "--nproc", "2", check=False, FUYOU_FAULT="reshard_copy")
    assert r.returncode == -9
    assert not (run / "reshard.json").exists() and not (run / "distributed.json").exists()
    assert_states(state, open_state(run))
    fuyou("reshard", str(run), "--nproc", "2")
    assert sorted(p.name for p in (tmp_path / "ssd").iterdir()) == ["cut.fuyou-state", "cut.fuyou-state.rank1"]
    assert_states(state, open_state(run))


def test_a_reshard_killed_after_its_decision_is_finished_by_running_it_again(tmp_path):
    """Killed after the decision (the new state complete, the renames not done): resume and export
    refuse with the command that finishes it; running it again does, and the run resumes exactly."""
    single(train_args(tmp_path, "whole", "train.grad_accum=2"))
    run = cut_after_step_2(tmp_path, "cut", (), 2)
    state = open_state(run)
    r = fuyou("reshard", str(run), "--nproc", "1", check=False, FUYOU_FAULT="reshard_switch")
    assert r.returncode == -9 and (run / "reshard.json").is_file()
    for args in (["train", "--resume", str(run)], ["export", str(run), "--out", str(tmp_path / "hf")]):
        r = fuyou(*args, check=False)
        assert r.returncode != 0 and f"fuyou reshard {run} --nproc 1" in r.stderr and "Traceback" not in r.stderr
    r = fuyou("reshard", str(run), "--nproc", "2", check=False)  # not the interrupted one's number
    assert r.returncode != 0 and "finish that first" in r.stderr
    r = fuyou("reshard", str(run), "--nproc", "1")
    assert "finished the interrupted reshard" in r.stdout
    assert sorted(p.name for p in (tmp_path / "ssd").iterdir()) == ["cut.fuyou-state", "whole.fuyou-state"]
    assert_states(state, open_state(run))
    fuyou("reshard", str(run), "--nproc", "1", check=False)  # nothing left to do: refused, nothing moved
    assert_states(state, open_state(run))
    resume(run, 1)
    a, b = load_file(tmp_path / "runs" / "whole" / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_what_reshard_refuses(tmp_path):
    """Each with a sentence and no traceback, the state untouched: a split of the global batch that does
    not divide, more ranks than stages, a run being trained, a run without
    resumable state, a directory that is not a run."""
    run = cut_after_step_2(tmp_path, "cut", (), 1)
    state = open_state(run)
    (tmp_path / "empty").mkdir()  # (the same N with --ssd where no state is: it said "nothing to do", a review)
    cases = [(("--nproc", "3"), "not a multiple of 3"), (("--nproc", "0"), "1 or more"),
             (("--nproc", "1", "--ssd", str(tmp_path / "empty")), "rank 0's state (cut.fuyou-state) is in none of")]
    for args, says in cases:
        r = fuyou("reshard", str(run), *args, check=False)
        assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = fuyou(*train_args(tmp_path, "wide", "train.grad_accum=8", "train.steps=1"))
    r = fuyou("reshard", str(tmp_path / "runs" / "wide"), "--nproc", "8", check=False)
    assert r.returncode != 0 and "at most 6" in r.stderr, r.stderr
    r = fuyou(*train_args(tmp_path, "plain", "train.steps=1", "offload.commit=none", "offload.keep_state=false"))
    r = fuyou("reshard", str(tmp_path / "runs" / "plain"), "--nproc", "2", check=False)
    assert r.returncode != 0 and "nothing to reshard" in r.stderr
    r = fuyou("reshard", str(tmp_path), "--nproc", "2", check=False)
    assert r.returncode != 0 and "not a run directory" in r.stderr
    snap = tmp_path / "runs" / "plain" / "snapshots" / "step-000001"  # (it said "trained by 1 process(es)")
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"")
    shutil.copy(tmp_path / "runs" / "plain" / "config.toml", snap)
    r = fuyou("reshard", str(snap), "--nproc", "2", check=False)
    assert r.returncode != 0 and "is a snapshot (weights only" in r.stderr, r.stderr
    from fuyou.store import TensorStore

    with TensorStore.open([tmp_path / "ssd" / "cut.fuyou-state"]):  # as a training process holds it
        r = fuyou("reshard", str(run), "--nproc", "2", check=False)
    assert r.returncode != 0 and "being trained" in r.stderr and "Traceback" not in r.stderr, r.stderr
    from fuyou.errors import ConfigError
    from fuyou.reshard import RESHARD_LOCK
    from fuyou.store.lock import held

    with held(run / RESHARD_LOCK, ConfigError):  # as another reshard of the run holds it (two at once said a
        r = fuyou("reshard", str(run), "--nproc", "2", check=False)  # healthy state was damaged or gone: a pass)
    assert r.returncode == 2 and "another fuyou reshard of" in r.stderr and "nothing was changed" in r.stderr, r.stderr
    assert not (run / RESHARD_LOCK).exists()
    assert_states(state, open_state(run))
    # (plain kept no state: commit=none cannot be resumed, so its state went with its end)
    assert sorted(p.name for p in (tmp_path / "ssd").iterdir()) == ["cut.fuyou-state", "wide.fuyou-state"]


def test_a_run_whose_ranks_records_are_a_commit_apart_is_resharded_at_the_newer_one(tmp_path):
    """Rank 1 killed while writing its record of step 3 (its state of step 3 synced, as every rank's
    before any record): reshard takes the newer commit, as a resume would, and the run resumed on one
    process ends as one process would have."""
    single(train_args(tmp_path, "whole", "train.grad_accum=2"))
    args = train_args(tmp_path, "cut", "train.grad_accum=2")
    procs = rank_procs(tmp_path, args, fault_rank=1, fault="commit@3")
    [p.communicate(timeout=300) for p in procs]
    run = tmp_path / "runs" / "cut"
    r = fuyou("reshard", str(run), "--nproc", "1")
    assert "at its step-3 commit" in r.stdout, r.stdout
    resume(run, 1)
    a, b = load_file(tmp_path / "runs" / "whole" / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_switch_whose_new_state_is_gone_moves_nothing(tmp_path):
    """After the decision the new state's directory is lost (removed by hand, or a power cut before its
    entry was durable): finishing refuses and leaves the old state as it was; dropping the decision
    keeps the run at its old world size."""
    run = cut_after_step_2(tmp_path, "cut", (), 1)
    state = open_state(run)
    r = fuyou("reshard", str(run), "--nproc", "2", check=False, FUYOU_FAULT="reshard_switch")
    assert r.returncode == -9
    import shutil

    shutil.rmtree(tmp_path / "ssd" / "cut.fuyou-state.rank1.reshard")
    r = fuyou("reshard", str(run), "--nproc", "2", check=False)
    assert r.returncode != 0 and "is missing" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "ssd" / "cut.fuyou-state").is_dir()
    (run / "reshard.json").unlink()
    assert_states(state, open_state(run))
    fuyou("reshard", str(run), "--nproc", "2")  # starts over (the other partial new state is removed first)
    assert sorted(p.name for p in (tmp_path / "ssd").iterdir()) == ["cut.fuyou-state", "cut.fuyou-state.rank1"]
    assert_states(state, open_state(run))


def test_a_resume_at_another_world_size_says_which_are_possible(tmp_path):
    """A new-user pass went in a circle: a 2-rank run (grad_accum 2) resumed by 3 was told to set
    train.grad_accum to a multiple of 3 (a resume keeps it), then to reshard for 3, which reshard refuses."""
    run = cut_after_step_2(tmp_path, "cut", (), 2)
    r = torchrun(["train", "--resume", str(run)], nproc=3, check=False)
    err = r.stderr
    assert r.returncode != 0 and "Traceback (most recent call last):\n  File \"/" not in err.split("fuyou: error")[0]
    assert "trained by 2 process(es) and this resume has 3" in err and f"fuyou reshard {run} --nproc 1`" in err, err
    assert "multiple of 3" not in err


def test_a_refusal_on_rank_0_before_the_run_is_every_ranks_not_a_dead_peer(tmp_path):
    """A data-parallel run whose run.name existed: rank 1 reported a dead peer and a commit to resume, then
    aborted (SIGABRT)."""
    torchrun(train_args(tmp_path, "taken", "train.grad_accum=2", "train.steps=1"))
    r = torchrun(train_args(tmp_path, "taken", "train.grad_accum=2", "train.steps=1"), check=False)
    assert "(rank 1 of 2): rank 0 refused the run (naming the run directory): run directory" in r.stderr, r.stderr
    assert "--resume" not in r.stderr and "terminate called" not in r.stderr, r.stderr


def test_a_reshard_keeps_whose_state_it_is(tmp_path):
    """Two runs of one run.name in different run.out_dir share a state directory name: a resume of the
    one refuses the other's state, by the owner file the state keeps. A reshard dropped that file, and the
    other run then resumed this one's state in silence, overwriting its own weights and deleting this
    run's state (a new-user pass). The resharded state keeps its owner; a reshard of the other run's state
    is refused, as its resume is; and a finished run is told so, not to choose a divisor of its grad_accum."""
    run = cut_after_step_2(tmp_path, "same", (), 1)
    other = tmp_path / "runs2"
    r = fuyou("reshard", str(run), "--nproc", "2")
    assert all((tmp_path / "ssd" / d / "fuyou-store-owner.json").is_file()
               for d in ("same.fuyou-state", "same.fuyou-state.rank1"))
    fuyou("reshard", str(run), "--nproc", "1")
    owner = json.loads((tmp_path / "ssd" / "same.fuyou-state" / "fuyou-store-owner.json").read_text())
    assert owner["run_dir"] == str(run.resolve()) and owner["run_id"] == json.loads(
        (run / "fuyou-run.json").read_text())["run_id"]
    # a second run of that name, elsewhere: its directory, with its own id, and no state of its own
    twin = other / "same"
    twin.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "config.toml", twin / "config.toml")
    (twin / "fuyou-run.json").write_text(json.dumps({"run_id": "another"}))
    state = open_state(run)
    r = fuyou("train", "--resume", str(twin), check=False)
    assert r.returncode != 0 and "another run named 'same'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = fuyou("reshard", str(twin), "--nproc", "2", check=False)
    assert r.returncode != 0 and "another run named 'same'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert_states(state, open_state(run))
    single(["train", "--resume", str(run), "offload.keep_state=false"])  # finishes; its state is deleted
    for n in ("2", "1"):  # ("1" said "resume it as it is", which is refused as finished: a pass)
        r = fuyou("reshard", str(run), "--nproc", n, check=False)
        assert r.returncode != 0 and "finished" in r.stderr and "--init-from" in r.stderr, r.stderr


def test_a_tensor_bigger_than_the_copy_unit_is_copied_whole(tmp_path, monkeypatch):
    """A mutation audit: reshard copies a tensor in units of COPY_BYTES; each unit must land at its own offset in
    the new store (every unit written at offset 0 left all but the last unit's bytes out)."""
    from fuyou import reshard
    from fuyou.store import TensorStore
    from fuyou.store.aligned import aligned_empty

    monkeypatch.setattr(reshard, "COPY_BYTES", 2**20)
    t = torch.randn(7 * 2**20 // 8 + 5, generator=torch.Generator().manual_seed(0))  # 3.5 MiB of fp32, and a tail
    with TensorStore.create([tmp_path / "a"]) as src, TensorStore.create([tmp_path / "b"]) as dst:
        src.allocate("w", t.shape, t.dtype)
        src.write_from("w", t).result()
        dst.allocate("w", t.shape, t.dtype)
        assert reshard._copy(src, dst, "w", aligned_empty(2**20)) == t.numel() * 4
        out = torch.empty_like(t)
        dst.read_into("w", out).result()
    assert torch.equal(out, t)


@pytest.mark.parametrize("killed_at", ["rename", "removal"])
def test_a_reshard_interrupted_between_its_renames_is_finished_by_running_it_again(tmp_path, monkeypatch, killed_at):
    """A mutation audit: the rerun of an interrupted switch moves aside only directories that still hold an old
    state (by the stores' ids); the new rank-0 state, already under the old name, must be neither moved nor deleted."""
    import os
    import shutil

    from fuyou import reshard
    from fuyou.store.layout import MARKER

    run, ssd = tmp_path / "run", tmp_path / "ssd"
    run.mkdir()
    ssd.mkdir()
    rank0, rank1 = ssd / "cut.fuyou-state", ssd / "cut.fuyou-state.rank1"
    for d, uid in ((rank0, "old"), (ssd / "cut.fuyou-state.reshard", "new0"), (ssd / "cut.fuyou-state.rank1.reshard",
                                                                               "new1")):
        d.mkdir()
        (d / MARKER).write_text(json.dumps({"uuid": uid}))
        (d / "data").write_text(uid)
    plan = {"world_from": 1, "world_to": 2, "step": 2, "backend": None, "old": [[str(rank0)]], "old_uuids": ["old"],
            "new": [[str(rank0)], [str(rank1)]], "new_uuids": ["new0", "new1"]}
    (run / reshard.PENDING).write_text(json.dumps(plan))
    renames = []

    class Killed(Exception):
        pass

    def replace(a, b):  # "rename": killed at the third rename (the old state aside, the new rank 0 in place)
        if killed_at == "rename" and len(renames) == 2:
            raise Killed
        renames.append((a, b))
        os.rename(a, b)

    def rmtree(d):  # "removal": killed once the old state is deleted, before the decision is
        shutil.rmtree(d)
        raise Killed

    with monkeypatch.context() as mp, pytest.raises(Killed):
        mp.setattr(reshard, "os", type("OS", (), {"replace": staticmethod(replace)}))
        mp.setattr(reshard, "shutil", type("SH", (), {"rmtree": staticmethod(rmtree)}))
        reshard._switch(run, plan)
    reshard._switch(run, json.loads((run / reshard.PENDING).read_text()))
    assert sorted(p.name for p in ssd.iterdir()) == ["cut.fuyou-state", "cut.fuyou-state.rank1"]
    assert (rank0 / "data").read_text() == "new0" and (rank1 / "data").read_text() == "new1"
    assert json.loads((run / "distributed.json").read_text())["world_size"] == 2
    assert not (run / reshard.PENDING).exists()
