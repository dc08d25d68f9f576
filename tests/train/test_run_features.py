"""What a fine-tuning user expects of a run: snapshots, export of a stopped offloaded run from its SSD
state, fine-tuning defaults, schedules, resume notes, TensorBoard, and torchrun in memory refused."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fuyou.cli import main
from fuyou.config import load_config
from fuyou.optim.schedule import lr_at

SSD_RUN = ["model.preset=gpt-test", "model.n_layer=4", "data.seq_len=32", "train.micro_batch_size=2",
           "train.eval_every=0", "train.eval_batches=1", "offload.cpu_mem=1GiB", "train.precision=fp32"]


def ssd_cfg(tmp_path, *extra):
    ssd = tmp_path / "ssd"
    ssd.mkdir(exist_ok=True)
    return load_config(overrides=[*SSD_RUN, f"run.out_dir={tmp_path / 'runs'}", *extra],
                       flags={"offload.mode": "ssd", "offload.ssd_dirs": [str(ssd)]})


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_snapshots_are_the_weights_of_their_step_and_only_the_last_k_stay(tmp_path, capsys):
    from fuyou.train.loop import run_training

    flat = ["train.lr_schedule=constant", "train.warmup_steps=0"]  # the same learning rates whatever the steps
    full = run_training(ssd_cfg(tmp_path, "train.steps=8", "train.save_every=2", "train.keep_snapshots=2",
                                "run.name=snap", *flat))
    snaps = sorted(p.name for p in (full.run_dir / "snapshots").iterdir())
    assert snaps == ["step-000004", "step-000006"]  # step 8 is the final model.safetensors, not a snapshot
    short = run_training(ssd_cfg(tmp_path, "train.steps=4", "run.name=short", *flat))
    a = load_safetensors(full.run_dir / "snapshots" / "step-000004" / "model.safetensors")
    b = load_safetensors(short.run_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "snapshot" in x] == [2, 4, 6]
    # a snapshot is no resumable run: said so, with the two things it can be used for
    from fuyou.cli import main

    snap = full.run_dir / "snapshots" / "step-000004"
    capsys.readouterr()
    assert main(["train", "--resume", str(snap)]) == 2
    err = capsys.readouterr().err
    assert "is a snapshot" in err and f"--resume {full.run_dir.resolve()}" in err and f"--init-from {snap}" in err
    # a snapshot exports like a run
    from fuyou.train.run import export_run_dir as export_run

    pytest.importorskip("transformers")
    files = export_run(full.run_dir / "snapshots" / "step-000004", tmp_path / "hf")
    assert "config.json" in files


def test_a_stopped_offloaded_run_exports_its_last_commit(tmp_path):
    pytest.importorskip("transformers")
    from fuyou.train.run import export_run_dir as export_run
    from fuyou.train.loop import run_training

    ref = run_training(ssd_cfg(tmp_path, "train.steps=3", "run.name=ref"))
    stopped = run_training(ssd_cfg(tmp_path, "train.steps=3", "run.name=nosave", "run.save_weights=false",
                                   "offload.keep_state=true"))
    assert not (stopped.run_dir / "model.safetensors").exists()
    export_run(ref.run_dir, tmp_path / "a")
    export_run(stopped.run_dir, tmp_path / "b")
    a, b = load_safetensors(tmp_path / "a" / "model.safetensors"), load_safetensors(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_running_run_exports_its_last_commit_without_its_lock(tmp_path):
    pytest.importorskip("transformers")
    from fuyou.engine.committed import CommitMoved, CommittedWeights
    from fuyou.train.run import export_run_dir as export_run
    from fuyou.train.loop import run_training

    res = run_training(ssd_cfg(tmp_path, "train.steps=2", "run.name=live", "run.save_weights=false",
                               "offload.keep_state=true"))
    with CommittedWeights(res.run_dir) as owner:  # holds the store's lock, as a training process does
        assert not owner.live and owner.step == 2
        export_run(res.run_dir, tmp_path / "live")  # read beside the "running" owner
        with CommittedWeights(res.run_dir) as reader:
            assert reader.live
            record = reader._records[0]  # rank 0's (the only one here)
            record.write_bytes(record.read_bytes() + b" ")  # the run commits meanwhile
            with pytest.raises(CommitMoved, match="run the export again"):
                reader.tensor("embed.wte", reader.states[0].slots["wte"].shape)
            record.write_bytes(record.read_bytes()[:-1])
        # A commit lands between the reader's manifest and its record (a new-user pass saw "start a new
        # run" here): the record names a newer generation than the manifest read. Retried, then a sentence.
        from fuyou.engine.commit import write_record

        saved = record.read_bytes()
        body = {k: v for k, v in json.loads(saved).items() if k != "checksum"}
        write_record(record.parent, {**body, "generation": body["generation"] + 1000})
        with pytest.raises(CommitMoved, match="run the export again"):
            export_run(res.run_dir, tmp_path / "racing")
        assert not (tmp_path / "racing").exists()
        record.write_bytes(saved)
    export_run(res.run_dir, tmp_path / "stopped")
    a = load_safetensors(tmp_path / "live" / "model.safetensors")
    b = load_safetensors(tmp_path / "stopped" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_defaults_apply_to_unset_fields_only(tmp_path, capsys):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parents[1] / "hf"))
    from hf_testutil import make_hf_model

    model = make_hf_model(tmp_path / "m", "llama")
    cfg = load_config(overrides=[f"model.init_from={model}", "optim.lr=1e-4", "train.warmup_steps=5"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.0 and cfg.optim.beta2 == 0.999
    assert cfg.train.warmup_ratio is None and cfg.train.warmup == 5 and cfg.train.min_lr_ratio == 0.0
    assert "fine-tuning defaults" in capsys.readouterr().err
    scratch = load_config()
    assert scratch.optim.lr == 1e-3 and scratch.optim.weight_decay == 0.1


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules(schedule):
    lrs = [lr_at(s, 1.0, 10, 2, 0.1, schedule) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    if schedule == "constant":
        assert set(lrs[2:]) == {1.0}
    else:
        assert lrs[-1] == pytest.approx(0.1 + 0.9 * (0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi)).item())
                                                     if schedule == "cosine" else 1 / 8))
        assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_resume_with_more_steps_says_what_the_schedule_does(tmp_path, capsys):
    from fuyou.train.loop import run_training

    first = run_training(ssd_cfg(tmp_path, "train.steps=4", "run.name=r", "run.save_weights=false",
                                 "offload.keep_state=true"))
    cfg = load_config(first.run_dir / "config.toml", ["train.steps=8", "model.init_from=none"])
    capsys.readouterr()
    run_training(cfg, resume=first.run_dir)
    err = capsys.readouterr().err
    assert "train.steps 4 -> 8" in err and "as if it had been the run's from the start" in err


def test_resume_with_fewer_steps_than_done_is_refused_and_loses_nothing(tmp_path, capsys):
    """A resume whose train.steps is below the committed step would end the run there, save those weights
    and delete the resumable state: refused before anything changes; a resume with more steps then runs,
    and its summary counts the steps it ran."""
    from fuyou.errors import ConfigError
    from fuyou.train.loop import run_training

    first = run_training(ssd_cfg(tmp_path, "train.steps=4", "run.name=f", "run.save_weights=false",
                                 "offload.keep_state=true", "offload.commit_every=1"))
    files = sorted(p.name for p in first.run_dir.iterdir())
    with pytest.raises(ConfigError, match="has committed 4 steps and this resume sets train.steps=2"):
        run_training(load_config(first.run_dir / "config.toml", ["train.steps=2", "model.init_from=none"]),
                     resume=first.run_dir)
    assert sorted(p.name for p in first.run_dir.iterdir()) == files  # no weights saved, nothing recorded
    capsys.readouterr()
    run_training(load_config(first.run_dir / "config.toml", ["train.steps=6", "model.init_from=none"]),
                       resume=first.run_dir)
    assert "done: steps 5-6 of 6" in capsys.readouterr().err


def test_resume_after_the_ssd_directory_moved(tmp_path, capsys):
    """The SSD directories may move between a run and its resume: --ssd gives their new place (the store's
    markers make sure it is this run's state), the change is recorded; an empty directory is refused with
    a sentence that says what to do."""
    from fuyou.errors import FuyouError
    from fuyou.train.loop import run_training

    first = run_training(ssd_cfg(tmp_path, "train.steps=3", "run.name=mv", "run.save_weights=false",
                                 "offload.keep_state=true"))
    moved = tmp_path / "moved"
    (tmp_path / "ssd").rename(moved)
    with pytest.raises(FuyouError, match="give their new place with --ssd"):
        load_config(first.run_dir / "config.toml", ["train.steps=5", "model.init_from=none"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FuyouError, match="or it was moved"):
        run_training(load_config(first.run_dir / "config.toml", ["train.steps=5", "model.init_from=none"],
                                 {"offload.ssd_dirs": [str(tmp_path / "empty")]}), resume=first.run_dir)
    capsys.readouterr()
    run_training(load_config(first.run_dir / "config.toml", ["train.steps=5", "model.init_from=none"],
                             {"offload.ssd_dirs": [str(moved)]}), resume=first.run_dir)
    assert "done: steps 4-5 of 5" in capsys.readouterr().err
    entry = json.loads((first.run_dir / "resumes.jsonl").read_text().splitlines()[-1])
    assert str(moved) in json.dumps(entry)


def test_resume_after_the_data_file_moved_from_another_directory(tmp_path, capsys, monkeypatch):
    """A run started with relative paths is resumed from another working directory with its data file
    moved: config.toml holds absolute paths, data.path gives the file's new place, and the change is
    recorded (a new-user pass could resume only by editing config.toml)."""
    from fuyou.cli import main

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "ssd").mkdir(parents=True)
    elsewhere.mkdir()
    (work / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog. " * 300)
    monkeypatch.chdir(work)
    assert main(["train", "--offload", "ssd", "--ssd", "ssd", "--out", "runs", "data.source=text", "data.path=corpus.txt",
                 *SSD_RUN, "train.steps=3", "run.name=dm", "run.save_weights=false", "offload.keep_state=true"]) == 0
    saved = (work / "runs" / "dm" / "config.toml").read_text()
    assert f'path = ["{work / "corpus.txt"}"]' in saved and f'ssd_dirs = ["{work / "ssd"}"]' in saved
    (work / "corpus.txt").rename(elsewhere / "corpus.txt")
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--resume", str(work / "runs" / "dm"), "train.steps=5"]) == 2
    assert "corpus.txt' does not exist" in capsys.readouterr().err  # the old place, named
    assert main(["train", "--resume", str(work / "runs" / "dm"), "train.steps=5", "data.path=corpus.txt"]) == 0
    assert "done: steps 4-5 of 5" in capsys.readouterr().err
    entry = json.loads((work / "runs" / "dm" / "resumes.jsonl").read_text().splitlines()[-1])
    assert entry["changed"]["data.path"] == [[str(work / "corpus.txt")], ["corpus.txt"]]


def test_a_resume_over_changed_data_says_so(tmp_path, capsys, monkeypatch):
    """Data that changed between a run and its resume (here: grown) changes the batches, the epochs'
    steps and the held-out set: the resume says so and records it (it was silent: 44 steps became 87)."""
    from fuyou.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ssd").mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    assert main(["train", "--offload", "ssd", "--ssd", "ssd", "--out", "runs", "data.source=text", f"data.path={corpus}",
                 *SSD_RUN, "train.epochs=1", "run.name=grow", "run.save_weights=false", "offload.keep_state=true"]) == 0
    run = tmp_path / "runs" / "grow"
    steps = json.loads((run / "data-files.json").read_text())["steps"]
    assert steps >= 1
    corpus.write_text(corpus.read_text() * 2)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 0
    err = capsys.readouterr().err
    assert f"the data changed since the run started ({corpus}: 2.64 KiB, modified" in err, err  # in words
    assert "-> 5.27 KiB, modified" in err and "train.steps (from train.epochs)" in err
    assert "[[" not in err.split("resumed with changes")[1]  # not the raw record
    entry = json.loads((run / "resumes.jsonl").read_text().splitlines()[-1])
    assert entry["changed"]["train.steps (from train.epochs)"][0] == steps
    assert json.loads((run / "data-files.json").read_text())["steps"] > 2 * steps  # the record follows the data


def test_data_grown_under_an_epochs_run_says_what_its_schedule_and_epochs_do(tmp_path, capsys, monkeypatch):
    """Grown data makes more steps of the same train.epochs: the learning rate jumped at the resume with no
    note (the note came only when train.epochs itself changed), and metrics.jsonl's epoch went back (1.38 ->
    0.86) unexplained (a hostile pass). Both are said now."""
    from fuyou.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ssd").mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    assert main(["train", "--offload", "ssd", "--ssd", "ssd", "--out", "runs", "data.source=text",
                 f"data.path={corpus}", *SSD_RUN, "train.epochs=1", "run.name=g", "run.save_weights=false",
                 "offload.keep_state=true"]) == 0
    run = tmp_path / "runs" / "g"
    steps = json.loads((run / "data-files.json").read_text())["steps"]
    corpus.write_text(corpus.read_text() * 3)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "note: the learning-rate schedule is a function of the step and train.steps (from train.epochs)" in err, err
    assert f"from step {steps + 1} on the run follows the new schedule" in err
    assert f"note: the run's place in its data is a count of batches ({steps} steps')" in err
    assert "metrics.jsonl's epoch counts the changed data from here on" in err


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from fuyou.train.loop import run_training

    cfg = load_config(overrides=["model.preset=gpt-test", "data.seq_len=32", "train.steps=3", "train.eval_every=0",
                                 "train.micro_batch_size=2", "train.eval_batches=1", f"run.out_dir={tmp_path}",
                                 "run.name=tb", "run.tensorboard=true", "train.log_every=1"])
    res = run_training(cfg)
    events = list((res.run_dir / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(res.run_dir / "tb"))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and len(acc.Scalars("train/loss")) == 3
    assert "eval/eval_loss" in acc.Tags()["scalars"]


def test_metrics_lines_are_strict_json_with_time_tokens_and_epoch(tmp_path):
    from fuyou.train.loop import run_training

    cfg = load_config(overrides=["model.preset=gpt-test", "data.seq_len=32", "train.steps=2", "train.eval_every=0",
                                 "train.micro_batch_size=2", "train.eval_batches=1", f"run.out_dir={tmp_path}",
                                 "run.name=m", "train.log_every=1"])
    res = run_training(cfg)
    for line in (res.run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        assert "time" in rec
        if "step" in rec and "summary" not in rec:
            assert rec["tokens"] == rec["step"] * 2 * 32 and rec["epoch"] >= 0 and (rec["epoch"] > 0) == (rec["step"] > 0)


def test_torchrun_in_memory_is_refused_with_a_sentence(tmp_path):
    """Data parallelism runs the offloaded engine; several in-memory processes are refused before anything."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    r = subprocess.run([sys.executable, "-m", "fuyou.cli", "train", "train.steps=1", f"run.out_dir={tmp_path}"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "offload.mode=none" in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())  # nothing started


