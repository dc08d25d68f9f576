"""Hundreds of mutations of the commit record and the store manifest, each fed to `--resume`: the
resume is refused with a one-sentence error (exit 2) that leaves the state as it was, or it is
bit-exact with an uninterrupted run. Never a traceback, never wrong weights (issue 14, item 4)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from fuyou.cli import main
from test_resume import run, train_cmd

EXTRA = ["train.grad_clip=1e-3", "offload.resident_mem=300KiB", "model.n_layer=4"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run killed after the commit of step 3 (kept pristine), and the uninterrupted run's weights."""
    tmp = tmp_path_factory.mktemp("fuzz")
    ref = run(train_cmd(tmp, "ref", *EXTRA))
    assert ref.returncode == 0, ref.stderr
    k = run(train_cmd(tmp, "k", *EXTRA), fault="forward@3")
    assert k.returncode == -signal.SIGKILL, k.stderr
    return tmp, load_file(str(tmp / "runs" / "ref" / "model.safetensors"))


def _numbers(text: str) -> list[tuple[int, int]]:
    """Spans of the integers in a JSON text."""
    out, i = [], 0
    while i < len(text):
        if text[i].isdigit():
            j = i
            while j < len(text) and text[j].isdigit():
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def mutate(text: str, rng: random.Random, resign: bool) -> str:
    """One random damage or edit of a JSON file (``resign``: recompute the record's checksum after it,
    as a careful hand edit would)."""
    kind = rng.choice(["number", "number", "number", "byte", "truncate", "delete-key", "swap", "type"])
    if kind == "number":
        spans = _numbers(text)
        a, b = rng.choice(spans)
        text = text[:a] + str(rng.choice([0, 1, 2, 3, 5, int(text[a:b]) + 1, max(0, int(text[a:b]) - 1), 4096,
                                          2**40])) + text[b:]
    elif kind == "byte":
        i = rng.randrange(len(text))
        text = text[:i] + chr(rng.randrange(32, 127)) + text[i + 1:]
    elif kind == "truncate":
        text = text[:rng.randrange(len(text))]
    else:
        try:
            obj = json.loads(text)
        except ValueError:
            return text[::-1]
        if not isinstance(obj, dict) or not obj:
            return "[]"
        key = rng.choice(sorted(obj))
        if kind == "delete-key":
            del obj[key]
        elif kind == "swap":
            obj[key] = rng.choice([None, "x", [], {}, -1, 1.5, True])
        else:
            obj = [obj]
        text = json.dumps(obj)
    if resign:
        try:
            obj = json.loads(text)
            body = {k: v for k, v in obj.items() if k != "checksum"}
            obj["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
            text = json.dumps(obj)
        except (ValueError, AttributeError, TypeError):
            pass
    return text


def _digest(d):
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if p.is_file() and p.name != "fuyou-store.lock":
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _committed(d) -> str:
    """A digest of what a resume must never change once it has started: the commit record, the manifest
    and the bytes of every tensor the manifest tags with the record's step (the committed copies). The
    other copies are the next step's to write, and a copy whose checksum fails is found when it is read,
    mid-step (verifying the whole state first would read it all: minutes at 13B)."""
    h = hashlib.sha256()
    for name in ("fuyou-commit.json", "fuyou-store.json"):  # (a resume records its run as the owner)
        p = d / name
        h.update(name.encode() + (p.read_bytes() if p.exists() else b"-"))
    try:
        step = json.loads((d / "fuyou-commit.json").read_text())["step"]
        manifest = json.loads((d / "fuyou-store.json").read_text())
        data = [(d / f"fuyou-store.{i}.dat").read_bytes() for i in range(len(manifest["dirs"]))]
        for key, rec in sorted(manifest["tensors"].items()):
            if rec.get("tag") == f"step {step}":
                for i, offset, length in rec["extents"]:
                    h.update(key.encode() + data[i][offset:offset + length])
    except (ValueError, KeyError, TypeError, OSError, IndexError, AttributeError):  # a record or manifest no run could read
        return _digest(d)
    return h.hexdigest()


def _parsed(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _check(tmp_path, killed, seed: int, capsys) -> str:
    src, want = killed
    rng = random.Random(seed)
    work = tmp_path / f"m{seed}"
    shutil.copytree(src / "ssd", work / "ssd", symlinks=True)
    shutil.copytree(src / "runs" / "k", work / "runs" / "k", symlinks=True)
    cfg = work / "runs" / "k" / "config.toml"
    cfg.write_text(cfg.read_text().replace(str(src), str(work)))
    state = work / "ssd" / "k.fuyou-state"
    target = state / rng.choice(["fuyou-commit.json", "fuyou-commit.json", "fuyou-store.json"])
    old = target.read_text()
    resign = rng.random() < 0.5
    target.write_text(mutate(old, rng, resign=resign))
    # the commit record's checksum covers all of it: any change to what it says, not signed again, is refused
    must_refuse = target.name == "fuyou-commit.json" and not resign and _parsed(target.read_text()) != _parsed(old)
    before, committed = _digest(state), _committed(state)
    capsys.readouterr()
    rc = main(["train", "--resume", str(work / "runs" / "k")])  # any exception fails the test: a traceback
    err = capsys.readouterr().err
    assert rc != 0 or not must_refuse, (seed, "an edited record, not signed again, was resumed")
    if rc == 0:
        got = load_file(str(work / "runs" / "k" / "model.safetensors"))
        for k in want:
            assert torch.equal(got[k], want[k]), (seed, target.name, k)
        outcome = "exact"
    else:
        assert rc in (2, 5) and "fuyou: error:" in err and "Traceback" not in err, (seed, err)  # (5: damaged)
        if "resuming at step" in err:  # found mid-step, as it read a copy whose checksum fails
            assert "mismatch" in err and _committed(state) == committed, (seed, "a failed resume changed the commit")
        else:
            assert _digest(state) == before, (seed, "a refused resume changed the state")
        outcome = "refused"
    shutil.rmtree(work)
    return outcome


def test_mutated_commit_records_and_manifests(tmp_path, killed, capsys):
    outcomes = [_check(tmp_path, killed, seed, capsys) for seed in range(120)]
    # most damage is caught, the rest resumes exactly; a copy of a run and its SSD directory is the copy's
    # own (a refusal of every copy as "another run's state" once made this test refuse all 120 in silence)
    assert outcomes.count("refused") > 60 and outcomes.count("exact") >= 10, outcomes.count("exact")


def _copy_killed(src, tmp_path) -> None:
    """The killed run and its SSD directory, copied under ``tmp_path`` (its config.toml pointed there)."""
    shutil.copytree(src / "ssd", tmp_path / "ssd", symlinks=True)
    shutil.copytree(src / "runs" / "k", tmp_path / "runs" / "k", symlinks=True)
    cfg = tmp_path / "runs" / "k" / "config.toml"
    cfg.write_text(cfg.read_text().replace(str(src), str(tmp_path)))


def test_a_copied_run_and_ssd_directory_resume_exactly(tmp_path, killed, capsys):
    """A restored backup: the run directory and its SSD directory copied elsewhere. The state's owner file
    names the original run, which still exists but uses another SSD directory: not a shared state."""
    src, want = killed
    _copy_killed(src, tmp_path)
    assert main(["train", "--resume", str(tmp_path / "runs" / "k")]) == 0, capsys.readouterr().err
    got = load_file(str(tmp_path / "runs" / "k" / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("resign", [False, True])
def test_a_record_edited_where_no_tag_looks_is_caught_by_its_checksum(tmp_path, killed, capsys, resign):
    """An edit the store's tags cannot see (a field added, the recorded settings changed) is refused by the
    record's checksum, the state as it was; re-signed, as a careful hand edit would, the same record resumes
    exactly (the checksum alone refused it: a mutation audit found nothing that tested it apart)."""
    src, want = killed
    _copy_killed(src, tmp_path)
    state = tmp_path / "ssd" / "k.fuyou-state"
    record = state / "fuyou-commit.json"
    rec = json.loads(record.read_text())
    rec["edited"] = "by hand"
    if resign:
        body = {k: v for k, v in rec.items() if k != "checksum"}
        rec["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    record.write_text(json.dumps(rec))
    before = _digest(state)
    rc = main(["train", "--resume", str(tmp_path / "runs" / "k")])
    err = capsys.readouterr().err
    if resign:
        assert rc == 0, err
        got = load_file(str(tmp_path / "runs" / "k" / "model.safetensors"))
        assert all(torch.equal(got[k], want[k]) for k in want)
    else:
        assert rc == 5 and "is damaged or was edited" in err and "checksum" in err, err
        assert _digest(state) == before


def test_a_record_one_generation_ahead_of_its_manifest_is_refused(tmp_path, killed, capsys):
    """A commit record written after a manifest the store never got (its manifest lost, or restored from an older
    copy): one generation ahead is enough to refuse it, signed as it is (the test of that check used a thousand,
    and a check one generation too lax passed: a mutation audit)."""
    src, _ = killed
    _copy_killed(src, tmp_path)
    state = tmp_path / "ssd" / "k.fuyou-state"
    generation = json.loads((state / "fuyou-store.json").read_text())["generation"]
    rec = json.loads((state / "fuyou-commit.json").read_text())
    assert rec["generation"] <= generation
    body = {k: v for k, v in rec.items() if k != "checksum"}
    body["generation"] = generation + 1
    body["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (state / "fuyou-commit.json").write_text(json.dumps(body))
    before = _digest(state)
    assert main(["train", "--resume", str(tmp_path / "runs" / "k")]) == 5
    assert f"names store generation {generation + 1}, newer than the store's {generation}" in capsys.readouterr().err
    assert _digest(state) == before


@pytest.mark.slow
def test_mutated_commit_records_and_manifests_many(tmp_path, killed, capsys):
    for seed in range(120, 600):
        _check(tmp_path, killed, seed, capsys)
