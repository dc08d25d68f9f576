"""Weights & Biases as a third record of a run (``run.wandb``), beside metrics.jsonl and TensorBoard: the
real wandb package, offline, its run file read back record by record (the offline ``.wandb`` file: W&B's
records in a LevelDB-style log, which ``wandb sync`` uploads). Skipped where wandb is not installed."""

from __future__ import annotations

import json
import os
import signal
import struct

import pytest

pytest.importorskip("wandb")

from fuyou.config import load_config  # noqa: E402
from fuyou.engine.engine import Engine  # noqa: E402
from fuyou.train.loop import run_training  # noqa: E402
from test_stop_in_evaluation import cfg_of  # noqa: E402  (the same small offloaded runs)


@pytest.fixture(autouse=True)
def _no_wandb_account(tmp_path, monkeypatch):
    """No API key, no netrc, nothing of W&B's written outside the test's directory."""
    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "home" / ".cache"))


def wandb_records(path):
    """The protobuf records of an offline W&B run file: a 7-byte header (":W&B", magic, version), then
    32 KiB blocks of chunks (CRC-32, length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    b = path.read_bytes()
    if len(b) < 7:  # (not written yet)
        return
    assert b[:4] == b":W&B"
    at, part = 7, b""
    while at + 7 <= len(b):
        room = 32768 - at % 32768
        if room < 7:
            at += room
            continue
        _, n, kind = struct.unpack("<IHB", b[at:at + 7])
        if at + 7 + n > len(b):  # (the record being written)
            return
        part += b[at + 7:at + 7 + n]
        at += 7 + n
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(part)
            part = b""
            yield r


def logged(run_dir):
    """Per offline W&B run file of ``run_dir`` (one a launch): its id, config, history rows, summary, exit code."""
    import time

    out = []
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        end = time.monotonic() + 30  # (W&B's service may still be writing the file it was told to finish)
        while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(f)) and time.monotonic() < end:
            time.sleep(0.2)
        one = {"id": None, "config": {}, "rows": [], "summary": {}, "exit": None}
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                one["id"] = r.run.run_id
                one["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "history":
                one["rows"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                one["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                       for u in r.summary.update})
            elif kind == "exit":
                one["exit"] = r.exit.exit_code
        out.append(one)
    return out


def test_a_run_logs_its_metrics_config_and_summary_to_wandb(tmp_path, capsys):
    res = run_training(cfg_of(tmp_path, "train.steps=4", "train.eval_every=2", "run.wandb=offline", ssd=False))
    err = capsys.readouterr().err
    assert "W&B run" in err and "offline in" in err
    [run] = logged(res.run_dir)
    assert run["id"] == json.loads((res.run_dir / "wandb.json").read_text())["id"]
    assert run["config"]["model"]["preset"] == "gpt-test" and run["config"]["train"]["steps"] == 4
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {x["step"]: x["loss"] for x in lines if "loss" in x and "eval_loss" not in x}
    evals = {x["step"]: x["eval_loss"] for x in lines if "eval_loss" in x}
    assert {r["step"]: r["train/loss"] for r in run["rows"] if "train/loss" in r} == train
    assert {r["step"]: r["eval/eval_loss"] for r in run["rows"] if "eval/eval_loss" in r} == evals == \
        {0: res.first_eval, 2: evals[2], 4: res.last_eval}
    summary = lines[-1]
    assert summary["summary"] is True and run["summary"]["tokens_per_s"] == summary["tokens_per_s"]
    assert run["exit"] == 0


def test_a_stopped_and_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    original = Engine.evaluate
    calls = []

    def evaluate(self, should_stop=None):  # SIGINT at the evaluation after step 2: the run stops there
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, should_stop)

    monkeypatch.setattr(Engine, "evaluate", evaluate)
    res = run_training(cfg_of(tmp_path, "train.steps=4", "train.eval_every=2", "run.wandb=offline"))
    assert res.stopped
    monkeypatch.undo()
    cfg = load_config(res.run_dir / "config.toml", ["model.init_from=none"])
    run_training(cfg, resume=res.run_dir)
    first, second = logged(res.run_dir)
    assert first["id"] == second["id"]  # one W&B run across the launches
    assert first["summary"]["stopped"] == "SIGINT" and first["exit"] == 0
    assert [r["step"] for r in first["rows"] if "train/loss" in r] == [1, 2]
    assert any(r.get("train/resumed") == 2 for r in second["rows"])
    assert [r["step"] for r in second["rows"] if "train/loss" in r] == [3, 4]
    last = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["summary"] is True and last["resumed_from"] == 2 == second["summary"]["resumed_from"]
    assert "stopped" not in second["summary"] and second["exit"] == 0


def test_a_launch_that_fails_is_a_failed_wandb_run_and_the_logs_last_line(tmp_path, monkeypatch):
    """A pass: a launch that died (a rank killed, a stall, a full disk) finished its W&B run with exit code 0 and
    no word of the error, and metrics.jsonl just stopped. The error is the log's last line and the W&B summary's,
    with a failed exit; the resume's launch finishes the same W&B run normally."""
    from fuyou.errors import FuyouError

    original = Engine.train_step

    def train_step(self, step, *a, **k):
        if step == 2:
            raise FuyouError("the SSD went away\nsecond line")
        return original(self, step, *a, **k)

    monkeypatch.setattr(Engine, "train_step", train_step)
    cfg = cfg_of(tmp_path, "train.steps=4", "train.log_every=1", "offload.commit_every=1", "run.wandb=offline")
    with pytest.raises(FuyouError, match="the SSD went away"):
        run_training(cfg)
    monkeypatch.undo()
    [run_dir] = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last == {"time": last["time"], "error": "the SSD went away", "step": 3}  # (the step it was on)
    [failed] = logged(run_dir)
    assert failed["summary"]["error"] == "the SSD went away" and failed["exit"] == 1
    run_training(load_config(run_dir / "config.toml", ["model.init_from=none"]), resume=run_dir)
    first, second = logged(run_dir)
    assert first["id"] == second["id"] and second["exit"] == 0


