"""``run_training``: the loop shared by the in-memory reference trainer and the three-tier engine.

A trainer provides ``train_step(step) -> StepStats``, ``evaluate() -> float | None``,
``master_chunks()`` (its fp32 weights as a flat stream, for saving) and ``close()``; this function
owns the run directory, logging, evaluation cadence, tracing and saving.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fuyou.config import FuyouConfig
from fuyou.data import load_data
from fuyou.models import StageModel
from fuyou.train.metrics import MetricsLog, Progress, si
from fuyou.train.reference import ReferenceTrainer
from fuyou.train.run import make_run_dir, run_dir_path, save_weights
from fuyou.units import format_size


@dataclass
class RunResult:
    run_dir: Path
    first_eval: float | None
    last_eval: float | None
    last_loss: float
    tokens_per_s: float
    peak_rss: int = 0


def build_trainer(cfg: FuyouConfig, run_name: str):
    data = load_data(cfg.data)
    if cfg.offload.mode == "none":
        return ReferenceTrainer(cfg, data)
    from fuyou.engine.engine import Engine

    return Engine(cfg, data, store_name=f"{run_name}.fuyou-state")


def run_training(cfg: FuyouConfig, stream=None, trace: str | Path | None = None, plan_auto: bool = False) -> RunResult:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_path = run_dir_path(cfg)
    if plan_auto:
        from fuyou.planner.auto import plan_config

        cfg = plan_config(cfg, run_path, stream)
    trainer = build_trainer(cfg, run_path.name)  # refuses impossible configs before anything is written
    try:
        return _loop(cfg, trainer, make_run_dir(cfg, run_path), stream or sys.stderr, trace)
    finally:
        trainer.close()


def _loop(cfg: FuyouConfig, trainer, run_dir: Path, stream, trace) -> RunResult:
    from fuyou.engine.engine import resident_bytes

    log = MetricsLog(run_dir / "metrics.jsonl")
    model = StageModel(cfg.model)
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    t = cfg.train
    progress = Progress(t.steps, t.log_every, stream)
    mode = "in memory" if cfg.offload.mode == "none" else f"SSD offload ({', '.join(cfg.offload.ssd_dirs)})"
    progress.message(
        f"fuyou: training {cfg.model.preset or cfg.model.family} ({si(model.num_params)} parameters) on "
        f"{trainer.device}, {mode}, {cfg.data.source} data, {t.precision}, {t.steps} steps; run dir {run_dir}"
    )
    plan = getattr(trainer, "plan", None)
    if plan is not None:
        progress.message(plan.describe() + f"\nfixed overhead before the engine: {format_size(trainer.fixed_overhead)}")
        if trainer.deferred:
            progress.message("train.grad_clip is set: updates wait for the global gradient norm (no overlap with "
                             "backward, gradients make a round trip through the SSD); train.grad_clip=none overlaps them")

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
        counters = getattr(trainer, "counters", None)
        if counters is not None:
            record.update(counters.as_dict())
        if (step + 1) % t.log_every == 0 or step == 0 or step + 1 == t.steps:
            log.write(record)
        fields = {"loss": f"{stats.loss:.4f}", "tok/s": si(tps), "TFLOPS": f"{record['tflops']:.3g}",
                  "step": f"{dt:.2f}s"}
        if counters is not None:
            fields["compute"] = f"{counters.compute_s:.2f}s"
            fields["wait w/opt"] = f"{counters.wait_weights_s:.2f}/{counters.wait_optimizer_s:.2f}s"
            fields["ssd r/w"] = f"{format_size(counters.ssd_read_bytes)}/{format_size(counters.ssd_write_bytes)}"
        progress.update(step, fields)
        if trace is not None and step == getattr(trainer, "trace_step", -1):
            trainer.worker.wait_all()  # the step's optimizer tasks belong in its trace
            trainer.tracer.write(trace)
            trainer.tracer.enabled = False
            progress.message(f"wrote a trace of step {step + 1} to {trace} (open it in ui.perfetto.dev)")
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
        save_weights(run_dir, trainer, cfg)
    peak = resident_bytes("VmHWM")
    log.write({"summary": True, "steps": t.steps, "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed,
               "peak_rss_bytes": peak})
    log.close()
    mean_tps = tokens / elapsed
    summary = f"done: {t.steps} steps in {elapsed:.1f}s, {si(mean_tps)} tokens/s, {mean_tps * flops_per_token / 1e12:.3g} TFLOPS"
    if first_eval is not None:
        summary += f"; eval loss {first_eval:.4f} -> {last_eval:.4f}"
    summary += f"; peak resident memory {format_size(peak)}"
    progress.message(summary + f"\nrun directory: {run_dir}")
    return RunResult(run_dir, first_eval, last_eval, stats.loss, mean_tps, peak)
