"""Paths as a user gives them from scripts (a hostile pass): relative to a launch directory that is gone,
`.` for the run directory, a symlink of another name, `~`; a run directory another process took at the same
moment; an export whose SSD state moved."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

from fuyou.cli import main

TINY = ["model.preset=gpt-test", "model.n_layer=2", "train.precision=fp32", "data.seq_len=32",
        "train.micro_batch_size=2", "train.eval_batches=1", "train.eval_every=0"]


def _stopped_run(tmp_path, monkeypatch, name="r", ssd="ssd", out="runs", extra=()):
    """A run stopped by SIGTERM after 2 of 4 steps, launched from tmp_path/launch with relative paths."""
    import signal

    from fuyou.engine.engine import Engine

    launch = tmp_path / "launch"
    launch.mkdir(parents=True, exist_ok=True)
    original = Engine.train_step

    def train_step(self, step, *a, **k):
        done = original(self, step, *a, **k)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return done

    with monkeypatch.context() as m:
        m.chdir(launch)
        os.makedirs(ssd, exist_ok=True)
        m.setattr(Engine, "train_step", train_step)
        assert main(["train", "--offload", "ssd", "--ssd", ssd, "--cpu-mem", "256MiB", "--out", out,
                     f"run.name={name}", "train.steps=4", *TINY, *extra]) == 128 + signal.SIGTERM
    return launch


def test_resume_and_export_of_dot_a_symlink_and_from_another_directory(tmp_path, monkeypatch, capsys):
    """`--resume .` and `export .` looked for a state named ".fuyou-state" and called the run's state gone; a
    symlink of another name was told the run had been renamed. All three resume (or export) the run, equal to an
    undisturbed one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ref-ssd").mkdir()
    assert main(["train", "--offload", "ssd", "--ssd", "ref-ssd", "--cpu-mem", "256MiB", "--out", "ref",
                 "run.name=r", "train.steps=4", *TINY]) == 0
    want = load_file(str(tmp_path / "ref" / "r" / "model.safetensors"))
    launch = _stopped_run(tmp_path, monkeypatch)
    run = launch / "runs" / "r"
    monkeypatch.chdir(run)
    assert main(["export", ".", "--out", str(tmp_path / "exp")]) == 0  # (its last commit, step 2)
    assert "exporting its last commit (step 2)" in capsys.readouterr().err
    (tmp_path / "link").symlink_to(run)
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--model", "link", "--gpu", "rtx4090", "--ssd", "990-pro"]) == 0
    monkeypatch.chdir(run)
    assert main(["train", "--resume", "."]) == 0
    got = load_file(str(run / "model.safetensors"))
    assert all(bool((got[k] == want[k]).all()) for k in want)
    launch2 = _stopped_run(tmp_path / "b", monkeypatch)  # and a symlink of another name, from another directory
    (tmp_path / "link-b").symlink_to(launch2 / "runs" / "r")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "link-b"]) == 0
    got = load_file(str(launch2 / "runs" / "r" / "model.safetensors"))
    assert all(bool((got[k] == want[k]).all()) for k in want)


