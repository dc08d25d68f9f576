"""Helpers for the engine tests: build a config, run N steps with a trainer, compare states."""

from __future__ import annotations

import torch

from fuyou.config import load_config
from fuyou.data import load_data
from fuyou.engine.engine import Engine
from fuyou.train.reference import ReferenceTrainer


def make_cfg(tmp_path, *overrides, dirs=1):
    ssd = []
    for i in range(dirs):
        d = tmp_path / f"ssd{i}"
        d.mkdir(exist_ok=True)
        ssd.append(str(d))
    base = ["model.preset=gpt-test", "data.seq_len=32", "train.micro_batch_size=2", "train.precision=fp32",
            "train.steps=3", "train.warmup_steps=1", "train.eval_batches=1", "train.grad_clip=none",
            f"run.out_dir={tmp_path / 'runs'}", "offload.cpu_mem=256MiB", "offload.optimizer_chunk=1"]
    return load_config(overrides=base + list(overrides), flags={"offload.ssd_dirs": ssd})


def run_both(cfg, steps=None):
    """Train the reference and the engine on the same data; return both (the engine still open)."""
    data = load_data(cfg.data)
    ref = ReferenceTrainer(cfg.model_copy(update={"offload": cfg.offload.model_copy(update={"mode": "none"})}), data)
    eng = Engine(cfg.model_copy(update={"offload": cfg.offload.model_copy(update={"mode": "ssd"})}), data, "state")
    ref_losses, eng_losses = [], []
    for step in range(steps or cfg.train.steps):
        ref_losses.append(ref.train_step(step))
        eng_losses.append(eng.train_step(step))
    return ref, eng, ref_losses, eng_losses


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        denom = a[k].abs().max().clamp_min(1e-12)
        worst = max(worst, float((a[k] - b[k]).abs().max() / denom))
    return worst


def assert_same_training(ref, eng, ref_stats, eng_stats) -> None:
    """The engine equals the reference bit for bit: losses, gradient norms, weights, Adam moments and
    the evaluation loss (fp32)."""
    assert [s.loss for s in eng_stats] == [s.loss for s in ref_stats]
    assert [s.grad_norm for s in eng_stats] == [s.grad_norm for s in ref_stats]
    ref_w, eng_w = ref.state(), eng.state()
    assert ref_w.keys() == eng_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], eng_w[k]), k
    ref_o, eng_o = ref.optimizer_state(), eng.optimizer_state()
    for k in ref_o:
        for which in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_o[k][which], eng_o[k][which]), (k, which)
    assert eng.evaluate() == ref.evaluate()
