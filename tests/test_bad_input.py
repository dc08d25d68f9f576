"""Bad input through the CLI, as a user meets it: one sentence (exit 2), nothing lost (issue 14).

Each test feeds one kind of bad input or fault and checks the error names the problem and what to
do; `RELIABILITY.md` in bench/ lists them with their outcomes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fuyou.cli import main

TINY = ["model.preset=gpt-test", "model.n_layer=4", "train.precision=fp32", "train.steps=2", "data.seq_len=32",
        "train.micro_batch_size=2", "train.eval_batches=1", "train.eval_every=0"]


def _err(capsys, argv, status: int = 2) -> str:
    """The error of ``argv``, which exits with ``status`` (2 a mistake, 3 divergence, 4 a failure while running, 5
    a damaged state: fuyou/errors.py)."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == status, err
    assert "fuyou: error:" in err and "Traceback" not in err
    return err


def _offload(tmp_path, name, *extra):
    ssd = tmp_path / "ssd"
    ssd.mkdir(exist_ok=True)
    return ["train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "256MiB", "--out", str(tmp_path / "runs"),
            f"run.name={name}", *TINY, *extra]


@pytest.mark.parametrize("content,needle", [
    (b'{"text": "caf\xe9 au lait"}\n', "not UTF-8"),
    (b'{"text": 5}\n', "'text' is number, not a string"),
    (b'{"text": "a"\n', "not valid JSON"),
])
def test_bad_jsonl_in_prepare_and_train(tmp_path, capsys, content, needle):
    f = tmp_path / "d.jsonl"
    f.write_bytes(content)
    assert needle in _err(capsys, ["data", "prepare", str(f), "--out", str(tmp_path / "p")])
    assert needle in _err(capsys, ["train", *TINY, "data.source=text", f"data.path={json.dumps([str(f)])}",
                                   f"--out={tmp_path / 'runs'}"])


def test_a_byte_order_mark_is_accepted(tmp_path, capsys):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b'{"text": "hello world, this is text"}\n' * 200)
    assert main(["data", "prepare", str(f), "--out", str(tmp_path / "p")]) == 0


def test_prepared_token_ids_beyond_the_vocabulary_are_refused(tmp_path, capsys):
    f = tmp_path / "d.txt"
    f.write_text("some text to prepare. " * 400)
    out = tmp_path / "p"
    assert main(["data", "prepare", str(f), "--out", str(out)]) == 0
    train = np.fromfile(out / "train.bin", dtype=json.loads((out / "meta.json").read_text())["dtype"])
    train[10] = 5000
    train.tofile(out / "train.bin")
    err = _err(capsys, ["train", *TINY, "data.source=prepared", f"data.path={out}", f"--out={tmp_path / 'runs'}"])
    assert "token id 5000" in err and "vocabulary of 320" in err


def test_trace_into_a_missing_directory_is_refused_before_step_0(tmp_path, capsys):
    err = _err(capsys, [*_offload(tmp_path, "t"), "--trace", str(tmp_path / "nope" / "t.json")])
    assert "does not exist" in err
    assert not (tmp_path / "runs" / "t").exists()
    # a pass: /proc was a traceback after step 2, a file as the directory "did not exist", and a trace replaced the
    # run's config.toml and the user's --config
    mine = tmp_path / "my.toml"
    mine.write_text("[train]\nsteps = 3\n")
    (tmp_path / "afile").write_text("x")
    for where, says in (("/proc/self/fuyou-t.json", "cannot write there"), (str(tmp_path / "afile" / "t.json"),
                                                                           "is not a directory"),
                        (str(mine), "exists and is not a trace fuyou wrote")):
        err = _err(capsys, [*_offload(tmp_path, "t"), "--trace", where])
        assert says in err and "Traceback" not in err, err
    assert mine.read_text() == "[train]\nsteps = 3\n" and not (tmp_path / "runs" / "t").exists()


def test_out_naming_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    src = tmp_path / "d.txt"
    src.write_text("text " * 100)
    assert "is a file" in _err(capsys, ["data", "prepare", str(src), "--out", str(f)])
    assert "is a file" in _err(capsys, ["export", str(tmp_path), "--out", str(f)])


@pytest.mark.parametrize("flag,value", [("--repeats", "0"), ("--io-bytes", "0"), ("--adam-params", "0")])
def test_probe_refuses_zero_sizes(tmp_path, capsys, flag, value):
    assert "must be at least" in _err(capsys, ["probe", "--ssd", str(tmp_path), flag, value])


@pytest.mark.parametrize("content", [b"\x00\xff\xfe binary", b'{"profile": {"device": "tpu", "ssd_read": "fast"}}'])
def test_plan_profile_of_a_wrong_file(tmp_path, capsys, content):
    f = tmp_path / "p.json"
    f.write_bytes(content)
    err = _err(capsys, ["plan", "--profile", str(f)])
    assert "is not a hardware profile" in err and "pydantic" not in err and len(err.splitlines()) == 1


def test_plan_profile_mistakes_are_named_as_they_are(tmp_path, capsys):
    """A new-user pass: a directory and /dev/null were said not to exist, a JSON list was "not JSON", a
    Windows byte-order mark was "not JSON", a field from another version was unexplained, and a cpu_mem of 0
    or -1 was taken (256 GiB planned; -1 blamed a size nobody typed)."""
    from fuyou.planner.hardware import load_profile, resolve
    from fuyou.planner.config import HardwareConfig

    good = resolve(HardwareConfig(gpu="rtx4090", ssd="990-pro")).model_dump()
    assert "is a directory" in _err(capsys, ["plan", "--profile", str(tmp_path)])
    assert "is not a regular file" in _err(capsys, ["plan", "--profile", "/dev/null"])
    f = tmp_path / "p.json"
    f.write_text("[1, 2]")
    assert "JSON, but a list" in _err(capsys, ["plan", "--profile", str(f)])
    f.write_text('{"profile": null}')
    assert "JSON, but null" in _err(capsys, ["plan", "--profile", str(f)])
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"profile": good}).encode())
    assert load_profile(f).ssd_write == good["ssd_write"]
    f.write_text(json.dumps({"profile": {**good, "nvlink_gen": 5}}))
    assert "a profile from another version?" in _err(capsys, ["plan", "--profile", str(f)])
    for bad in (0, -1):
        f.write_text(json.dumps({"profile": {**good, "cpu_mem": bad}}))
        assert "cpu_mem: Input should be greater than 0" in _err(capsys, ["plan", "--profile", str(f)])