def test_relative_paths_are_kept_normalised_and_tilde_is_home(tmp_path, monkeypatch, capsys):
    """A run launched with --ssd ../ssd from a directory removed since was told its SSD directory
    ('/launch/../ssd') did not exist; `--out '~/runs'` made a directory named '~'; snapshot paths in
    metrics.jsonl were relative to each launch's directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "ssd").mkdir(parents=True)
    job = tmp_path / "job"
    job.mkdir()
    monkeypatch.chdir(job)
    assert main(["train", "--offload", "ssd", "--ssd", "~/ssd", "--cpu-mem", "256MiB", "--out", "~/runs",
                 "run.name=t", "train.steps=2", "train.save_every=1", "offload.keep_state=true", *TINY]) == 0
    run = tmp_path / "home" / "runs" / "t"
    assert run.is_dir() and not (job / "~").exists()
    saved = (run / "config.toml").read_text()
    assert f'ssd_dirs = ["{tmp_path / "home" / "ssd"}"]' in saved
    snaps = [json.loads(x)["snapshot"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"snapshot"' in x]
    assert snaps == [str(run / "snapshots" / "step-000001")]
    monkeypatch.chdir(tmp_path / "home")
    assert main(["train", "--offload", "ssd", "--ssd", "../home/ssd", "--cpu-mem", "256MiB", "--out", "runs",
                 "run.name=u", "train.steps=2", *TINY]) == 0
    saved = (tmp_path / "home" / "runs" / "u" / "config.toml").read_text()
    assert f'ssd_dirs = ["{tmp_path / "home" / "ssd"}"]' in saved


def test_a_run_directory_taken_meanwhile_leaves_no_state(tmp_path, monkeypatch, capsys):
    """Two runs of one name started at once on different SSDs: the one refused ("already exists") had already
    committed a full state for the directory, which later runs and resumes called another run's. It is removed."""
    from fuyou.train import loop

    real = loop.make_run_dir

    def taken(cfg, path, rid):  # the other process makes the directory between the check and this one's
        path.mkdir(parents=True)
        return real(cfg, path, rid)

    monkeypatch.setattr(loop, "make_run_dir", taken)
    (tmp_path / "ssd").mkdir()
    assert main(["train", "--offload", "ssd", "--ssd", str(tmp_path / "ssd"), "--cpu-mem", "256MiB", "--out",
                 str(tmp_path / "runs"), "run.name=race", "train.steps=2", *TINY]) == 2
    assert "run directory" in capsys.readouterr().err
    assert list((tmp_path / "ssd").iterdir()) == []


@pytest.mark.parametrize("lora", [False, True])
def test_an_export_whose_ssd_state_moved_takes_its_new_place(tmp_path, monkeypatch, capsys, lora):
    """It said to give the new place with --ssd, which export did not take (a link was the only way): export
    --ssd reads the moved state as train --resume and reshard do, to the same bytes, and refuses a state of
    another run of the same name found there."""
    extra = ("lora.rank=4",) if lora else ()
    launch = _stopped_run(tmp_path, monkeypatch, extra=extra)
    run = launch / "runs" / "r"
    assert main(["export", str(run), "--out", str(tmp_path / "before")]) == 0
    (launch / "ssd").rename(launch / "moved")
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert f"the SSD directory {launch / 'ssd'} of {run}'s state does not exist" in err
    assert f"fuyou export {run} --ssd NEW_DIR" in err
    assert main(["export", str(run), "--out", str(tmp_path / "exp"), "--ssd", str(launch / "moved")]) == 0
    files = ("adapter_model.safetensors",) if lora else ("model.safetensors",)
    for f in files:
        assert (tmp_path / "exp" / f).read_bytes() == (tmp_path / "before" / f).read_bytes()
    # a namesake's state where --ssd points: another run directory's, refused, nothing written
    other = _stopped_run(tmp_path / "other", monkeypatch, extra=extra)
    assert main(["export", str(run), "--out", str(tmp_path / "wrong"), "--ssd", str(other / "ssd")]) == 2
    assert f"is the state of another run named 'r' (the run in {other / 'runs' / 'r'})" in capsys.readouterr().err
    assert not (tmp_path / "wrong").exists()
    for given, says in ((tmp_path / "nowhere", "is not a directory: give the directory"),
                        (tmp_path / "before", "r.fuyou-state is not in")):  # (no state there)
        assert main(["export", str(run), "--out", str(tmp_path / "wrong"), "--ssd", str(given)]) == 2
        assert says in capsys.readouterr().err
    # the run still resumes from the moved state, as the message says
    assert main(["train", "--resume", str(run), "--ssd", str(launch / "moved")]) == 0


def test_export_ssd_of_a_run_without_ssd_state_says_so(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "runs"), "run.name=m", "train.steps=1", *TINY,
                 "train.save_every=0"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "runs" / "m"), "--out", str(tmp_path / "f"), "--ssd", str(tmp_path)]) == 0
    assert "note: --ssd is not read: " in capsys.readouterr().err  # (its weights are the run's latest)
    (tmp_path / "runs" / "m" / "model.safetensors").unlink()
    assert main(["export", str(tmp_path / "runs" / "m"), "--out", str(tmp_path / "e"), "--ssd", str(tmp_path)]) == 2
    assert "kept no SSD state (offload.mode=" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["/nonexistent/chat.jsonl", "chat.jsonl"])