def test_epochs_larger_than_a_step_say_how_many_they_draw(tmp_path, capsys):
    """11 short examples pack into fewer rows than one step of 16 draws: train.epochs=1 rounds up to a
    step of several epochs, and the run says so (a new-user pass saw epoch 1.45 reported, unexplained)."""
    from fuyou.cli import main

    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "completion": f" {i + 1}."}) + "\n"
                            for i in range(12)))
    assert main(["train", "--out", str(tmp_path / "runs"), "model.preset=gpt-test", "data.source=text",
                 f"data.path={data}", "data.seq_len=32", "train.epochs=1", "train.eval_every=0"]) == 0
    err = capsys.readouterr().err
    assert "rounds up to 1 step(s), which draw" in err and "lower train.micro_batch_size" in err


def test_notes_for_a_llama_beyond_its_positions_and_a_cpu_budget_in_memory(tmp_path, capsys):
    """Both were accepted without a word (new-user pass): a Llama trained past model.max_seq_len, and
    --cpu-mem given to an in-memory run, which it does not budget."""
    from fuyou.cli import main

    assert main(["train", "--out", str(tmp_path / "runs"), "--cpu-mem", "1MiB", "model.preset=llama-test",
                 "data.seq_len=128", "train.steps=1", "train.eval_every=0"]) == 0
    err = capsys.readouterr().err
    assert "data.seq_len=128 is beyond the model's 64 positions" in err
    assert "offload.cpu_mem (--cpu-mem) applies to SSD offload (--offload ssd) and is ignored in memory" in err
    # the GPU budget and the activation policy were ignored without a word
    assert main(["train", "--out", str(tmp_path / "runs"), "--gpu-mem", "1GiB", "--act-policy", "fc2=ssd",
                 "model.preset=gpt-test", "data.seq_len=32", "train.steps=1", "train.eval_every=0"]) == 0
    assert "offload.gpu_mem (--gpu-mem), offload.act_policy (--act-policy) apply to SSD offload" in \
        capsys.readouterr().err
    # a config file's SSD directories without offload.mode=ssd trained in memory without a word
    (tmp_path / "c.toml").write_text(f'[offload]\nssd_dirs = ["{tmp_path}"]\n')
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "runs"),
                 "model.preset=gpt-test", "data.seq_len=32", "train.steps=1", "train.eval_every=0"]) == 0
    assert "offload.ssd_dirs (--ssd) applies to SSD offload" in capsys.readouterr().err