def test_a_manifest_extent_with_a_bad_directory_index(tmp_path, capsys):
    from fuyou.store import StoreCorruptError, TensorStore
    import torch

    with TensorStore.create([tmp_path / "s"]) as store:
        store.allocate("x", (1000,), torch.float32)
    m = tmp_path / "s" / "fuyou-store.json"
    data = json.loads(m.read_text())
    data["tensors"]["x"]["extents"][0][0] = 7
    m.write_text(json.dumps(data))
    with pytest.raises(StoreCorruptError, match="outside the store's 1 directories"):
        TensorStore.open([tmp_path / "s"])


def test_an_in_memory_run_that_cannot_fit_is_refused_with_numbers(tmp_path, capsys):
    err = _err(capsys, ["train", "--model", "gpt3-175b", "train.steps=1", f"--out={tmp_path / 'runs'}",
                        "data.source=synthetic", "model.vocab_size=320"])
    assert "training in memory needs about" in err and "--offload ssd" in err


def test_run_name_outside_the_out_dir(tmp_path, capsys):
    assert "plain directory name" in _err(capsys, ["train", *TINY, "run.name=../x", f"--out={tmp_path / 'runs'}"])


@pytest.mark.timeout(120)
def test_an_out_dir_that_is_a_link_to_nothing(tmp_path, capsys):
    """`--out LINK`, its target gone: train took the failed mkdir for a name another run took and tried the next
    names for ever (a pass); export said "cannot be made (File exists)"."""
    (tmp_path / "runs").symlink_to(tmp_path / "gone")
    err = _err(capsys, ["train", *TINY, f"--out={tmp_path / 'runs'}"])
    assert f"{tmp_path / 'runs'} is a link to {tmp_path / 'gone'}, which does not exist; check run.out_dir" in err, err
    (tmp_path / "ok").mkdir()  # the run directory itself a link to nothing: named as such (a review)
    (tmp_path / "ok" / "r").symlink_to(tmp_path / "gone2")
    err = _err(capsys, ["train", *TINY, f"--out={tmp_path / 'ok'}", "run.name=r"])
    assert f"{tmp_path / 'ok' / 'r'} is a link to {tmp_path / 'gone2'}, which does not exist" in err, err
    (tmp_path / "ok" / "r").unlink()
    assert main(["train", *TINY, f"--out={tmp_path / 'ok'}", "run.name=r"]) == 0
    for out in (tmp_path / "runs", tmp_path / "runs" / "sub"):
        err = _err(capsys, ["export", str(tmp_path / "ok" / "r"), "--out", str(out)])
        assert f"{tmp_path / 'runs'} is a link to" in err and "which does not exist; remove the link" in err, err


def test_rerun_after_a_kill_before_the_first_commit(tmp_path, capsys):
    """A state that was never committed is replaced with a message; a committed one is refused with
    the way to resume it, or replaced with offload.replace_state=true."""
    state = tmp_path / "ssd" / "r.fuyou-state"
    state.mkdir(parents=True)
    (state / "fuyou-store.id").write_text("{}")
    (state / "fuyou-store.0.dat").write_bytes(b"\0" * 4096)
    assert main(_offload(tmp_path, "r")) == 0
    assert "never committed SSD state" in capsys.readouterr().err
    # a committed state of the same name (kept: run.save_weights=false), then a new run named alike
    assert main(_offload(tmp_path, "k", "run.save_weights=false")) == 0
    err = _err(capsys, _offload(tmp_path, "k", f"run.out_dir={tmp_path / 'runs2'}"))
    # (the state names its run directory: the refusal says whose state it is and how to resume that run)
    assert f"committed SSD state of the run in {(tmp_path / 'runs' / 'k').resolve()}" in err and "--resume" in err, err
    assert main(_offload(tmp_path, "k", "offload.replace_state=true", f"run.out_dir={tmp_path / 'runs3'}")) == 0


def test_foreign_files_in_a_state_directory_are_refused(tmp_path, capsys):
    state = tmp_path / "ssd" / "f.fuyou-state"
    state.mkdir(parents=True)
    (state / "notes.txt").write_text("mine")
    assert "files fuyou did not make (notes.txt)" in _err(capsys, _offload(tmp_path, "f"))
    assert (state / "notes.txt").read_text() == "mine"