def test_plan_config_says_when_its_data_is_not_here(tmp_path, monkeypatch, capsys, where):
    """plan --config planned a data.path that is not here as unpacked rows in silence (packed where it is)."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npreset = "gpt-tiny"\n[data]\npath = "{where}"\nseq_len = 64\n')
    assert main(["plan", "--config", str(cfg), "--gpu", "rtx4090", "--ssd", "990-pro"]) == 0
    assert f"note: the data {where} does not exist here: planned with unpacked rows" in \
        capsys.readouterr().err


def test_a_resume_with_the_same_relative_ssd_is_no_change(tmp_path, monkeypatch, capsys):
    """A review: config.toml records `--ssd ../ssd` normalised, and a resume giving the same `--ssd ../ssd`
    compared it unnormalised: "resumed with changes: offload.ssd_dirs"."""
    launch = _stopped_run(tmp_path / "x", monkeypatch, ssd="../ssd")
    monkeypatch.chdir(launch)
    capsys.readouterr()
    assert main(["train", "--resume", "runs/r", "--ssd", "../ssd"]) == 0
    assert "resumed with changes" not in capsys.readouterr().err


def test_a_resume_given_an_ssd_directory_without_its_state_exits_2_and_the_right_one_resumes(tmp_path, monkeypatch,
                                                                                            capsys):
    """An audit: `--resume RUN --ssd EMPTY` exited 4 ("a retry mends it"), every time: a scheduler would retry it
    forever. It is a resume that cannot go on as asked (2), and names where the state may be."""
    launch = _stopped_run(tmp_path, monkeypatch)
    monkeypatch.chdir(launch)
    os.makedirs("empty")
    capsys.readouterr()
    assert main(["train", "--resume", "runs/r", "--ssd", "empty"]) == 2
    err = capsys.readouterr().err
    assert "no training state in" in err and "resume with --ssd giving where its directories are now" in err, err
    assert main(["train", "--resume", "runs/r"]) == 0


def test_a_prepared_directory_under_home_is_prepared_data(tmp_path, monkeypatch):
    """A review: `data.path=~/prep` was read as text, its ~ expanded after the prepared-or-text decision."""
    from fuyou.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    text = tmp_path / "a.txt"
    text.write_text("some text to prepare. " * 200)
    assert main(["data", "prepare", str(text), "--out", str(tmp_path / "prep")]) == 0
    cfg = load_config(overrides=["data.path=~/prep"])
    assert cfg.data.source == "prepared" and cfg.data.path == [str(tmp_path / "prep")]


def test_the_same_command_again_names_what_the_run_directory_holds(tmp_path, monkeypatch, capsys):
    """A pass ran the same command again after a crash and was told to choose another run.name, with nothing of
    the committed state a resume continues (which a new name leaves on the SSD). Said now: a stopped run's
    resume, a finished run's export."""
    launch = _stopped_run(tmp_path, monkeypatch)
    monkeypatch.chdir(launch)
    again = ["train", "--offload", "ssd", "--ssd", "ssd", "--cpu-mem", "256MiB", "--out", "runs", "run.name=r",
             "train.steps=4", *TINY]
    capsys.readouterr()
    assert main(again) == 2
    run = launch / "runs" / "r"
    assert f"or continue the run it holds, which did not finish: `fuyou train --resume {run}`" in capsys.readouterr().err
    assert main(["train", "--resume", str(run)]) == 0
    capsys.readouterr()
    assert main(again) == 2
    assert f"(it holds a finished run: `fuyou export {run} --out DIR`, or --init-from" in capsys.readouterr().err
    # a finished run that saved no weights, and an in-memory run: nothing to resume (it said to resume them)
    for name, extra in (("nw", ["--offload", "ssd", "--ssd", "ssd", "run.save_weights=false"]), ("mem", [])):
        args = ["train", "--out", "runs", f"run.name={name}", "train.steps=1", *TINY, *extra]
        assert main(args) == 0
        if name == "mem":
            (launch / "runs" / name / "model.safetensors").unlink()
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "(the run it holds ended, or keeps no resumable state" in err and "--resume" not in err, err