@pytest.mark.parametrize("offload", [(), ("--offload", "ssd", "offload.commit=none")])
def test_a_stopped_run_without_commits_keeps_its_weights_and_says_how_to_go_on(tmp_path, offload):
    """Ctrl-C on an in-memory run, and on an SSD run with offload.commit=none (a later pass), said "(committed);
    continue with: fuyou train --resume", saved nothing, and that resume was refused. Now the stopped step's
    weights are a snapshot a new run starts from."""
    import signal
    import time

    run = tmp_path / "runs" / "stop"
    ssd = ("--ssd", str(tmp_path / "ssd"), "--cpu-mem", "1GiB") if offload else ()
    (tmp_path / "ssd").mkdir()
    cmd = [sys.executable, "-m", "fuyou.cli", "train", *offload, *ssd, "model.preset=gpt-test", "model.n_layer=4",
           "data.seq_len=32", "train.micro_batch_size=2", "train.steps=100000", "train.log_every=1",
           "train.eval_every=0", f"run.out_dir={tmp_path / 'runs'}", "run.name=stop"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            m = run / "metrics.jsonl"
            if m.exists() and '"loss"' in m.read_text():
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    snaps = list((run / "snapshots").glob("step-*"))
    assert len(snaps) == 1 and (snaps[0] / "model.safetensors").is_file(), out
    assert f"are in {snaps[0].relative_to(Path.cwd()) if snaps[0].is_relative_to(Path.cwd()) else snaps[0]}" in out
    assert "keeps no resumable state" in out and "--init-from" in out and "(committed)" not in out
    assert ("offload.commit=none keeps no" in out) == bool(offload)
    assert list((tmp_path / "ssd").iterdir()) == []  # a state never committed is of no use: it goes
    r = subprocess.run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(run)], capture_output=True,
                       text=True, env=env, timeout=120)  # (commit=none: it said "never committed ... or moved")
    assert r.returncode == 2 and "keeps no resumable state" in r.stderr and f"--init-from {snaps[0]}" in r.stderr, \
        r.stderr
    from fuyou.train.loop import run_training

    go_on = run_training(load_config(overrides=[f"model.init_from={snaps[0]}", "data.seq_len=32", "train.steps=1",
                                                "train.micro_batch_size=2", f"run.out_dir={tmp_path / 'runs'}",
                                                "run.name=again"]))
    assert (go_on.run_dir / "model.safetensors").is_file()


def test_one_ctrl_c_in_backward_stops_at_the_steps_end_with_a_commit(tmp_path):
    """FUYOU_FAULT=sigint:backward@1 sent SIGINT at every stage's backward: one more than half a second after the
    first was a second Ctrl-C ("exit at once"), and the run kept only its step-0 commit (an audit). One Ctrl-C
    in backward finishes the step, commits it, and the resume from there ends with an uninterrupted run's
    weights."""
    import signal

    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    (tmp_path / "ssd").mkdir()

    def train(name, *extra, fault=None):
        cmd = [sys.executable, "-m", "fuyou.cli", "train", "--offload", "ssd", "--ssd", str(tmp_path / "ssd"),
               *SSD_RUN, "model.preset=gpt-tiny", "model.n_layer=8", "data.seq_len=256",  # (a backward far longer
               "train.micro_batch_size=16", "optim.moments=int8", "offload.commit_every=2", "train.steps=4",  # than
               f"run.out_dir={tmp_path / 'runs'}", f"run.name={name}", *extra]  # the 0.5 s of a repeated signal)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**env, "FUYOU_FAULT": fault} if fault else env)

    r = train("cut", fault="sigint:backward@1")
    assert r.returncode == 128 + signal.SIGINT and "after step 2 (committed)" in r.stderr, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(tmp_path / "runs" / "cut")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "resuming at step 2" in r.stderr, r.stderr[-2000:]
    assert train("whole").returncode == 0
    cut, whole = (load_file(tmp_path / "runs" / n / "model.safetensors") for n in ("cut", "whole"))
    assert all(torch.equal(cut[k], whole[k]) for k in whole)


def test_the_resume_schedule_note_counts_steps_as_the_progress_line_does():
    """It said "learning rate at step 5 0.00708 -> 0" resuming a finished 5-step run at train.steps=5 (no step
    left to run; the old schedule read past its end) and counted steps from 0."""
    from fuyou.optim.schedule import lr_of
    from fuyou.train.loop import _schedule_change

    old = load_config(overrides=["train.steps=5", "train.warmup_steps=0"])
    new = load_config(overrides=["train.steps=10", "train.warmup_steps=0"])
    note = _schedule_change(old, new, 2, {"train.steps": (5, 10)})
    assert "from step 3 on" in note and f"at step 3 {lr_of(old, 2):.3g} -> {lr_of(new, 2):.3g}" in note
    assert f"at the last step (10) {lr_of(new, 9):.3g}" in note
    assert _schedule_change(old, old.model_copy(), 5, {"optim.lr": (1, 2)}) is None  # nothing left to run
    longer = _schedule_change(old, new, 5, {"train.steps": (5, 10)})  # the old schedule has no step 6
    assert "at step 6 " in longer and "->" not in longer.split("at step 6 ")[1].split(",")[0]


def test_a_finished_run_is_not_resumed_and_says_how_to_train_on(tmp_path, capsys, monkeypatch):
    """--resume of a finished run said its state was never committed, deleted or moved."""
    from fuyou.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ssd").mkdir()
    assert main(["train", "--offload", "ssd", "--ssd", "ssd", "--out", "runs", *SSD_RUN, "train.steps=2",
                 "run.name=fin"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "runs/fin", "train.steps=4"]) == 2
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "fin"  # (absolute: a resume's run directory is named as it is, whatever the cwd)
    assert f"{run} finished: its weights are in {run}/model.safetensors" in err and f"--init-from {run}" in err


def test_a_resume_that_changes_the_adapters_scale_says_so():
    from fuyou.errors import ConfigError
    from fuyou.train.run import resume_changes

    saved = load_config(overrides=["lora.rank=4", "lora.alpha=8"])
    with pytest.raises(ConfigError, match=r"lora.alpha \(8.0 -> 16.0\): they set the scale its committed adapters"
                                          r".*or train new adapters with the new values: .*--merge"):
        resume_changes(saved, load_config(overrides=["lora.rank=4", "lora.alpha=16"]))
    # the default targets named as such (they read None), and no advice of lora.init_from, which refuses an adapter
    # of other settings (a pass followed it into a second refusal)
    with pytest.raises(ConfigError, match=r"lora.targets \(\['c_attn'\] -> \['c_attn', 'c_proj'\]\)") as e:
        resume_changes(saved, load_config(overrides=["lora.rank=4", "lora.alpha=8", "lora.targets=[c_attn,c_proj]"]))
    assert "lora.init_from" not in str(e.value)
    with pytest.raises(ConfigError, match="start a new run with lora.init_from its exported adapter"):  # lora.base: it
        resume_changes(saved, load_config(overrides=["lora.rank=4", "lora.alpha=8", "lora.base=int8"]))  # works


@pytest.mark.parametrize("hw, says", [
    ("hardware.ssd=2x990-pro", "(2 drives: hardware.ssd=2x990-pro, not one per file system of the SSD directories "
                               "(1; a preset such as 1x990-pro counts so)) last"),
    ("hardware.ssd_tbw=600", "rated 0.6 PB (1 drive: one per file system of the SSD directories) last"),
])
def test_the_wear_summary_says_how_it_counted_the_drives(tmp_path, capsys, hw, says):
    """Two SSD directories: a preset rated its drives, a per-drive rating one per directory; the summary
    says which it counted (a new-user pass read the two as inconsistent). Two directories on one file system
    are one drive (a later pass saw the drives' life doubled)."""
    from fuyou.cli import main

    for d in ("s1", "s2"):
        (tmp_path / d).mkdir()
    assert main(["train", "--offload", "ssd", "--ssd", str(tmp_path / "s1"), "--ssd", str(tmp_path / "s2"), "--out",
                 str(tmp_path / "runs"), *SSD_RUN, "train.steps=2", hw]) == 0
    assert says in capsys.readouterr().err


