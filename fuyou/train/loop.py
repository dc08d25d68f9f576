"""``run_training``: the loop shared by every trainer (in-memory now, the three-tier engine next).

A trainer provides ``train_step(step) -> StepStats``, ``evaluate() -> float | None`` and
``state() -> dict`` of fp32 weights; this function owns the run directory, logging, evaluation cadence
and saving.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fuyou.config import FuyouConfig
from fuyou.data import load_data
from fuyou.errors import ConfigError
from fuyou.models import StageModel
from fuyou.train.metrics import MetricsLog, Progress, si
from fuyou.train.reference import ReferenceTrainer
from fuyou.train.run import make_run_dir, save_weights


@dataclass
class RunResult:
    run_dir: Path
    first_eval: float | None
    last_eval: float | None
    last_loss: float
    tokens_per_s: float


def build_trainer(cfg: FuyouConfig):
    data = load_data(cfg.data)
    if cfg.offload.mode == "none":
        return ReferenceTrainer(cfg, data)
    raise ConfigError(
        "offload.mode='ssd' (the three-tier engine) is not available in this version yet; "
        "use offload.mode=none (in-memory training)"
    )


def run_training(cfg: FuyouConfig, stream=None) -> RunResult:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    trainer = build_trainer(cfg)
    run_dir = make_run_dir(cfg)
    log = MetricsLog(run_dir / "metrics.jsonl")
    model = StageModel(cfg.model)
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    t = cfg.train
    progress = Progress(t.steps, t.log_every, stream or sys.stderr)
    progress.message(
        f"fuyou: training {cfg.model.preset or cfg.model.family} ({si(model.num_params)} parameters) on "
        f"{trainer.device}, {cfg.data.source} data, {t.precision}, {t.steps} steps; run dir {run_dir}"
    )

    first_eval = last_eval = trainer.evaluate()
    if first_eval is not None:
        log.write({"step": 0, "eval_loss": first_eval})
        progress.message(f"eval loss at start: {first_eval:.4f}")
    start = time.perf_counter()
    tokens = 0
    stats = None
    for step in range(t.steps):
        t0 = time.perf_counter()
        stats = trainer.train_step(step)
        dt = time.perf_counter() - t0
        tokens += stats.tokens
        tps = stats.tokens / dt
        record = {
            "step": step + 1, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
            "step_time_s": dt, "tokens_per_s": tps, "tflops": tps * flops_per_token / 1e12,
        }
        if (step + 1) % t.log_every == 0 or step == 0 or step + 1 == t.steps:
            log.write(record)
        progress.update(step, {
            "loss": f"{stats.loss:.4f}", "tok/s": si(tps), "TFLOPS": f"{record['tflops']:.3g}", "lr": f"{stats.lr:.2e}",
        })
        if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 != t.steps:
            last_eval = trainer.evaluate()
            if last_eval is not None:
                log.write({"step": step + 1, "eval_loss": last_eval})
                progress.message(f"eval loss at step {step + 1}: {last_eval:.4f}")
    elapsed = time.perf_counter() - start
    last_eval = trainer.evaluate()
    if last_eval is not None:
        log.write({"step": t.steps, "eval_loss": last_eval})
    if cfg.run.save_weights:
        save_weights(run_dir, trainer.state(), cfg)
    log.close()
    mean_tps = tokens / elapsed
    summary = f"done: {t.steps} steps in {elapsed:.1f}s, {si(mean_tps)} tokens/s, {mean_tps * flops_per_token / 1e12:.3g} TFLOPS"
    if first_eval is not None:
        summary += f"; eval loss {first_eval:.4f} -> {last_eval:.4f}"
    progress.message(summary + f"\nrun directory: {run_dir}")
    return RunResult(run_dir, first_eval, last_eval, stats.loss, mean_tps)
