"""The trained state is never deleted before the weights are durably saved (issue 14, item 1)."""

from __future__ import annotations

import errno

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
    assert _train(tmp_path, "r") == 2
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