def test_unknown_hardware_presets_are_refused_by_train(tmp_path, capsys):
    """fuyou plan refused them; fuyou train wrote them to config.toml and its summary then asked for a preset
    (a hostile pass)."""
    from fuyou.cli import main

    for bad, says in (("hardware.gpu=rtx9090", "unknown GPU hardware.gpu='rtx9090'"),
                      ("hardware.ssd=99-pro", "unknown SSD '99-pro'"), ("hardware.pcie=gen9x1", "unknown PCIe")):
        assert main(["train", "--out", str(tmp_path / "runs"), "train.steps=1", bad]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_change_in_the_number_of_data_files_is_said(tmp_path):
    from fuyou.train.records import data_files_change

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x")
    b.write_text("y")
    cfg = load_config(overrides=[f"data.path=[{str(a)!r}, {str(b)!r}]".replace("'", '"')])
    text = data_files_change(cfg, [[1, 10**18]], [[1, 10**18], [1, 10**18]])
    assert f"{b}: not given -> 1 B, modified" in text, text  # (it printed "the data changed ... ()")


def test_evaluation_reads_are_not_counted_in_a_training_step(tmp_path):
    """Evaluations read every stage's weights (nothing cached here); those reads landed in the next training
    step's record, which then read about twice what the others did (a review of the counters' change)."""
    from fuyou.train.loop import run_training

    res = run_training(ssd_cfg(tmp_path, "train.steps=6", "train.eval_every=2", "train.log_every=1",
                               "offload.cache_weights=false", "run.name=ev"))
    reads = [x["ssd_read_bytes"] for x in map(json.loads, (res.run_dir / "metrics.jsonl").read_text().splitlines())
             if "ssd_read_bytes" in x and "summary" not in x]
    assert len(reads) == 6 and max(reads[1:]) <= 1.2 * min(reads[1:]), reads


@pytest.mark.parametrize("change", ["train.grad_accum=2", "train.micro_batch_size=8", "data.seq_len=64",
                                    "train.global_batch=8"])
def test_a_resume_cannot_change_the_batch_the_data_position_counts_in(change):
    """A new-user pass: grad_accum 1 -> 2 on resume moved the data position to step x the new batch,
    skipping 44 of an epoch's 95 examples with only a note; refused now, saying why."""
    from fuyou.errors import ConfigError
    from fuyou.train.run import resume_changes

    saved = load_config(overrides=["train.micro_batch_size=4", "data.seq_len=32"])
    with pytest.raises(ConfigError, match="place in the data is counted in steps"):
        resume_changes(saved, load_config(overrides=["train.micro_batch_size=4", "data.seq_len=32", change]))
    if change.startswith("train.global_batch"):  # (it named only the grad_accum it implies, not what was given)
        with pytest.raises(ConfigError, match=r"grad_accum \(1 -> 2\) \(from train.global_batch=8: the run's "
                                              r"micro_batch_size x grad_accum is 4 x 1\)"):
            resume_changes(saved, load_config(overrides=["train.micro_batch_size=4", "data.seq_len=32", change]))
    assert "optim.lr" in resume_changes(saved, load_config(overrides=["train.micro_batch_size=4", "data.seq_len=32",
                                                                       "optim.lr=1e-5"]))


@pytest.mark.parametrize("change", ["train.seed=99", "data.packing=false", "data.val_fraction=0.3",
                                    "data.format=alpaca", "data.jsonl_field=body", "data.train_on_prompt=true"])
def test_a_resume_cannot_change_which_rows_the_data_makes(change):
    """A new-user pass resumed an epochs run with train.seed or data.packing changed (examples of the epoch
    under way skipped or repeated) and data.val_fraction raised (examples trained on held out), each only
    listed as a change: refused now, saying why."""
    from fuyou.errors import ConfigError
    from fuyou.train.run import resume_changes

    text = Path(__file__).parents[2] / "pyproject.toml"  # (text data not named plain text reads every one of them)
    base = ["data.seq_len=32", f"data.path={text}"]
    saved = load_config(overrides=base)
    key = change.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"cannot change {re.escape(key)} .*skip or repeat examples of the epoch"):
        resume_changes(saved, load_config(overrides=[*base, change]))
    # a setting the data does not read is listed, not refused (the review): the built-in corpus has no records
    # to format or pack, and held-out files leave nothing to data.val_fraction
    if key != "train.seed":
        others = ["data.seq_len=32", *([f"data.path={text}", f"data.eval_path={text}"] if "val_fraction" in key
                                       else [])]
        assert key in resume_changes(load_config(overrides=others), load_config(overrides=[*others, change]))
    if key not in ("train.seed", "data.val_fraction"):  # plain-text files read no record settings (a pass)
        plain = ["data.seq_len=32", f"data.path={Path(__file__).parents[2] / 'README.md'}"]
        assert key in resume_changes(load_config(overrides=plain), load_config(overrides=[*plain, change]))


def test_a_resume_compares_with_the_commit_not_only_with_config_toml(tmp_path, capsys):
    """A new-user pass doubled micro_batch_size in a stopped run's config.toml and resumed: the check against
    config.toml passed (the file was the baseline), and the run went on at the wrong place in the data."""
    from fuyou.errors import ConfigError
    from fuyou.train.loop import run_training

    first = run_training(ssd_cfg(tmp_path, "train.steps=3", "run.name=ed", "run.save_weights=false",
                                 "offload.keep_state=true"))
    toml = first.run_dir / "config.toml"
    original = toml.read_text()
    assert "micro_batch_size = 2\n" in original
    toml.write_text(original.replace("micro_batch_size = 2\n", "micro_batch_size = 4\n"))
    files = {p: p.stat().st_mtime_ns for p in [*first.run_dir.iterdir(), *(tmp_path / "ssd").rglob("*")]}
    with pytest.raises(ConfigError, match=r"made with train.micro_batch_size = 2 \(now 4\).*was edited since"):
        run_training(load_config(toml, ["train.steps=5", "model.init_from=none"]), resume=first.run_dir)
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing changed
    toml.write_text(original.replace("seed = 1234\n", "seed = 7\n"))  # (an edited seed was resumed in silence)
    files = {p: p.stat().st_mtime_ns for p in [*first.run_dir.iterdir(), *(tmp_path / "ssd").rglob("*")]}
    with pytest.raises(ConfigError, match=r"made with train.seed = 1234 \(now 7\).*was edited since"):
        run_training(load_config(toml, ["train.steps=5", "model.init_from=none"]), resume=first.run_dir)
    assert {p: p.stat().st_mtime_ns for p in files} == files
    toml.write_text(original)
    capsys.readouterr()
    run_training(load_config(toml, ["train.steps=5", "model.init_from=none"]), resume=first.run_dir)
    assert "done: steps 4-5 of 5" in capsys.readouterr().err


def test_snapshots_are_ordered_by_step_and_a_resume_sets_aside_the_later_ones(tmp_path):
    """A new-user pass: pruning sorted names as text (step-1000000 before step-999999 deleted the newest),
    and a resume from an earlier commit kept the abandoned trajectory's later snapshots over its own."""
    from fuyou.train.run import set_aside_later_snapshots, snapshot_dirs

    root = tmp_path / "run" / "snapshots"
    for step in (999998, 999999, 1000000, 5, 20, 10):
        (root / f"step-{step:06d}").mkdir(parents=True)
    (root / ".step-000030.tmp").mkdir()
    assert [p.name for p in snapshot_dirs(root)][-1] == "step-1000000"
    assert [p.name for p in snapshot_dirs(root)][0] == "step-000005"
    moved, dropped = set_aside_later_snapshots(tmp_path / "run", 10)
    assert sorted(p.name for p in moved) == ["abandoned-step-000020", "abandoned-step-1000000",
                                             "abandoned-step-999998", "abandoned-step-999999"] and not dropped
    # the snapshot of the commit it resumes from is of its own trajectory: kept (a mutation audit: set aside too)
    assert [p.name for p in snapshot_dirs(root)] == ["step-000005", "step-000010"]
    # killed and resumed again: the redone steps' snapshots are the same weights, and a copy piled up at every
    # kill (a new-user pass); one of another lineage (a resume that changed the learning rate) is kept beside,
    # and one without a record (older) is never taken for another
    from fuyou.train.run import SNAPSHOT_RECORD, lineage

    run = tmp_path / "run"
    same = json.dumps({"step": 20, "lineage": lineage(run)})
    (root / "abandoned-step-000020" / SNAPSHOT_RECORD).write_text(same)
    (run / "resumes.jsonl").write_text(json.dumps({"resumed_at_step": 10, "changed": {"optim.lr": [1, 2]}}) + "\n")
    other = json.dumps({"step": 20, "lineage": lineage(run)})
    (root / "abandoned-step-000020" / "config.toml").write_text("lr = 0.001\n")
    (root / "abandoned-step-000020" / "model.safetensors").write_bytes(bytes(range(256)) * 2**14)
    # (a hostile pass: an edited config.toml's learning rate is no recorded change, and the snapshot it made was
    # deleted as "the same"; it is told by the snapshot's config.toml and by sampling the weights)
    for record, lr, flip in ((same, "0.001", None), (other, "0.001", None), (same, "0.001", None),
                             (None, "0.001", None), (other, "0.001", None), (same, "0.01", None),
                             (same, "0.001", 3 * 2**20 + 5), (same, "0.001", None)):
        (root / "step-000020").mkdir()
        if record:
            (root / "step-000020" / SNAPSHOT_RECORD).write_text(record)
        (root / "step-000020" / "config.toml").write_text(f"lr = {lr}\n")
        weights = bytearray(bytes(range(256)) * 2**14)
        if flip is not None:
            weights[flip] ^= 1
        (root / "step-000020" / "model.safetensors").write_bytes(bytes(weights))
        set_aside_later_snapshots(run, 10)
    assert sorted(p.name for p in root.iterdir() if p.name.endswith("-step-000020")) == [
        "abandoned-2-step-000020", "abandoned-3-step-000020", "abandoned-4-step-000020", "abandoned-5-step-000020",
        "abandoned-step-000020"]
    assert not (root / "abandoned-3-step-000020" / SNAPSHOT_RECORD).exists()
    assert "0.01" in (root / "abandoned-4-step-000020" / "config.toml").read_text()