def test_online_without_an_api_key_is_refused_before_any_work(tmp_path, capsys):
    from fuyou.cli import main

    assert main(["train", "--out", str(tmp_path / "runs"), "model.preset=gpt-tiny", "train.steps=1",
                 "run.wandb=online"]) == 2
    err = capsys.readouterr().err
    assert "run.wandb=online needs a W&B API key" in err and "run.wandb=offline" in err
    assert not (tmp_path / "runs").exists()


def test_online_that_cannot_reach_wandb_logs_offline_and_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # (discard: nothing listens)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    res = run_training(cfg_of(tmp_path, "train.steps=2", "run.wandb=online", ssd=False))
    err = capsys.readouterr().err
    assert "W&B could not be reached" in err and "wandb sync" in err
    [run] = logged(res.run_dir)
    assert [r["step"] for r in run["rows"] if "train/loss" in r] == [1, 2]


def test_a_non_finite_stop_is_a_failed_wandb_run(tmp_path):
    """A mutation audit: a run stopped by a non-finite loss finishes its W&B run with a non-zero exit code (a stop
    by a signal, which resumes, finishes it with 0)."""
    import sys

    from fuyou.train.metrics import MetricsLog, WandbLog

    exits = {}
    for stop in ("non-finite", "SIGINT"):
        run_dir = tmp_path / stop
        run_dir.mkdir()
        log = MetricsLog(run_dir / "metrics.jsonl", wandb=WandbLog(run_dir, "offline", "p", None, {}, sys.stderr))
        log.write({"step": 1, "loss": 2.0})
        log.write({"stopped": stop, "step": 1})
        log.close()
        [run] = logged(run_dir)
        exits[stop] = run["exit"]
    assert exits["non-finite"] not in (0, None) and exits["SIGINT"] == 0