def test_resume_with_another_shape_is_refused_and_optimizer_changes_are_recorded(tmp_path, capsys):
    import signal

    env = {**os.environ, "FUYOU_FAULT": "forward@2"}
    killed = subprocess.run([sys.executable, "-m", "fuyou.cli", *_offload(tmp_path, "c", "offload.commit_every=1",
                                                                          "train.steps=4")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / "runs" / "c"
    err = _err(capsys, ["train", "--resume", str(run_dir), "model.d_model=128"])
    assert "cannot change model.d_model (64 -> 128)" in err
    err = _err(capsys, ["train", "--resume", str(run_dir), "optim.moments=int8"])  # the state's format is fixed
    assert "cannot change optim.moments ('fp32' -> 'int8')" in err
    err = _err(capsys, ["train", "--resume", str(run_dir), "train.precision=bf16"])  # the stored compute weights'
    assert "cannot change train.precision ('fp32' -> 'bf16')" in err and "Traceback" not in err
    for change, says in (("offload.commit=none", "cannot change offload.commit ('cow' -> 'none')"),
                         ("offload.mode=none", "cannot change offload.mode ('ssd' -> 'none')")):
        err = _err(capsys, ["train", "--resume", str(run_dir), change])  # (not "keeps no resumable state": a review)
        assert says in err and "keeps no resumable state" not in err, err
    toml = run_dir / "config.toml"  # a preset a later fuyou dropped, named by the run's own config
    original = toml.read_text()
    toml.write_text(original.replace("[hardware]\n", '[hardware]\ngpu = "rtx9090"\n', 1))
    err = _err(capsys, ["train", "--resume", str(run_dir)])
    assert "unknown GPU hardware.gpu='rtx9090'" in err and "the run's config.toml names it" in err, err
    toml.write_text(original)
    err = _err(capsys, ["train", "--resume", str(run_dir), "hardware.gpu=foo"])  # given now: no word of the file
    assert "unknown GPU hardware.gpu='foo'" in err and "config.toml names it" not in err, err
    err = _err(capsys, ["train", "--resume", str(run_dir), "--model", "llama-test"])  # (it blamed the family)
    assert "cannot change model.preset ('gpt-test' -> 'llama-test')" in err, err
    err = _err(capsys, ["train", "--resume", str(run_dir), "model.preset=llama-test"])  # (it blamed n_kv_head)
    assert "cannot change model.preset ('gpt-test' -> 'llama-test'): its committed state" in err, err
    err = _err(capsys, ["train", "--resume", str(run_dir), "--out", str(tmp_path / "elsewhere"), "run.name=x",
                        "optim.moments=int8"])  # (ignored in silence)
    assert "note: run.name, --out name a new run's directory; a resume continues in" in err, err
    assert main(["train", "--resume", str(run_dir), "optim.lr=0.0005"]) == 0
    err = capsys.readouterr().err
    assert "resumed with changes" in err and "optim.lr 0.001 -> 0.0005" in err
    entry = json.loads((run_dir / "resumes.jsonl").read_text().splitlines()[-1])
    at = entry["resumed_at_step"]  # the commit of step 2 is asynchronous: the kill may come first
    assert at in (1, 2) and entry["changed"]["optim.lr"] == [0.001, 0.0005]
    assert "lr = 0.0005" in (run_dir / "config.toml").read_text()
    assert (run_dir / f"config.step-{at}.toml").is_file()


def test_a_non_finite_loss_stops_before_its_step_is_committed(tmp_path, capsys):
    """optim.lr=inf is refused as a config; a learning rate that blows the weights up makes a
    non-finite loss, which stops the run with the last commit intact, and the metrics stay JSON."""
    assert "finite number" in _err(capsys, _offload(tmp_path, "i", "optim.lr=inf"))
    err = _err(capsys, _offload(tmp_path, "n", "optim.lr=1e35", "train.steps=6", "train.grad_clip=none",
                                "offload.commit_every=1", "train.log_every=1", "train.warmup_steps=0"), 3)
    assert "is nan" in err.lower() or "is inf" in err.lower()
    assert "the last commit is intact" in err
    first = _err(capsys, _offload(tmp_path, "n1", "model.init_std=1e30", "train.steps=2"), 3)  # (lower-lr advice
    # looped)
    assert "no update had been made yet" in first and "optim.lr=" not in first, first
    first = _err(capsys, ["train", "--out", str(tmp_path / "runs"), "run.name=m1", *TINY, "model.init_std=1e30",
                          "train.steps=2"], 3)
    assert "no update had been made yet" in first and not (tmp_path / "runs" / "m1" / "snapshots").exists(), first
    run_dir = tmp_path / "runs" / "n"  # (a plain resume, as the advice said, read lr=1e35 again: a pass)
    assert f"`fuyou train --resume {run_dir} optim.lr=1e+34`; it is 1e+35 now" in err, err
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    rec = json.loads((tmp_path / "ssd" / "n.fuyou-state" / "fuyou-commit.json").read_text())
    assert rec["step"] >= 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_non_finite_gradient_norm_under_a_finite_loss_stops_before_its_step_is_committed(tmp_path, capsys,
                                                                                          monkeypatch, precision):
    """A finite loss whose gradient overflows (an inf in one parameter's norm, as fp32 backward or the sum of squares
    can give): clipping by that norm would write NaN or zeroed weights into the commit. The step stops with the last
    commit intact, and the resume from it is bit-exact with a run that never saw the overflow (nothing tested the
    norm's check: every non-finite test made the loss non-finite, caught first; a mutation audit)."""
    import fuyou.engine.engine as engine

    args = ["model.preset=gpt-test", "model.n_layer=4", f"train.precision={precision}", "train.steps=4",
            "data.seq_len=32", "train.micro_batch_size=2", "train.eval_every=0", "train.grad_clip=1.0",
            "offload.commit_every=1", "offload.resident_mem=0"]
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    base = ["train", "--offload", "ssd", "--ssd", str(ssd), "--out", str(tmp_path / "runs"), *args]
    assert main([*base, "run.name=ref"]) == 0, capsys.readouterr().err
    steps = []
    real_step, real_norm, real_foreach = engine.Engine._train_step, engine.grad_norm, torch._foreach_norm

    def train_step(self, step):
        steps.append(step)
        return real_step(self, step)

    def overflow(norms):  # step 3's first parameter's norm: inf
        return [torch.full_like(norms[0], float("inf")), *norms[1:]] if steps[-1] == 2 else norms
    monkeypatch.setattr(engine.Engine, "_train_step", train_step)
    monkeypatch.setattr(engine, "grad_norm", lambda g: overflow([real_norm(g)])[0])  # bf16: the kernel's norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a: overflow(list(real_foreach(ts, *a))))  # fp32
    err = _err(capsys, [*base, "run.name=of"], 3)
    assert "the gradient norm of step 3 is inf" in err and "the last commit is intact" in err, err
    monkeypatch.undo()
    rec = json.loads((ssd / "of.fuyou-state" / "fuyou-commit.json").read_text())
    assert rec["step"] == 2
    assert main(["train", "--resume", str(tmp_path / "runs" / "of")]) == 0, capsys.readouterr().err
    want = load_file(str(tmp_path / "runs" / "ref" / "model.safetensors"))
    got = load_file(str(tmp_path / "runs" / "of" / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("extra", [["train.grad_clip=1.0"], ["train.grad_clip=none"],
                                   ["lora.rank=2", "model.preset=llama-test"], ["optim.moments=int8"]])
def test_an_in_memory_run_stops_at_a_non_finite_loss_and_keeps_the_weights_before_it(tmp_path, capsys, extra):
    """In memory, a non-finite loss was trained through: NaN weights saved, exit 0, and the snapshots of good
    steps rotated away by NaN ones (a pass). The step is not applied, the run stops with the engine's error,
    and the weights before it (LoRA: the adapters) are kept as a snapshot, equal to a clean run's of that step;
    the advice fits the run (a LoRA snapshot is not an --init-from)."""
    out = tmp_path / "runs"
    base = ["train", "--out", str(out), *TINY, "optim.lr=1e12", "train.warmup_steps=0", "train.lr_schedule=constant",
            "train.save_every=1", "train.keep_snapshots=2", *extra]
    err = _err(capsys, [*base, "train.steps=6", "run.name=m"], 3)
    assert " is nan" in err or " is inf" in err, err
    run_dir = out / "m"
    stopped = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    snap = run_dir / "snapshots" / f"step-{stopped['step']:06d}"
    assert stopped["stopped"] == "non-finite" and stopped["snapshot"] == str(snap)
    assert f"kept in {snap}" in err and snap.is_dir()
    lora = "lora.rank=2" in extra
    error = next(line for line in err.splitlines() if line.startswith("fuyou: error"))
    assert ("lora.init_from" in error) == lora and ("--init-from" in error) != lora
    name = "adapter.safetensors" if lora else "model.safetensors"
    kept = load_file(str(snap / name))
    assert all(bool(torch.isfinite(w).all()) for w in kept.values())
    assert not (run_dir / name).exists()  # (it held NaN weights)
    if stopped["step"] > 1:  # not rotated out by the kept weights, which gave the non-finite loss: the one before
        assert (run_dir / "snapshots" / f"step-{stopped['step'] - 1:06d}").is_dir()
        assert f"snapshots/step-{stopped['step'] - 1:06d}" in error
    if stopped["step"]:  # the same run stopped cleanly after that step saved the same weights
        assert main([*base, f"train.steps={stopped['step']}", "run.name=clean"]) == 0
        clean = load_file(str(out / "clean" / name))
        assert clean.keys() == kept.keys() and all(torch.equal(clean[k], kept[k]) for k in kept)
    if not lora:
        assert main(["export", str(snap), "--out", str(tmp_path / "ex")]) == 0  # (it refused every NaN snapshot)


def _tmpfs(d, options: str):
    """A tmpfs mounted at ``d`` (made) with ``options``; the test is skipped where this process may not mount."""
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield d
    subprocess.run(["umount", str(d)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system."""
    yield from _tmpfs(tmp_path / "ro", "ro,size=1m")


@pytest.fixture
def small_dir(tmp_path):
    """A 4 MiB file system."""
    yield from _tmpfs(tmp_path / "small", "size=4m")


def test_a_run_directory_too_small_for_the_weights_is_refused_before_training(tmp_path, capsys, small_dir):
    """An in-memory run whose run directory's disk filled up lost its trained weights at the end (a pass): the
    weights (and snapshots) the run will save are checked against the free space before anything starts."""
    err = _err(capsys, ["train", "--out", str(small_dir / "runs"), *TINY, "model.n_layer=24"])  # 5 MB of weights
    assert "the run directory's disk" in err and "4 B a parameter" in err, err
    assert not any(small_dir.iterdir())  # nothing was started
    err = _err(capsys, ["train", "--out", str(small_dir / "runs"), *TINY, "model.n_layer=1", "train.steps=10",
                        "train.save_every=1", "train.keep_snapshots=8"])  # (8 + 1) x 0.4 MB and the logs' 1 MiB
    assert "up to 8 snapshots" in err and "lower train.keep_snapshots" in err, err
    assert main(["train", "--out", str(small_dir / "runs"), *TINY, "model.n_layer=1"]) == 0  # 1 block fits
    # the most held at once is what the check counts: 3 snapshots kept and the final weights (4 x 0.4 MB) fit
    assert main(["train", "--out", str(small_dir / "runs"), *TINY, "model.n_layer=1", "train.steps=6",
                 "train.save_every=1", "train.keep_snapshots=3", "run.name=three"]) == 0


def test_read_only_places(tmp_path, capsys, read_only_dir):
    src = tmp_path / "d.txt"
    src.write_text("text " * 100)
    assert "cannot be written" in _err(capsys, ["data", "prepare", str(src), "--out", str(read_only_dir / "p")])
    assert "cannot be written" in _err(capsys, ["export", str(tmp_path), "--out", str(read_only_dir / "hf")])
    err = _err(capsys, ["train", "--offload", "ssd", "--ssd", str(read_only_dir), "--cpu-mem", "256MiB", "--out",
                        str(tmp_path / "runs"), *TINY])
    assert "read-only" in err.lower() or "permission" in err.lower() or "EROFS" in err, err
    assert "0 B at offset 0" not in err


def test_cli_mistakes_found_by_a_new_user_pass(tmp_path, capsys):
    """Each gets a sentence that says what to do: --ssd without the SSD tier, --resume given the run's
    config.toml, export of a directory that does not exist, a whole-config check (no field to name)."""
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    assert "add --offload ssd, or drop --ssd" in _err(capsys, ["train", "--ssd", str(ssd), "--out", str(tmp_path / "r"),
                                                               "model.preset=gpt-tiny", "train.steps=1"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("[train]\nsteps = 1\n")
    assert f"--resume {run}" in _err(capsys, ["train", "--resume", str(run / "config.toml")])
    assert "does not exist or is not a directory" in _err(capsys, ["export", str(tmp_path / "nope"), "--out",
                                                                   str(tmp_path / "out")])
    err = _err(capsys, ["train", "--out", str(tmp_path / "r"), "model.preset=gpt-tiny", "lora.base=nf4"])
    assert "\n  lora" in err or "\n  lora.base" in err or "lora.base=nf4" in err
    assert "\n  : " not in err
    assert "--commit none makes none; give one" in _err(capsys, [
        "plan", "--model", "gpt3-13b", "--gpu", "rtx4090", "--ssd", "1x990-pro", "--cpu-mem", "64GiB", "--commit",
        "none", "--commit-every", "1"])
    # LoRA over a random base says so when it starts, not only at export
    assert main(["train", "--out", str(tmp_path / "r"), "model.preset=gpt-tiny", "lora.rank=2", "train.steps=1",
                 "train.eval_batches=1"]) == 0
    assert "note: LoRA over a base drawn at random" in capsys.readouterr().err
    # full fine-tuning's optimizer settings with LoRA are said to be unused (a pass: taken in silence)
    assert main(["train", "--out", str(tmp_path / "r"), "--offload", "ssd", "--ssd", str(ssd), "model.preset=gpt-tiny",
                 "lora.rank=2", "train.steps=1", "train.eval_batches=1", "offload.resident_mem=1GiB",
                 "offload.clip_schedule=defer", "offload.prefetch_depth=1"]) == 0
    err = capsys.readouterr().err
    assert ("note: offload.resident_mem, offload.clip_schedule set full fine-tuning's CPU optimizer and are not used "
            "with LoRA (lora.rank=2)") in err, err
    assert "offload.prefetch_depth" not in err.split("not used with LoRA")[0]


def test_import_to_a_file_is_refused_with_a_sentence(tmp_path, capsys):
    """`fuyou import HF --out afile` gave a NotADirectoryError traceback; `--out afile/sub` too."""
    f = tmp_path / "afile"
    f.write_text("x")
    assert "is a file; give a directory" in _err(capsys, ["import", str(tmp_path), "--out", str(f)])
    assert "is a file, not a directory" in _err(capsys, ["import", str(tmp_path), "--out", str(f / "sub")])
    adapter = tmp_path / "adapter"  # (a hostile pass: "no config.json", where train and export name an adapter)
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    err = _err(capsys, ["import", str(adapter), "--out", str(tmp_path / "imported")])
    assert "is a PEFT adapter (adapter_config.json), not a model" in err, err


def test_a_toml_file_that_is_not_utf8_is_a_sentence_and_a_byte_order_mark_is_read(tmp_path, capsys):
    """A config saved in Latin-1 was a UnicodeDecodeError traceback wherever it was read (train --config, a run's
    config.toml under --resume, export, plan --model RUN), and one with a byte-order mark "Invalid statement"
    (a pass)."""
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"# r\xe9glages\n[train]\nsteps = 1\n")
    err = _err(capsys, ["train", "--config", str(latin1)])
    assert "is not UTF-8 text (line 1" in err and "iconv" in err
    utf16 = tmp_path / "utf16.toml"
    utf16.write_bytes("[train]\nsteps = 1\n".encode("utf-16"))
    assert "iconv -f utf-16" in _err(capsys, ["train", "--config", str(utf16)])
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[train]\nsteps = 1\n")
    out = tmp_path / "runs"
    assert main(["train", "--config", str(bom), "--out", str(out), "run.name=b", *TINY[:-2], "train.steps=1"]) == 0
    run = out / "b"
    (run / "config.toml").write_bytes(b"\xff\xfe garbage")
    for argv in (["train", "--resume", str(run)], ["plan", "--model", str(run)]):
        assert "is not UTF-8 text" in _err(capsys, argv), argv


def test_cli_mistakes_found_by_a_second_new_user_pass(tmp_path, capsys):
    """Each was silent or said the wrong thing (a pass, 2026-12-05)."""
    out = tmp_path / "runs"
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('[model]\npreset = "gpt-test"\n')
    b.write_text("[train]\nsteps = 1\n")
    # a second --config replaced the first; an option given twice kept the last
    with pytest.raises(SystemExit):
        main(["train", "--config", str(a), "--config", str(b)])
    assert "--config given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--stpes", "3"])
    err = capsys.readouterr().err
    assert "usage: fuyou train" in err and "did you mean --steps?" in err
    with pytest.raises(SystemExit):
        main(["plan", "--gpuu", "h100"])
    err = capsys.readouterr().err
    assert "usage: fuyou plan" in err and "did you mean --gpu?" in err
    assert "an empty path" in _err(capsys, ["train", "--offload", "ssd", "--ssd", "", "--out", str(out)])
    # empty values
    assert "run.out_dir is empty" in _err(capsys, ["train", "run.out_dir="])
    assert "an empty path" in _err(capsys, ["train", "data.path="])
    # a model directory as a preset; prepared data as a model
    model = tmp_path / "model"
    model.mkdir()
    assert "--init-from" in _err(capsys, ["train", "--model", str(model)])
    prep = tmp_path / "prep"
    assert main(["data", "prepare", str(_write(tmp_path / "t.txt", "some text " * 50)), "--out", str(prep)]) == 0
    assert "is prepared data" in _err(capsys, ["train", "--init-from", str(prep), "--out", str(out)])
    # UTF-16 text is not Latin-1; a file given twice is read once; a linked directory is named
    (tmp_path / "u16.txt").write_bytes("hello world\n".encode("utf-16"))
    err = _err(capsys, ["data", "prepare", str(tmp_path / "u16.txt"), "--out", str(tmp_path / "x")])
    assert "iconv -f utf-16" in err
    # (an executable read as UTF-16: a hostile pass)
    (tmp_path / "exe.txt").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(9) + bytes(range(256)) * 2)
    err = _err(capsys, ["data", "prepare", str(tmp_path / "exe.txt"), "--out", str(tmp_path / "x")])
    assert "a binary file, not text" in err and "utf-16" not in err, err
    # (and UTF-16 without a byte-order mark, CJK between the ASCII: a review saw it called binary)
    (tmp_path / "cjk.txt").write_bytes('{"text": "你好世界，今天天气很好"}\n'.encode("utf-16-le"))
    err = _err(capsys, ["data", "prepare", str(tmp_path / "cjk.txt"), "--out", str(tmp_path / "x")])
    assert "iconv -f utf-16" in err, err
    docs = tmp_path / "docs"
    docs.mkdir()
    _write(docs / "one.txt", "first document " * 20)
    (docs / "linked").symlink_to(tmp_path / "model")
    assert main(["data", "prepare", str(docs), str(docs / "one.txt"), "--out", str(tmp_path / "y")]) == 0
    cap = capsys.readouterr()
    assert "given twice" in cap.err and "a link to a directory, not followed" in cap.err
    assert "read 1 document " in cap.out  # once, not twice
    # /proc as an SSD directory failed as a state "deleted or moved while in use"
    assert "no storage" in _err(capsys, ["train", "--offload", "ssd", "--ssd", "/proc", "--out", str(out)])


def _write(path, text):
    path.write_text(text)
    return path


def test_the_weights_kept_after_a_non_finite_loss_push_out_no_earlier_snapshot(tmp_path, capsys):
    """The weights kept after a non-finite loss are the ones that gave it: kept, they rotated out the last finite
    snapshot, and the advice to start from them looped (a pass). They are kept beside the earlier snapshots, and
    the advice names the earlier one first."""
    out = tmp_path / "runs"
    args = ["train", "--out", str(out), "model.preset=gpt-test", "data.seq_len=32", "train.steps=20", "optim.lr=1e3",
            "train.keep_snapshots=1"]
    _err(capsys, [*args, "run.name=probe"], 3)  # where it diverges (it moved with the machine's arithmetic: a test
    step = json.loads((out / "probe" / "metrics.jsonl").read_text().splitlines()[-1])["step"]  # that failed here)
    assert step >= 3
    every = step - 1  # (the case: a step between saves, after one)
    err = _err(capsys, [*args, "run.name=n", f"train.save_every={every}"], 3)
    stopped = json.loads((out / "n" / "metrics.jsonl").read_text().splitlines()[-1])
    assert stopped["stopped"] == "non-finite" and stopped["step"] == step, (stopped, err)
    earlier = f"step-{every:06d}"
    assert sorted(p.name for p in (out / "n" / "snapshots").iterdir()) == [earlier, f"step-{step:06d}"]
    assert f"start from an earlier snapshot (start a run with --init-from {out / 'n' / 'snapshots' / earlier})" in err


def test_a_run_directory_whose_records_fail_is_removed_with_the_state(tmp_path, capsys, monkeypatch):
    """Writing the run's records failed after its directory and config.toml were made (a full disk): the state,
    made for a run that never was, was removed, but the directory stayed, and the same command was refused by it
    with a resume that could not work (a review). Both go; the same command then starts the run."""
    from fuyou.train import loop

    real = loop.record_data

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "record_data", full)
    err = _err(capsys, _offload(tmp_path, "rec"))
    assert "making the run directory" in err and "No space left on device" in err, err
    assert not (tmp_path / "runs" / "rec").exists() and not any((tmp_path / "ssd").iterdir())
    monkeypatch.setattr(loop, "record_data", real)
    assert main(_offload(tmp_path, "rec")) == 0


def test_a_second_export_into_the_same_out_leaves_the_first_s_files(tmp_path, capsys, monkeypatch):
    """Two exports into one --out at once: the one refused ("not empty") deleted the other's finished export as
    its own half-written files (a pass: the directory was gone). One export writes at a time (a lock beside
    --out, held here as another export would hold it); a later one is refused and touches nothing."""
    import fcntl

    assert main(_offload(tmp_path, "ex")) == 0
    out = tmp_path / "hf"
    lock = tmp_path / ".hf.fuyou-export.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, b"4242\n", 0)
    try:
        err = _err(capsys, ["export", str(tmp_path / "runs" / "ex"), "--out", str(out)])
        assert "another fuyou export is writing to" in err and "(process 4242)" in err, err
        assert not out.exists()
    finally:
        os.close(fd)
    assert main(["export", str(tmp_path / "runs" / "ex"), "--out", str(out)]) == 0
    assert not lock.exists()  # (removed after the export)
    written = sorted(p.name for p in out.iterdir())
    assert "not empty" in _err(capsys, ["export", str(tmp_path / "runs" / "ex"), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == written and "model.safetensors" in written
    mask = os.umask(0o022)
    os.umask(mask)  # every file of the export as the umask makes files (safetensors made the weights 0600: a pass)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()} == {oct(0o666 & ~mask)}
    # --out . (its lock beside it, not in it: "not empty", always), and a new nested --out (locked too)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["export", str(tmp_path / "runs" / "ex"), "--out", "."]) == 0
    assert main(["export", str(tmp_path / "runs" / "ex"), "--out", str(tmp_path / "a" / "b" / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "here").iterdir()) == written
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["hf"]


def _unended(run) -> None:
    """The run's metrics without their summary: a run that has not ended (training, or stopped before its end)."""
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(x + "\n" for x in metrics.read_text().splitlines() if '"summary"' not in x))


def test_a_new_run_named_as_one_still_training_is_not_told_to_resume_it(tmp_path, capsys):
    """A second `train` with the name of a run still training was told to `--resume` it, which is refused while
    it trains (a pass). It is told the run is training, by which process, and what to do."""
    from fuyou.store import TensorStore

    assert main(_offload(tmp_path, "live", "offload.keep_state=true", "run.save_weights=false")) == 0
    _unended(tmp_path / "runs" / "live")
    capsys.readouterr()
    with TensorStore.open([tmp_path / "ssd" / "live.fuyou-state"]):  # as the training process holds it
        err = _err(capsys, _offload(tmp_path, "live"))
    assert f"it holds a run that is still training (process {os.getpid()})" in err, err
    assert "--resume" in _err(capsys, _offload(tmp_path, "live"))  # stopped: it is told to continue it


def test_runs_started_in_the_same_second_without_a_name_take_the_next_free_one(tmp_path, capsys, monkeypatch):
    """Runs started at once with no run.name draw the same name from the time (a job array, in a pass): the second
    was refused, told to give each its own run.name. A run whose name another run's live state holds, before or
    after its first commit, takes the next free numbered name and trains; the other's files stay. An SSD run whose
    run directory was made meanwhile (its state is named after it) is still refused, an in-memory one goes on."""
    from fuyou.engine.commit import RECORD
    from fuyou.store.lock import lock_dirs, unlock
    from fuyou.train import loop, run

    args = [a for a in _offload(tmp_path, "x") if a != "run.name=x"] + ["train.steps=1", "offload.keep_state=true"]
    ssd, runs = tmp_path / "ssd", tmp_path / "runs"
    for i, committed in enumerate((False, True)):  # the other run's state before and after its first commit
        monkeypatch.setattr(run.time, "strftime", lambda fmt, *a, i=i: f"2026010{i + 1}-000000")
        drawn = f"gpt-test-2026010{i + 1}-000000"
        state = ssd / f"{drawn}.fuyou-state"
        state.mkdir(parents=True)
        (state / "fuyou-store.id").write_text("{}")
        if committed:
            (state / RECORD).write_text("{}")
        held = lock_dirs([state])
        try:
            assert main(args) == 0
        finally:
            unlock(held)
        err = capsys.readouterr().err
        assert f"is another run's, started in the same second: this run is {drawn}-2" in err, err
        assert (state / "fuyou-store.id").read_text() == "{}" and not (runs / drawn).exists()
        assert (runs / f"{drawn}-2" / "config.toml").is_file()
        assert (ssd / f"{drawn}-2.fuyou-state" / RECORD).is_file()  # its own state, under its own name
    real = loop.make_run_dir

    def made_meanwhile(cfg, path, rid):  # the other run makes the directory between the naming and this run's
        if path.name == "gpt-test-20260202-000000":
            path.mkdir(parents=True, exist_ok=True)
        return real(cfg, path, rid)

    monkeypatch.setattr(loop, "make_run_dir", made_meanwhile)
    monkeypatch.setattr(run.time, "strftime", lambda fmt, *a: "20260202-000000")
    err = _err(capsys, args)
    assert "made meanwhile by another run that drew the same name from the time" in err, err
    assert list((runs / "gpt-test-20260202-000000").iterdir()) == []
    memory = ["train", "--out", str(runs), *TINY, "train.steps=1"]  # in memory: no state is named after it
    assert main(memory) == 0, capsys.readouterr().err
    assert (runs / "gpt-test-20260202-000000-2" / "model.safetensors").is_file()
    assert list((runs / "gpt-test-20260202-000000").iterdir()) == []
    # its records then fail (a full disk): the directory it made goes, not the other run's (a review: the other's
    # was removed, named in the error)
    monkeypatch.setattr(run.time, "strftime", lambda fmt, *a: "20260303-000000")

    def made_with_metrics(cfg, path, rid):
        if path.name == "gpt-test-20260303-000000":
            path.mkdir(parents=True, exist_ok=True)
            (path / "metrics.jsonl").write_text("{}\n")
        return real(cfg, path, rid)

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(loop, "make_run_dir", made_with_metrics)
    monkeypatch.setattr(loop, "_record_run", full)
    err = _err(capsys, memory)
    assert "making the run directory" in err and "gpt-test-20260303-000000-2 failed" in err, err
    assert (runs / "gpt-test-20260303-000000" / "metrics.jsonl").is_file()
    assert not (runs / "gpt-test-20260303-000000-2").exists()


def test_a_run_whose_store_another_run_made_after_its_data_loaded_loads_it_once(tmp_path, capsys, monkeypatch):
    """The narrowest race of runs drawing one name: the other run makes its store between this run's look at the
    state directory and its own store's creation, after this run's data loaded. It takes the next free name, with
    the data it loaded: a retried build loaded the data again (a second tokenization, its notes said twice)."""
    from fuyou.store import TensorStore
    from fuyou.store.errors import StoreLockedError
    from fuyou.train import loop, run

    monkeypatch.setattr(run.time, "strftime", lambda fmt, *a: "20260404-000000")
    drawn = "gpt-test-20260404-000000"
    real_create, real_load = TensorStore.create.__func__, loop.load_training_data
    loads = []

    def create(cls, dirs, *a, **k):
        if dirs[0].name == f"{drawn}.fuyou-state":
            raise StoreLockedError(f"{dirs[0]} is locked by process 1")
        return real_create(cls, dirs, *a, **k)

    monkeypatch.setattr(TensorStore, "create", classmethod(create))
    monkeypatch.setattr(loop, "load_training_data", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    args = [a for a in _offload(tmp_path, "x") if a != "run.name=x"] + ["train.steps=1"]
    assert main(args) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"this run is {drawn}-2" in err and len(loads) == 1, err
    assert (tmp_path / "runs" / f"{drawn}-2" / "model.safetensors").is_file()
    assert not (tmp_path / "runs" / drawn).exists()


def test_runs_started_at_once_without_a_name_all_train(tmp_path):
    """Three processes started at once, no run.name, one second on their clocks: each trains under its own name,
    with its own state (the race itself, where the test above holds a lock for the other run)."""
    ssd, runs = tmp_path / "ssd", tmp_path / "runs"
    ssd.mkdir()
    code = ("import sys, time\nreal = time.strftime\ntime.strftime = lambda f, *a: '20260101-000000' if "
            "f == '%Y%m%d-%H%M%S' else real(f, *a)\nfrom fuyou.cli import main\nsys.exit(main(sys.argv[1:]))")
    argv = [sys.executable, "-c", code, "train", "--offload", "ssd", "--ssd", str(ssd), "--cpu-mem", "256MiB", "--out",
            str(runs), *TINY, "train.steps=1", "train.eval_every=0", "offload.keep_state=true"]
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    names = sorted(p.name for p in runs.iterdir())
    assert names == [f"gpt-test-20260101-000000{s}" for s in ("", "-2", "-3")], names
    for n in names:
        assert (runs / n / "model.safetensors").is_file() and (ssd / f"{n}.fuyou-state" / "fuyou-commit.json").is_file()


def test_a_state_held_by_an_export_is_not_called_a_run_still_training(tmp_path, capsys):
    """An export holds the state's lock while it reads: a resume meanwhile was told the run "is still training",
    and a second export called the stopped run so (a pass). They name the export."""
    assert main(_offload(tmp_path, "held", "offload.keep_state=true", "run.save_weights=false",
                         "train.steps=3")) == 0
    run = tmp_path / "runs" / "held"
    _unended(run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom fuyou.store import TensorStore\n"
                               "with TensorStore.open([sys.argv[1]]):\n    print('held', flush=True)\n"
                               "    time.sleep(120)\n", str(tmp_path / "ssd" / "held.fuyou-state"), "-m", "fuyou.cli",
                               "export"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = _err(capsys, ["train", "--resume", str(run)])
        assert f"in use by process {holder.pid}, exporting it; wait for it to end" in err, err
        assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
        assert f"(stopped; process {holder.pid} is exporting it too)" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_an_empty_data_file_is_refused_by_plan_and_train_alike(tmp_path, capsys):
    """`fuyou plan` planned a data.path of 0 bytes that train then refused while loading it: both refuse it now,
    before anything is built, for the training data and the held-out data."""
    from fuyou.cli import main

    empty, text = tmp_path / "empty.txt", tmp_path / "text.txt"
    empty.write_text("")
    text.write_text("some text " * 50)
    assert main(["plan", "--model", "gpt-tiny", "--gpu", "rtx4090", "--ssd", "990-pro", f"data.path={empty}"]) == 2
    assert "data.path" in capsys.readouterr().err
    # an empty file beside one with text is only its share of the data, nothing (refused at first: a review)
    assert main(["plan", "--model", "gpt-tiny", "--gpu", "rtx4090", "--ssd", "990-pro",
                 f'data.path=["{empty}", "{text}"]']) == 0
    capsys.readouterr()
    for given in ([f"data.path={empty}"], [f"data.path={text}", f"data.eval_path={empty}"]):
        assert main(["train", "--out", str(tmp_path / "runs"), *given, "train.steps=1"]) == 2
        assert f"{given[-1].split('=')[0]} '{empty}' is an empty file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_every_error_class_exits_with_the_status_of_what_to_do():
    """Every error exited 2, so a scheduler could not tell a retry (a disk or a rank that failed mid-run) from
    a command that fails again as it is (a mistake, a divergence): 2 a mistake or a state that cannot be resumed
    as asked, 3 divergence, 4 a failure while running, 5 a damaged state (fuyou/errors.py)."""
    from fuyou.distributed import DistributedError
    from fuyou.engine.commit import CommitError, DamagedStateError, ResumeError
    from fuyou.engine.committed import CommitMoved
    from fuyou.errors import BudgetError, ConfigError, DataError, FuyouError, NonFiniteError
    from fuyou.store.errors import (StoreCorruptError, StoreFullError, StoreIOError, StoreLockedError,
                                    StoreNotFoundError, StorePermissionError, StoreSpaceError, StoreUsageError)
    from fuyou.train.run import ExportBusy, SaveError
    from fuyou.watchdog import StallError

    want = {ConfigError: 2, DataError: 2, BudgetError: 2, StoreSpaceError: 2, StoreLockedError: 2, ResumeError: 2,
            StorePermissionError: 2, StoreUsageError: 2, StoreNotFoundError: 2, CommitMoved: 2, ExportBusy: 2,
            NonFiniteError: 3,
            StoreIOError: 4, StoreFullError: 4, StallError: 4, CommitError: 4, SaveError: 4, DistributedError: 4,
            FuyouError: 4, StoreCorruptError: 5, DamagedStateError: 5}
    assert {c: c.exit_status for c in want} == want


@pytest.fixture(scope="module")
def exported_adapter(tmp_path_factory):
    """A PEFT adapter directory: a one-step gpt-test LoRA run's ``fuyou export``."""
    d = tmp_path_factory.mktemp("adapter")
    assert main(["train", "--model", "gpt-test", "--out", str(d / "runs"), "run.name=src", *ADAPTED,
                 "train.steps=1"]) == 0
    assert main(["export", str(d / "runs" / "src"), "--out", str(d / "ad")]) == 0
    return d / "ad"


ADAPTED = ["train.precision=fp32", "data.seq_len=32", "train.eval_every=0", "lora.rank=4", "lora.targets=[c_attn]"]


@pytest.mark.parametrize("edit, said", [
    (lambda c: [1, 2], "holds a JSON list, not the object of fields"),
    (lambda c: None, "holds a JSON NoneType"),
    (lambda c: {**c, "target_modules": "(c_attn"}, "its target_modules is '(c_attn', not a module name list or a "
                                                   "regular expression"),
    (lambda c: {**c, "target_modules": [1, 2]}, "its target_modules is [1, 2], not a list of module names"),
    (lambda c: {**c, "target_modules": 5}, "its target_modules is 5"),
    (lambda c: {**c, "r": "4"}, "its r is '4', not a rank"),
    (lambda c: {**c, "lora_alpha": "x"}, "its lora_alpha is 'x', not a number"),
    (lambda c: {**c, "layers_to_transform": "0"}, "its layers_to_transform is '0', not a layer number"),
    (lambda c: {**c, "peft_type": None}, "its peft_type is None, not a name"),
    # PEFT's default rank (8) where the file gives none: the run's 4 differs, and the advice is a rank, not None
    (lambda c: {k: v for k, v in c.items() if k != "r"}, "train it with its own: lora.rank=8 "),
])
def test_a_malformed_adapter_config_is_a_sentence(exported_adapter, tmp_path, capsys, edit, said):
    """An audit: a hand-edited adapter_config.json (a list, a number or a broken regular expression for
    target_modules) ended in a traceback (exit 1); a rank written as a string was "lora.rank differ", with the
    value given as the fix."""
    import shutil

    ad = tmp_path / "ad"
    shutil.copytree(exported_adapter, ad)
    conf = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps(edit(conf)))
    err = _err(capsys, ["train", "--model", "gpt-test", "--out", str(tmp_path / "runs"), *ADAPTED,
                        f"lora.init_from={ad}"])
    assert said in err, err


def test_an_adapter_with_non_finite_values_is_refused_by_name(exported_adapter, tmp_path, capsys):
    """An audit: NaN in the adapter trained, then stopped at step 1 naming the initial weights and the data."""
    import shutil

    from safetensors.torch import save_file

    ad = tmp_path / "ad"
    shutil.copytree(exported_adapter, ad)
    weights = load_file(str(ad / "adapter_model.safetensors"))
    name = sorted(weights)[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, str(ad / "adapter_model.safetensors"))
    err = _err(capsys, ["train", "--model", "gpt-test", "--out", str(tmp_path / "runs"), *ADAPTED,
                        f"lora.init_from={ad}"])
    assert f"{name} in {ad / 'adapter_model.safetensors'} holds non-finite values" in err, err


def test_a_state_directory_not_there_or_a_data_file_missing_is_said_as_such(tmp_path, capsys):
    """A hostile pass: a two-drive run's first directory gone said it was "directory 1 listed at position 1", the
    second's gone "not part of this store" (and its export "1 were given", where none was); a data file deleted was
    exit 4, "deleted while in use", a retry that fails for ever: it is a damaged state (5). Each time the state,
    put back, resumes."""
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    argv = ["train", "--offload", "ssd", "--ssd", str(a), "--ssd", str(b), "--cpu-mem", "256MiB", "--out",
            str(tmp_path / "runs"), "run.name=two", "offload.keep_state=true", *TINY]
    assert main(argv) == 0
    run, state = tmp_path / "runs" / "two", "two.fuyou-state"
    resume = ["train", "--resume", str(run), "train.steps=3"]
    capsys.readouterr()
    shutil.move(a / state, tmp_path / "away")
    err = _err(capsys, resume)
    assert f"{a / state} holds none of the training state's files" in err and "not mounted" in err, err
    shutil.move(tmp_path / "away", a / state)
    shutil.move(b / state, tmp_path / "away")
    err = _err(capsys, resume)
    assert f"{b / state} holds none of the training state's files: directory 1 of" in err, err
    (run / "model.safetensors").unlink()
    err = _err(capsys, ["export", str(run), "--out", str(tmp_path / "e")])
    assert f"{b / state} is not there" in err and "--ssd" in err, err
    shutil.move(tmp_path / "away", b / state)
    data = next((b / state).glob("fuyou-store.*.dat"))
    data.rename(tmp_path / "data")
    err = _err(capsys, resume, status=5)
    assert f"{data}: the store's data file is missing" in err, err
    (tmp_path / "data").rename(data)
    assert main(resume) == 0


def test_a_list_of_bare_paths_is_a_list_and_a_gone_run_directory_is_not_offered_for_resume(tmp_path, capsys):
    """A hostile pass: offload.ssd_dirs=[/a,/b] (written as lora.targets=[q_proj,v_proj] is) was one directory
    named '[/a,/b]', "create it first"; a committed state whose run directory was deleted was refused with the
    advice to resume that directory, which fails."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    argv = ["train", "--offload", "ssd", f"offload.ssd_dirs=[{a},{b}]", "--cpu-mem", "256MiB", "--out",
            str(tmp_path / "runs"), "run.name=l", "run.save_weights=false", *TINY]
    assert main(argv) == 0
    assert (a / "l.fuyou-state").is_dir() and (b / "l.fuyou-state").is_dir()
    import shutil

    shutil.rmtree(tmp_path / "runs" / "l")
    err = _err(capsys, argv)
    assert "whose run directory is no longer there" in err and "--resume" not in err, err


def test_a_resume_given_its_own_start_goes_on_and_one_of_nothing_says_so(tmp_path, capsys):
    """A hostile pass: `--resume RUN --init-from` the run's own start was refused as a change ("cannot change
    that"); a --resume of a path that does not exist said it had no config.toml."""
    out = tmp_path / "runs"
    assert main(["train", "--out", str(out), "run.name=base", *TINY]) == 0
    argv = _offload(tmp_path, "b", "offload.keep_state=true", "--init-from", str(out / "base"))
    assert main(argv) == 0
    capsys.readouterr()
    # (as python -m fuyou.cli, the way fuyou launch starts its ranks: a review found the check defined after main ran)
    done = subprocess.run([sys.executable, "-m", "fuyou.cli", "train", "--resume", str(out / "b"), "--init-from",
                           str(out / "base"), "train.steps=3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "is where" in done.stderr, done.stderr
    err = _err(capsys, ["train", "--resume", str(out / "b"), "--init-from", str(out / "b"), "train.steps=4"])
    assert "cannot change that" in err, err
    assert f"{tmp_path / 'nope'} does not exist" in _err(capsys, ["train", "--resume", str(tmp_path / "nope")])
