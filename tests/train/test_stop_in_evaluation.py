"""A stop (Ctrl-C, SIGTERM, SIGHUP) while an evaluation runs: the evaluation is abandoned between two
held-out batches instead of being run to its end first (a model streamed from the SSD reads all its
weights for each batch: with the default eight, minutes for a large one), and the run stops as it would
after a step. The signal is sent from inside the evaluation, before a chosen batch, so that the test does
not depend on timing."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from fuyou.config import load_config
from fuyou.engine.engine import Engine
from fuyou.train.loop import run_training
from fuyou.train.reference import ReferenceTrainer

RUN = ["model.preset=gpt-test", "model.n_layer=4", "data.seq_len=32", "train.micro_batch_size=2",
       "train.eval_batches=4", "train.precision=fp32", "offload.cpu_mem=1GiB", "train.log_every=1"]


def cfg_of(tmp_path, *extra, ssd=True):
    flags = {}
    if ssd:
        (tmp_path / "ssd").mkdir(exist_ok=True)
        flags = {"offload.mode": "ssd", "offload.ssd_dirs": [str(tmp_path / "ssd")]}
    return load_config(overrides=[*RUN, f"run.out_dir={tmp_path / 'runs'}", *extra], flags=flags)


def signal_in_evaluation(monkeypatch, cls, evaluation: int, batch: int) -> dict:
    """SIGINT to this process when evaluation number ``evaluation`` (0: the first) is about to run batch
    ``batch``; returns how often each evaluation asked whether to stop."""
    asked: dict[int, int] = {}
    original = cls.evaluate

    def evaluate(self, should_stop=None):
        n = len(asked)
        asked[n] = 0

        def ask():
            if n == evaluation and asked[n] == batch:
                os.kill(os.getpid(), signal.SIGINT)
            asked[n] += 1
            return should_stop()

        return original(self, ask if should_stop is not None else None)

    monkeypatch.setattr(cls, "evaluate", evaluate)
    return asked


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def test_a_stop_in_an_evaluation_abandons_it_and_the_resume_is_exact(tmp_path, monkeypatch, capsys):
    full = run_training(cfg_of(tmp_path, "train.steps=4", "train.eval_every=2", "run.name=full"))
    asked = signal_in_evaluation(monkeypatch, Engine, evaluation=1, batch=1)  # the evaluation after step 2
    res = run_training(cfg_of(tmp_path, "train.steps=4", "train.eval_every=2", "run.name=cut"))
    assert res.stopped and res.exit_status == 128 + signal.SIGINT
    assert asked == {0: 4, 1: 2}  # the second evaluation stopped before its second batch
    err = capsys.readouterr().err
    assert "the evaluation at step 2 was abandoned (SIGINT)" in err and "after step 2 (committed)" in err
    lines = records(res.run_dir)
    assert [x["step"] for x in lines if "eval_loss" in x] == [0]  # nothing logged of the abandoned one
    assert {"stopped": "SIGINT", "step": 2} == {k: lines[-1][k] for k in ("stopped", "step")}
    monkeypatch.undo()
    cfg = load_config(res.run_dir / "config.toml", ["model.init_from=none"])
    run_training(cfg, resume=res.run_dir)
    a, b = weights(full.run_dir), weights(res.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_in_the_first_evaluation_trains_nothing_and_keeps_the_commit(tmp_path, monkeypatch, capsys):
    asked = signal_in_evaluation(monkeypatch, Engine, evaluation=0, batch=0)
    res = run_training(cfg_of(tmp_path, "train.steps=3", "train.eval_every=0", "run.name=early"))
    assert res.stopped and asked == {0: 1}
    err = capsys.readouterr().err
    assert "before step 1: nothing was trained in this launch; the commit of step 0 is intact" in err
    assert "--resume" in err and "done:" not in err
    lines = records(res.run_dir)
    assert not any("loss" in x for x in lines) and lines[-1]["stopped"] == "SIGINT" and lines[-1]["step"] == 0
    monkeypatch.undo()
    run_training(load_config(res.run_dir / "config.toml", ["model.init_from=none"]), resume=res.run_dir)
    full = run_training(cfg_of(tmp_path, "train.steps=3", "train.eval_every=0", "run.name=full"))
    a, b = weights(full.run_dir), weights(res.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_in_the_last_evaluation_still_saves_the_finished_run(tmp_path, monkeypatch, capsys):
    asked = signal_in_evaluation(monkeypatch, Engine, evaluation=1, batch=2)  # after the last step
    res = run_training(cfg_of(tmp_path, "train.steps=2", "train.eval_every=0", "run.name=last"))
    assert not res.stopped and res.exit_status == 0 and asked == {0: 4, 1: 3}
    assert res.last_eval is None and (res.run_dir / "model.safetensors").is_file()
    err = capsys.readouterr().err
    assert "the evaluation at step 2 was abandoned" in err and "-> (the last evaluation was abandoned)" in err
    assert list((tmp_path / "ssd").iterdir()) == []  # a finished run's state goes, as always


@pytest.mark.parametrize("ssd", [False, True])
def test_a_run_without_commits_stopped_before_its_first_step_keeps_nothing(tmp_path, monkeypatch, capsys, ssd):
    cls = Engine if ssd else ReferenceTrainer
    signal_in_evaluation(monkeypatch, cls, evaluation=0, batch=1)
    extra = ["offload.commit=none"] if ssd else []
    res = run_training(cfg_of(tmp_path, "train.steps=3", "run.name=early", *extra, ssd=ssd))
    assert res.stopped
    err = capsys.readouterr().err
    assert "before the first step: nothing was trained and nothing is kept in" in err
    assert "it is removed, so the same command starts the run again" in err
    assert not res.run_dir.exists()  # (it was kept, and refused the same command: the name was taken)
    if ssd:
        assert list((tmp_path / "ssd").iterdir()) == []
    monkeypatch.undo()
    again = run_training(cfg_of(tmp_path, "train.steps=3", "run.name=early", *extra, ssd=ssd))
    assert not again.stopped and again.run_dir == res.run_dir