def test_a_full_run_directory_gives_typed_errors_and_a_clean_log(tmp_path, monkeypatch):
    """A new-user pass on a small tmpfs: a snapshot that did not fit stopped the run and pointed --resume
    at its temporary directory; a metrics line that did not fit was a traceback and left a torn line that
    the resumed run's next record was glued to."""
    import errno

    from fuyou.errors import FuyouError
    from fuyou.train.metrics import MetricsLog
    from fuyou.train.run import SaveError, save_weights

    class Full:
        def master_chunks(self):
            raise OSError(errno.ENOSPC, "No space left on device")
            yield

    cfg = load_config(overrides=["offload.mode=ssd", "model.preset=gpt-test"], flags={"offload.ssd_dirs": [str(tmp_path)]})
    snap = tmp_path / "run" / "snapshots" / ".step-000010.tmp"
    snap.mkdir(parents=True)
    with pytest.raises(SaveError, match=r"--resume .*run` saves it") as e:
        save_weights(snap, Full(), cfg, 10, run_dir=tmp_path / "run")
    assert ".tmp" not in str(e.value).split("--resume")[1]
    log_path = tmp_path / "run" / "metrics.jsonl"
    log_path.write_text('{"step": 1}\n{"step": 2, "lo')  # torn by a full disk
    log = MetricsLog(log_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(log._fh, "write", full)
    with pytest.raises(FuyouError, match="free space in .* `fuyou train --resume"):
        log.write({"step": 3})
    log.close()
    log = MetricsLog(log_path)
    log.write({"step": 2})
    log.close()
    import json

    assert [json.loads(line)["step"] for line in log_path.read_text().splitlines()] == [1, 2]


def test_a_snapshot_that_fails_does_not_stop_the_run(tmp_path, monkeypatch, capsys):
    from fuyou.cli import main
    from fuyou.train import loop
    from fuyou.train.run import SaveError

    def full(*a, **k):
        raise SaveError("writing snapshots/.step-000001.tmp/model.safetensors failed (No space left on device)")

    monkeypatch.setattr(loop, "save_snapshot", full)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ssd").mkdir()
    assert main(["train", "--offload", "ssd", "--ssd", "ssd", "--out", "runs", *SSD_RUN, "train.steps=3",
                 "train.save_every=1", "run.name=snap"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: the snapshot of step") == 2 and "done: 3 steps" in err, err
    assert (tmp_path / "runs" / "snap" / "model.safetensors").is_file()


def test_evaluation_batches_beyond_the_held_out_tokens_are_noted(capsys):
    """A new-user pass: train.eval_batches=200 re-counted the 23k held-out tokens 4.4 times, silently."""
    from fuyou.data import load_data
    from fuyou.data.batches import make_batches

    cfg = load_config(overrides=["train.eval_batches=200", "train.micro_batch_size=4"])
    make_batches(cfg, load_data(cfg.data))
    err = capsys.readouterr().err
    assert "its windows overlap, each token counted about" in err and "train.eval_batches=" in err, err
    make_batches(load_config(), load_data(load_config().data))  # the default run: no note
    assert "overlap" not in capsys.readouterr().err


def test_a_run_directory_deleted_while_training_stops_the_run_with_an_error(tmp_path, monkeypatch, capsys):
    """A long-run pass deleted the run directory mid-run: TensorBoard's writer thread died with a
    traceback, and the advice named --resume of a directory that was gone."""
    import shutil

    from fuyou.cli import main
    from fuyou.train.metrics import MetricsLog, tensorboard_available

    write = MetricsLog.write

    def deleting(self, record):
        if record.get("step") == 2 and "loss" in record:
            shutil.rmtree(self.path.parent)
        return write(self, record)

    monkeypatch.setattr(MetricsLog, "write", deleting)
    (tmp_path / "ssd").mkdir()
    rc = main(["train", "--offload", "ssd", "--ssd", str(tmp_path / "ssd"), "--out", str(tmp_path / "runs"),
               "model.preset=gpt-test", "data.seq_len=32", "train.steps=4", "train.log_every=1", "run.name=gone",
               f"run.tensorboard={'true' if tensorboard_available() else 'false'}"])
    err = capsys.readouterr().err
    assert rc == 4 and "Traceback" not in err, err  # (a failure while running: fuyou/errors.py)
    assert f"the run directory {tmp_path / 'runs' / 'gone'} was deleted or moved while training" in err, err
    assert not (tmp_path / "runs" / "gone").exists()  # nothing recreated it half-way


def test_a_resume_of_a_damaged_config_toml_says_so(tmp_path, capsys):
    """A review: the tokenizer check of --resume read config.toml itself, and a damaged file gave a traceback."""
    from fuyou.cli import main

    run = tmp_path / "runs" / "bad"
    run.mkdir(parents=True)
    (run / "config.toml").write_text("[data\ntokenizer = 1\n")
    assert main(["train", "--resume", str(run)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def test_a_renamed_finished_run_that_kept_its_state_is_told_so(tmp_path, capsys):
    """A new-user pass renamed a finished run that kept its state (offload.keep_state=true): the resume said
    the run had finished and removed its state, which it had not."""
    from fuyou.cli import main
    from fuyou.train.loop import run_training

    first = run_training(ssd_cfg(tmp_path, "train.steps=2", "run.name=kept", "offload.keep_state=true"))
    moved = first.run_dir.with_name("kept-renamed")
    first.run_dir.rename(moved)
    capsys.readouterr()
    assert main(["train", "--resume", str(moved), "train.steps=3"]) == 2
    err = capsys.readouterr().err
    assert "kept.fuyou-state (the run directory was named 'kept')" in err and "old name back" in err, err


@pytest.mark.parametrize("lora", [False, True])
def test_a_finished_run_resumed_and_stopped_exports_its_last_commit_not_its_old_weights(tmp_path, lora, capsys):
    """A run that finished with offload.keep_state=true, resumed to train on and killed, exported the
    model.safetensors of its first finish, in silence (a new-user pass: logits off by 9). The export now
    exports the newer commit, told by the step the file records (or, for a file from before, by which was
    written last), and says so; the file stays (the run's finished weights until it finishes again)."""
    pytest.importorskip("transformers")
    from fuyou.train.run import export_run_dir as export_run
    from fuyou.train.run import weights_step
    from fuyou.train.loop import run_training

    name = "adapter.safetensors" if lora else "model.safetensors"
    extra = ["train.lr_schedule=constant", "train.warmup_steps=0",  # (the same learning rates whatever the steps)
             *(["lora.rank=4", "model.preset=llama-test", "model.n_layer=4"] if lora else [])]
    first = run_training(ssd_cfg(tmp_path, "train.steps=2", "run.name=kept", "offload.keep_state=true",
                                 "offload.commit_every=1", *extra))
    assert weights_step(first.run_dir / name) == 2
    export_run(first.run_dir, tmp_path / "finished")  # (finished: its file, which is the last commit too)
    env = {**{k: v for k, v in os.environ.items() if k != "FUYOU_FAULT"}, "FUYOU_FAULT": "forward@4"}
    r = subprocess.run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(first.run_dir), "train.steps=6"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0 and (first.run_dir / name).is_file(), r.stderr
    from fuyou.engine.commit import RECORD

    step = json.loads((tmp_path / "ssd" / "kept.fuyou-state" / RECORD).read_text())["step"]
    assert step >= 3  # (trained past the first finish)
    ref = run_training(ssd_cfg(tmp_path, f"train.steps={step}", "run.name=ref", *extra))
    export_run(ref.run_dir, tmp_path / "ref")
    out = "adapter_model.safetensors" if lora else "model.safetensors"
    want = load_safetensors(tmp_path / "ref" / out)
    capsys.readouterr()
    export_run(first.run_dir, tmp_path / "a")  # the last commit
    assert "holds the weights the run finished with at step 2" in capsys.readouterr().err
    # a file from before the step was recorded: told by which was written last
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(first.run_dir / name), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "fuyou_step"}
    save_file(load_safetensors(first.run_dir / name), str(first.run_dir / name), metadata=meta)
    state = tmp_path / "ssd" / "kept.fuyou-state" / RECORD
    os.utime(first.run_dir / name, ns=(state.stat().st_mtime_ns - 10**9,) * 2)
    export_run(first.run_dir, tmp_path / "b")
    for d in ("a", "b"):
        got = load_safetensors(tmp_path / d / out)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), d
    old = load_safetensors(tmp_path / "finished" / out)
    assert not all(torch.equal(old[k], want[k]) for k in old)
    # a commit that cannot be read: the finished weights are exported, with a note
    rec = json.loads(state.read_text())
    if lora:  # the adapters' file the record names, damaged (its SHA-256 no longer holds)
        damaged = state.parent / rec["lora_state"]
        damaged.write_bytes(damaged.read_bytes()[:-8] + b"damaged!")
    else:
        rec["step"] = rec["step"] + 1  # (the record's checksum no longer holds)
        state.write_text(json.dumps(rec))
    capsys.readouterr()
    export_run(first.run_dir, tmp_path / "c")
    assert "its last commit cannot be read" in capsys.readouterr().err
    got = load_safetensors(tmp_path / "c" / out)
    assert all(torch.equal(got[k], old[k]) for k in got)


def test_a_finished_run_is_exported_as_it_finished_beside_a_namesakes_later_state(tmp_path):
    """Two runs of one run.name in two --out directories share a state name: the first, finished, was
    exported with the second's later commit (found by review: its state's owner is another run)."""
    pytest.importorskip("transformers")
    from fuyou.train.run import export_run_dir as export_run
    from fuyou.train.loop import run_training

    first = run_training(ssd_cfg(tmp_path, "train.steps=2", "run.name=exp"))
    export_run(first.run_dir, tmp_path / "before")
    second = ssd_cfg(tmp_path, "train.steps=3", "run.name=exp", "offload.keep_state=true")
    second = second.model_copy(update={"run": second.run.model_copy(update={"out_dir": str(tmp_path / "other")})})
    run_training(second)
    export_run(first.run_dir, tmp_path / "after")
    a, b = (load_safetensors(tmp_path / d / "model.safetensors") for d in ("before", "after"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_snapshot_that_cannot_be_written_is_a_sentence_and_init_from_a_stopped_run_says_export(tmp_path):
    """A hostile pass: `snapshots` made a file ended rank 0 in a NotADirectoryError traceback; --init-from a
    stopped run (no model.safetensors) said it "holds no model"."""
    from fuyou.errors import ConfigError
    from fuyou.hf.source import open_checkpoint
    from fuyou.train.run import SaveError, save_snapshot

    run = tmp_path / "run"
    run.mkdir()
    (run / "snapshots").write_text("in the way")
    with pytest.raises(SaveError, match=r"the snapshot of step 3 cannot be written: .* is not a directory"):
        save_snapshot(run, None, load_config(), 3)
    (run / "config.toml").write_text("")
    with pytest.raises(ConfigError, match=r"a fuyou run without model.safetensors: it was stopped.*fuyou export"):
        open_checkpoint(run)


def test_checkpoint_dtypes_are_not_called_ignored_in_memory():
    """The in-memory reference rounds block inputs to the checkpoint dtype a policy gives, as the engine does;
    a pass was told offload.act_policy / offload.checkpoint_dtype were ignored and got other weights."""
    from fuyou.train.loop import _offload_ignored_in_memory

    assert _offload_ignored_in_memory(load_config(overrides=["offload.act_policy=checkpoint_dtype=bf16",
                                                             "train.precision=fp32"])) == []
    assert _offload_ignored_in_memory(load_config(overrides=["offload.checkpoint_dtype=compute",
                                                             "train.precision=bf16"])) == []
    assert _offload_ignored_in_memory(load_config(overrides=["offload.act_policy=fc2=ssd"])) == [
        "offload.act_policy (--act-policy)"]
    # offload.checkpoint_dtype rounds every block's input whatever the policy: its tiers are still ignored, and
    # were not said to be
    cfg = load_config(overrides=["offload.act_policy=fc2=ssd", "offload.checkpoint_dtype=compute",
                                 "train.precision=bf16"])
    assert _offload_ignored_in_memory(cfg) == ["offload.act_policy (--act-policy)"]


def test_a_resume_logs_each_evaluation_once(tmp_path, capsys):
    """A resume at a commit whose step was evaluated logged that evaluation again (metrics.jsonl, and TensorBoard,
    whose purge starts after it); a finished run (offload.keep_state) resumed with no step left logged its last
    evaluation twice and a second summary of zeros (a pass). Each evaluation is logged once; no summary is added."""
    tb = importlib.util.find_spec("tensorboard") is not None
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    args = ["train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "256MiB", "--out", str(tmp_path / "runs"),
            "model.preset=gpt-test", "data.seq_len=32", "train.micro_batch_size=2", "train.eval_batches=1",
            "train.eval_every=2", "offload.commit_every=2", "offload.keep_state=true", f"run.tensorboard={tb}"]
    env = {**os.environ, "FUYOU_FAULT": "forward@3"}  # killed in step 4, after the commit (and evaluation) of 2
    r = subprocess.run([sys.executable, "-m", "fuyou.cli", *args, "run.name=r", "train.steps=4"], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == -9, r.stderr
    run = tmp_path / "runs" / "r"
    for _ in range(2):  # the resume runs steps 3-4; the second has none left
        assert main(["train", "--resume", str(run)]) == 0
    assert "no step left to run (4 committed" in capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in records if "eval_loss" in r]
    assert evals == [0, 2, 4], evals
    assert sum("summary" in r for r in records) == 1 and records[-1].get("resumed") == 4
    if tb:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run / "tb"))
        acc.Reload()
        # (sorted: TensorBoard reads the event files by name, and two launches in one second sort by their pid)
        assert sorted(e.step for e in acc.Scalars("eval/eval_loss")) == [0, 2, 4]


def test_a_stopped_run_resumed_at_its_last_commit_ends_with_a_summary(tmp_path, capsys):
    """A hostile pass: a run stopped at step 4 of 8, resumed with train.steps=4 (what the refusal of 3 offers: end
    the run there), saved its weights but logged no summary, so a reader of metrics.jsonl took it for unfinished."""
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    args = ["train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "256MiB", "--out", str(tmp_path / "runs"),
            "model.preset=gpt-test", "data.seq_len=32", "train.micro_batch_size=2", "train.eval_batches=1",
            "offload.commit_every=1"]
    env = {**os.environ, "FUYOU_FAULT": "sigint:forward@3"}  # Ctrl-C in step 4: it commits step 4 and stops
    r = subprocess.run([sys.executable, "-m", "fuyou.cli", *args, "run.name=s", "train.steps=8"], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 130, r.stderr
    run = tmp_path / "runs" / "s"
    assert main(["train", "--resume", str(run), "train.steps=4"]) == 0
    assert "no step left to run (4 committed" in capsys.readouterr().err and (run / "model.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1].get("summary") and records[-1]["steps"] == 4 and records[-1]["steps_run"] == 0, records[-1]


def test_a_lora_run_without_commits_names_its_adapters_to_start_from(tmp_path, capsys):
    """--resume of a finished in-memory LoRA run said it "saved no weights" (its adapter.safetensors was not
    counted), and of a stopped one "--init-from SNAPSHOT", which refuses a LoRA run's adapters: the advice is
    now the stop's own, export them and start over the same base with lora.init_from."""
    out = str(tmp_path / "runs")
    base = ["model.preset=gpt-test", "model.n_layer=4", "data.seq_len=32", "lora.rank=4", "train.eval_every=0"]
    assert main(["train", "--out", out, *base, "train.steps=2", "run.name=done"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "runs" / "done")]) == 2
    err = capsys.readouterr().err
    assert f"`fuyou export {tmp_path / 'runs' / 'done'} --out DIR`" in err and "lora.init_from=DIR" in err, err
    assert "--init-from" not in err
    assert main(["train", "--out", out, *base, "train.steps=2", "train.save_every=1", "run.save_weights=false",
                 "run.name=snap"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "runs" / "snap")]) == 2
    err = capsys.readouterr().err
    assert "snapshots/step-000001` --out DIR`" in err.replace(" --out", "` --out") or "step-000001 --out DIR" in err, err


def test_the_summary_says_which_steps_redid_their_updates(tmp_path, capsys):
    """A pass: a short run's SSD bytes a step read above the plan's, and nothing said why: its first step clipped
    and redid its speculative updates. The summary counts such steps; LoRA's adapters clip in memory and a
    step that waited for the norm redoes nothing."""
    (tmp_path / "ssd").mkdir()
    common = ["train", "--offload", "ssd", "--ssd", str(tmp_path / "ssd"), "--out", str(tmp_path / "runs"),
              "--cpu-mem", "512MiB", "model.preset=gpt-tiny", "train.steps=3", "train.eval_every=0",
              "train.grad_clip=1.0", "data.seq_len=64", "train.micro_batch_size=4", "train.log_every=1"]
    assert main([*common, "run.name=full", "offload.resident_mem=0"]) == 0
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "full" / "metrics.jsonl").read_text().splitlines()]
    redone = sum(1 for m in metrics if m.get("clipped") and not m.get("deferred"))
    deferred = sum(1 for m in metrics if m.get("clipped") and m.get("deferred"))
    err = capsys.readouterr().err
    assert redone >= 1 and f"; {redone} of the 3 steps clipped and redid" in err
    # (those that clipped after it and deferred were left unsaid: "1 of the 4 steps clipped" where all had, a pass)
    assert (f", {deferred} more clipped and deferred theirs" in err) == bool(deferred)
    assert main([*common, "run.name=lora", "lora.rank=4"]) == 0
    assert "redid" not in capsys.readouterr().err


def test_set_aside_snapshots_are_bounded_by_keep_snapshots(tmp_path):
    """A pass: each resume from an earlier commit that recorded a change set its later snapshots aside as another
    lineage, and none was ever deleted: seven directories (97 MiB) under train.keep_snapshots=1. The newest
    keep_snapshots set aside are kept, newest by when they were set aside (a review: a rename keeps the mtime, and
    a snapshot written long ago but set aside last was taken for the oldest)."""
    import os

    from fuyou.train.run import prune_abandoned, set_aside_later_snapshots

    run = tmp_path / "run"
    root = run / "snapshots"
    for _ in range(2):  # two resumes from step 4, each setting aside the steps 6 and 8 it redoes
        for step in (6, 8):
            (root / f"step-{step:06d}").mkdir(parents=True)
            os.utime(root / f"step-{step:06d}", ns=(10**9, 10**9))  # (written long ago: mtime is no guide)
        set_aside_later_snapshots(run, 4)
    assert sorted(p.name for p in root.iterdir()) == ["abandoned-2-step-000006", "abandoned-2-step-000008",
                                                      "abandoned-step-000006", "abandoned-step-000008"]
    assert sorted(p.name for p in prune_abandoned(run, 2)) == ["abandoned-step-000006", "abandoned-step-000008"]
    assert sorted(p.name for p in root.iterdir()) == ["abandoned-2-step-000006", "abandoned-2-step-000008"]


def test_a_resume_that_turns_steps_into_epochs_names_the_epochs_steps(tmp_path, capsys):
    """A pass: a run of train.steps resumed with train.epochs said (and recorded) "train.steps 100 -> 240", the
    default, for a run that then trained to the 57 steps of its epoch."""
    text = tmp_path / "t.txt"
    text.write_text(("some words for a small epoch of text. " * 30 + "\n\n") * 3)
    (tmp_path / "ssd").mkdir()
    assert main(["train", "--offload", "ssd", "--ssd", str(tmp_path / "ssd"), "--cpu-mem", "1GiB", "--out",
                 str(tmp_path / "runs"), "run.name=se", "model.preset=gpt-test", f"data.path={text}",
                 "data.seq_len=32", "train.micro_batch_size=2", "train.steps=2", "train.eval_every=0",
                 "offload.keep_state=true"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "runs" / "se"), "train.epochs=1"]) == 0
    err = capsys.readouterr().err
    m = re.search(r"train.steps \(from train.epochs\) 2 -> (\d+)", err)
    assert m and int(m.group(1)) > 2 and "train.steps 2 -> 240" not in err, err
    assert f"done: steps 3-{m.group(1)} of {m.group(1)}" in err


def test_a_warm_up_as_long_as_the_run_is_said(tmp_path, capsys):
    """A pass: a run of 20 steps or fewer at the default warm-up (20) rose to its peak learning rate at its last step
    and never decayed, cosine and min_lr_ratio unused, and nothing said so."""
    common = ["train", "model.preset=gpt-test", "data.seq_len=32", "train.micro_batch_size=2", "train.eval_every=0",
              "--out", str(tmp_path / "runs")]
    assert main([*common, "train.steps=3", "run.name=short"]) == 0
    assert capsys.readouterr().err.count("note: the warm-up (20 steps, train.warmup_steps) covers all 3 steps") == 1
    assert main([*common, "train.steps=3", "train.warmup_steps=1", "run.name=warm1"]) == 0
    assert "covers all" not in capsys.readouterr().err


def test_a_resumed_fine_tune_writes_the_same_bytes_as_an_uninterrupted_one(tmp_path):
    """A pass: a resumed --init-from run's model.safetensors had the same tensors as the uninterrupted run's, but its
    metadata named model.init_from as null (a resume's config has none): a checksum told them apart."""
    (tmp_path / "ssd").mkdir()
    common = ["train", "--offload", "ssd", "--ssd", str(tmp_path / "ssd"), "--cpu-mem", "1GiB", "--out",
              str(tmp_path / "runs"), "model.preset=gpt-test", "data.seq_len=32", "train.micro_batch_size=2",
              "train.eval_every=0", "train.precision=fp32", "train.lr_schedule=constant", "train.warmup_steps=0"]
    assert main([*common, "run.name=base", "train.steps=1"]) == 0
    base = str(tmp_path / "runs" / "base")
    assert main([*common, "run.name=whole", "train.steps=4", f"--init-from={base}"]) == 0
    assert main([*common, "run.name=parts", "train.steps=2", f"--init-from={base}", "offload.keep_state=true"]) == 0
    assert main(["train", "--resume", str(tmp_path / "runs" / "parts"), "train.steps=4"]) == 0
    whole, parts = (tmp_path / "runs" / n / "model.safetensors" for n in ("whole", "parts"))
    assert whole.read_bytes() == parts.read_bytes()


def test_resumes_at_one_step_keep_each_config_before_them(tmp_path):
    """A pass: six resumes at one commit, each changing a setting, left config.step-5.toml holding the config
    before the last of them: the run's first config was gone from disk."""
    (tmp_path / "ssd").mkdir()
    assert main(["train", "--offload", "ssd", "--ssd", str(tmp_path / "ssd"), "--cpu-mem", "1GiB", "--out",
                 str(tmp_path / "runs"), "run.name=r", "model.preset=gpt-test", "data.seq_len=32",
                 "train.micro_batch_size=2", "train.steps=2", "train.eval_every=0", "offload.keep_state=true",
                 "optim.lr=0.001"]) == 0
    run = tmp_path / "runs" / "r"
    for lr in ("0.0009", "0.0008"):
        assert main(["train", "--resume", str(run), "train.steps=2", f"optim.lr={lr}"]) == 0
    assert load_config(run / "config.step-2.toml", ["model.init_from=none"]).optim.lr == 0.001
    assert load_config(run / "config.step-2-2.toml", ["model.init_from=none"]).optim.lr == 0.0009
    assert load_config(run / "config.toml", ["model.init_from=none"]).optim.lr == 0.0008


def test_weights_not_saved_are_said_at_the_start_and_at_export(tmp_path, capsys):
    """A pass: an in-memory run with run.save_weights=false dropped its weights without a word, and the export of a
    finished SSD run that saved none said it had "stopped"."""
    common = ["model.preset=gpt-test", "data.seq_len=32", "train.micro_batch_size=2", "train.steps=2",
              "train.eval_every=0", "run.save_weights=false", "--out", str(tmp_path / "runs")]
    assert main(["train", *common, "run.name=mem"]) == 0
    assert "the final weights are kept nowhere" in capsys.readouterr().err
    (tmp_path / "ssd").mkdir()
    assert main(["train", "--offload", "ssd", "--ssd", str(tmp_path / "ssd"), *common, "run.name=ssd"]) == 0
    assert "kept nowhere" not in capsys.readouterr().err
    assert main(["export", str(tmp_path / "runs" / "ssd"), "--out", str(tmp_path / "hf")]) == 0
    assert "(finished with run.save_weights=false): exporting its last commit (step 2)" in capsys.readouterr().err


def test_a_data_directory_edited_inside_is_a_change(tmp_path):
    """A directory of text files is fingerprinted by its count, size and newest modification: one file
    rewritten at the same size later is seen (with the oldest time, as a mutation audit tried, it was not)."""
    import os

    from fuyou.config import load_config
    from fuyou.train.records import data_fingerprint

    d = tmp_path / "texts"
    d.mkdir()
    for name, when in (("a.txt", 1_000_000_000), ("b.txt", 1_100_000_000)):
        (d / name).write_text("The quick brown fox. " * 20)
        os.utime(d / name, (when, when))
    cfg = load_config(overrides=["data.source=text", f"data.path={d}"])
    before = data_fingerprint(cfg)
    (d / "b.txt").write_text("The quick brown cat. " * 20)  # same size, newer
    os.utime(d / "b.txt", (1_200_000_000, 1_200_000_000))
    assert data_fingerprint(cfg) != before


def test_the_run_directorys_disk_is_judged_by_the_copies_it_will_hold(tmp_path, monkeypatch):
    """check_run_dir_space counts the final weights and the snapshots train.save_every makes before the last step
    (none at the last step itself), up to train.keep_snapshots, less the snapshots a resume finds there already:
    the exact need is let through and a byte less refused (a mutation audit: one snapshot too many, or the held
    ones not counted off, passed every test)."""
    import shutil
    from collections import namedtuple

    from fuyou.config import load_config
    from fuyou.errors import ConfigError
    from fuyou.models import StageModel
    from fuyou.train.guards import check_run_dir_space

    usage = namedtuple("usage", "total used free")
    cfg = load_config(overrides=["model.preset=gpt-test", "train.steps=10", "train.save_every=5",
                                 "train.keep_snapshots=3", f"run.out_dir={tmp_path}"])
    model = StageModel(cfg.model)
    size = 4 * model.num_params + 256 * len(model.param_specs()) + 64 * 1024
    run = tmp_path / "r"
    run.mkdir()

    def judged(free: int) -> bool:
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**15, 0, free))
        try:
            check_run_dir_space(cfg, run)
            return True
        except ConfigError:
            return False
    need = 2 * size + 2**20  # the final weights and one snapshot (step 5; step 10 is the last)
    assert judged(need) and not judged(need - 1)
    snap = run / "snapshots" / "step-000005"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"\0" * 1000)  # a resume finds it: its bytes are held already
    assert judged(need - 1000) and not judged(need - 1001)


def test_a_warm_up_longer_than_the_run_reaches_the_peak_at_the_last_step():
    """A mutation audit: a warm-up longer than the run is cut to the run's steps, so the learning rate reaches its
    peak at the last step (not halfway up a 20-step ramp)."""
    lrs = [lr_at(s, 1.0, 10, 20, 0.1) for s in range(10)]
    assert lrs[-1] == 1.0 and lrs[0] == pytest.approx(0.1)


def _tiny_run(tmp_path, *extra):
    from fuyou.train.loop import run_training

    cfg = load_config(overrides=["model.preset=gpt-test", "data.seq_len=32", "train.eval_every=0",
                                 "train.micro_batch_size=2", "train.eval_batches=1", f"run.out_dir={tmp_path}",
                                 "run.name=m", *extra])
    res = run_training(cfg)
    return cfg, [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_last_step_is_logged_whatever_the_logging_interval(tmp_path):
    """A mutation audit: a run of 3 steps logging every 2 writes steps 1 (the first), 2 and 3 (the last, which is
    no multiple of the interval)."""
    _, lines = _tiny_run(tmp_path, "train.steps=3", "train.log_every=2")
    assert [x["step"] for x in lines if "loss" in x and "eval_loss" not in x] == [1, 2, 3]


def test_a_steps_tflops_are_its_tokens_per_second_times_the_flops_per_token(tmp_path):
    """A mutation audit: the logged TFLOPS are tokens/s x the model's FLOPs per token / 1e12 (not 1e9)."""
    from fuyou.models import StageModel

    cfg, lines = _tiny_run(tmp_path, "train.steps=2", "train.log_every=1")
    per_token = StageModel(cfg.model).flops_per_token(cfg.data.seq_len, frozen=False)
    steps = [x for x in lines if "tflops" in x and "summary" not in x]
    assert len(steps) == 2 and per_token > 0
    for x in steps:
        assert x["tflops"] == pytest.approx(x["tokens_per_s"] * per_token / 1e12, rel=1e-6)


def test_an_infinite_gradient_norm_is_logged_as_null(tmp_path):
    """A mutation audit: every non-finite number (inf and -inf as well as NaN) is written as null, so the line stays
    strict JSON (json.dumps refuses inf)."""
    from fuyou.train.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": -float("inf"), "tokens": 64})
    log.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert (rec["loss"], rec["grad_norm"], rec["lr"], rec["tokens"]) == (None, None, None, 64)


def test_precision_auto_says_what_it_chose_and_a_resume_elsewhere_keeps_the_runs(tmp_path, capsys, monkeypatch):
    """train.precision=auto (the default) on a CPU without native bf16 computes in fp32 and says so; bf16 given
    there is warned about (tens of times slower); a run started where bf16 is native and resumed on such a CPU
    keeps its bf16 (its config.toml gives it) and is not refused as a change of precision."""
    from fuyou.models import precision

    ssd = tmp_path / "ssd"
    ssd.mkdir()
    base = [f"--ssd={ssd}", "--offload=ssd", f"--out={tmp_path / 'runs'}",
            *[o for o in SSD_RUN if "precision" not in o]]
    monkeypatch.setattr(precision, "bf16_native", lambda kind: False)
    assert main(["train", *base, "run.name=slow", "train.steps=1"]) == 0
    err = capsys.readouterr().err
    assert "note: train.precision=auto computes in fp32 here: this CPU" in err and ", fp32 (auto), 1 step" in err
    assert 'precision = "fp32"' in (tmp_path / "runs" / "slow" / "config.toml").read_text()
    assert main(["train", *base, "run.name=forced", "train.steps=1", "train.precision=bf16"]) == 0
    err = capsys.readouterr().err
    assert "warning: train.precision=bf16 on a CPU without native bf16 matmul" in err and ", bf16, 1 step" in err
    assert "train.precision=fp32 (or auto, which chooses it here)" in err
    monkeypatch.setattr(precision, "bf16_native", lambda kind: True)
    assert main(["train", *base, "run.name=fast", "train.steps=1", "offload.keep_state=true"]) == 0
    err = capsys.readouterr().err
    assert "native bf16" not in err and ", bf16 (auto), 1 step" in err
    monkeypatch.setattr(precision, "bf16_native", lambda kind: False)
    assert main(["train", "--resume", str(tmp_path / "runs" / "fast"), "train.steps=2"]) == 0
    err = capsys.readouterr().err
    assert "a resumed run keeps the precision it started in" in err and ", bf16, 2 steps" in err, err
    # auto given to a resume is the run's own precision, not this machine's choice (refused as a change: a pass)
    assert main(["train", "--resume", str(tmp_path / "runs" / "fast"), "train.steps=3", "train.precision=auto"]) == 0
    assert ", bf16, 3 steps" in capsys.readouterr().err
    # and so is auto written into its config.toml by hand: the commit's precision (it was refused as an edit)
    toml = tmp_path / "runs" / "fast" / "config.toml"
    toml.write_text(toml.read_text().replace('precision = "bf16"', 'precision = "auto"'))
    assert main(["train", "--resume", str(tmp_path / "runs" / "fast"), "train.steps=4", "train.precision=fp32"]) == 2
    assert "cannot change train.precision ('bf16' -> 'fp32')" in capsys.readouterr().err  # (given: still a change)
    assert main(["train", "--resume", str(tmp_path / "runs" / "fast"), "train.steps=4"]) == 0
    assert ", bf16, 4 steps" in capsys.readouterr().err


def test_what_auto_chose_is_said_where_it_matters(tmp_path, capsys, monkeypatch):
    """A hostile pass over train.precision=auto: a budget refused for fp32's bytes named no precision (the same
    command fit under the old bf16 default); optim.master=bf16's note called auto's fp32 the user's and advised
    bf16 where it crawls; offload.checkpoint_dtype=compute saved nothing in fp32, unsaid."""
    from fuyou.models import precision

    ssd = tmp_path / "ssd"
    ssd.mkdir()
    base = ["train", f"--ssd={ssd}", "--offload=ssd", f"--out={tmp_path / 'runs'}", "model.preset=gpt-tiny",
            "data.seq_len=64", "train.micro_batch_size=2", "train.steps=1", "train.eval_every=0"]
    monkeypatch.setattr(precision, "bf16_native", lambda kind: False)
    assert main([*base, "--cpu-mem", "200MiB"]) == 2
    assert "it computes in fp32 (train.precision=auto: this device has no native bf16)" in capsys.readouterr().err
    assert main([*base, "--cpu-mem", "200MiB", "train.precision=fp32"]) == 2  # (given: no word of auto)
    assert "train.precision=auto" not in capsys.readouterr().err
    assert main([*base, "--cpu-mem", "1GiB", "optim.master=bf16", "offload.checkpoint_dtype=compute"]) == 0
    err = capsys.readouterr().err
    assert "optim.master=bf16 with fp32 compute (train.precision=auto's choice here)" in err
    assert "but this device computes bf16 tens of times slower" in err
    assert "offload.checkpoint_dtype=compute stores the block inputs in the compute dtype, fp32 here" in err
