"""``run_training``: the loop shared by the in-memory reference trainer and the three-tier engine.

A trainer provides ``train_step(step) -> StepStats``, ``evaluate() -> float | None``,
``master_chunks()`` (its fp32 weights as a flat stream, for saving) and ``close()``; this function
owns the run directory, logging, evaluation cadence, tracing and saving.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from fuyou.tomlfile import read_toml
from fuyou.config import FuyouConfig
from fuyou.engine.commit import state_name
from fuyou.models import StageModel
from fuyou.models import precision
from fuyou.train.metrics import MetricsLog, Progress, WandbLog, check_wandb, si, tensorboard_available
from fuyou.train.reference import ReferenceTrainer
from fuyou.engine.state import run_id, write_run_id
from fuyou.train.guards import (agree_on_sources, check_run_dir_space, claim_state, refuse_finished, refuse_live,
                                refuse_others_state, refuse_renamed, refuse_unlike_commit, committed_settings)
from fuyou.train.records import (data_files_change, data_fingerprint, load_training_data, record_chat_template,
                                 record_data, run_split, run_vocabulary, user_paths)
from fuyou.train.signals import StopOnSignal, stop_status
from fuyou.train.wear import endurance, step_wear, wear_parts
from fuyou.train.run import (SaveError, make_run_dir, next_free_name, record_resume, recorded_data, resume_changes,
                             run_dir_path, run_ended, save_snapshot, save_weights)
from fuyou.errors import ConfigError, FuyouError, NameTaken, NonFiniteError
from fuyou.trainer import EvaluationStopped, Trainer
from fuyou.units import format_decimal, format_size
from fuyou import distributed
from fuyou.faults import fault


@dataclass
class RunResult:
    run_dir: Path
    first_eval: float | None
    last_eval: float | None
    last_loss: float
    tokens_per_s: float
    peak_rss: int = 0
    stopped: bool = False
    exit_status: int = 0  # a run stopped by a signal: 128 + its number, as a shell reports it (not 0: a script's
    # `fuyou train ... && fuyou export ...` must not export a half-trained model)


def build_trainer(cfg: FuyouConfig, run_name: str, resume: bool = False, split: str = "content",
                  vocabulary: dict | None = None, loaded: dict | None = None) -> Trainer:
    """The trainer for ``cfg``: the in-memory reference, or the engine (with data parallelism, this rank's
    share of the machine's budgets and its own state: fuyou/distributed.py). ``split``: how fine-tuning
    examples are held out (``fuyou.data.tokenize_records``; a resume keeps its run's). ``vocabulary``:
    ``load_training_data``'s record of the data's vocabulary (a resume gives the run's). ``loaded``: the data
    a build before this one loaded, kept there (a build retried under another name loads it once)."""
    if cfg.train.epochs is not None and cfg.data.source == "synthetic":
        raise ConfigError("train.epochs needs real data (synthetic data has no epochs); give train.steps")
    init_values = None  # seeded random init
    if cfg.model.init_from:  # streamed from a Hugging Face or fuyou checkpoint, one stage at a time
        from fuyou.hf import open_checkpoint

        ckpt = open_checkpoint(cfg.model.init_from)
        ckpt.check(cfg.model)  # every tensor is the model's: none dropped in silence
        src = Path(cfg.model.init_from)
        if (src / "model.safetensors").is_file() and distributed.current().is_main:
            from fuyou.train.run import newer_commit, weights_step

            later = newer_commit(src, src / "model.safetensors")
            if later is not None:  # (a kept run resumed past its finish: its file is the finish's)
                step = weights_step(src / "model.safetensors")
                print(f"fuyou: note: --init-from {src} takes the weights it finished with"
                      f"{f' at step {step}' if step else ''}; it was resumed since and has committed step {later} "
                      f"(`fuyou export {src} --out DIR` exports that commit, for --init-from DIR)", file=sys.stderr)
        init_values = ckpt.init_values
    if cfg.offload.mode == "none":
        if resume:
            raise ConfigError("--resume continues an SSD-offloaded run (its state is committed on the SSD); "
                              "in-memory runs (offload.mode=none) keep no resumable state")
        return ReferenceTrainer(cfg, lambda: load_training_data(cfg, vocabulary=vocabulary), init_values)
    from fuyou.engine.engine import Engine

    dist = distributed.current()
    # The engine loads the data once its memory plan has passed: a budget that cannot fit is refused
    # before a large dataset is tokenized. (rank_config shares cfg.train, so the epochs' steps reach it.)
    def data():
        if loaded is None:
            return load_training_data(cfg, resume, split, vocabulary)
        if "data" not in loaded:
            loaded["data"] = load_training_data(cfg, resume, split, vocabulary)
        return loaded["data"]

    return Engine(dist.rank_config(cfg), data, store_name=dist.store_name(state_name(run_name)), resume=resume,
                  init_values=init_values)


def _note_budget_beyond_memory(cfg: FuyouConfig, stream, processes: int = 1) -> None:
    """A CPU budget beyond the machine's memory is kept by the engine, but the machine cannot give it: the
    kernel swaps or stops the run (a new-user pass gave --cpu-mem 1TiB on a 23 GiB machine, without a word).
    The process's fixed overhead (torch, CUDA's context) comes on top of the budget: --cpu-mem equal to the
    machine's memory was let through, with nothing left for the overhead or the system. ``processes``: this
    machine's ranks, each with its own overhead (``offload.cpu_mem`` is the machine's, shared among them). What
    is available now is measured with this process's overhead already loaded: the budget alone is compared."""
    from fuyou.planner.probe import cpu_memory
    from fuyou.planner.search import CPU_RESERVE
    from fuyou.train.reference import _available_memory, resolve_device

    total, free = cpu_memory(), _available_memory()
    budget = cfg.offload.cpu_mem  # (given: the default's 8 GiB on a smaller machine is no one's mistake)
    if cfg.offload.mode != "ssd" or "cpu_mem" not in cfg.offload.model_fields_set or total <= 0:
        return
    overhead = CPU_RESERVE["cuda" if resolve_device(cfg.train.device).type == "cuda" else "cpu"] * processes
    whose = "the process's" if processes == 1 else f"the {processes} processes'"
    need = f"offload.cpu_mem {format_size(budget)} and {whose} fixed overhead (~{format_size(overhead)})"
    if budget + overhead > total:
        print(f"fuyou: note: {need} are more than this machine's {format_size(total)} of memory: the run may use "
              f"more than the machine has (swapping, or stopped by the kernel); give at most what it can spare "
              f"(`fuyou plan --profile` gives a budget that leaves the overhead out)", file=stream)
    elif free and budget > free:
        print(f"fuyou: note: offload.cpu_mem {format_size(budget)} is more than the {format_size(free)} this machine "
              f"has available now (of {format_size(total)}; other processes hold the rest): the run may swap or be "
              f"stopped by the kernel once its state fills the budget", file=stream)


def _said(v) -> str:
    return "none" if v is None else str(v)


def _adopt_planned_settings(cfg: FuyouConfig, stream, main: bool) -> FuyouConfig:
    """A `fuyou plan --json` file as --act-policy: the prefetch depth and caps it was planned with, where
    the run does not set them (its memory holds at them; a pass found the file's depth ignored in silence).
    A setting given that differs is kept, with a note, as is a CPU budget other than the plan's."""
    from fuyou.policy import planned_settings, planned_workload

    planned = planned_settings(cfg.offload.act_policy) if cfg.offload.mode == "ssd" else {}
    budget = planned.pop("cpu_mem", None)
    where = cfg.offload.act_policy
    if cfg.offload.mode == "ssd" and main:  # the workload it was planned for (a pass trained another in silence)
        was = planned_workload(where)
        differ = [f"{name} {_said(was[k])} (this run: {_said(now)})" for k, name, now in (
            ("batch", "micro-batch", cfg.train.micro_batch_size), ("seq", "sequence", cfg.data.seq_len),
            ("grad_accum", "grad_accum", cfg.train.grad_accum), ("lora", "LoRA", cfg.lora.enabled),
            ("gpus", "processes on a machine (--gpus)", distributed.current().local_world),  # (its caps are shared
            # among them: the planner models one machine)
            ("grad_clip", "train.grad_clip", cfg.train.grad_clip))  # (exact clipping's writes and waits)
            if k in was and was[k] != now]
        shape = was.get("model_shape")  # (a report from before it recorded the shape: not compared)
        if isinstance(shape, dict):
            differ += [f"model.{k} {v} (this run: {getattr(cfg.model, k, None)})" for k, v in shape.items()
                       if v != getattr(cfg.model, k, None)]
        state = was.get("optim")
        if isinstance(state, dict) and not cfg.lora.enabled and not was.get("lora"):
            differ += [f"optim.{k}={state.get(k)} (this run: {getattr(cfg.optim, k)})" for k in ("master", "moments")
                       if state.get(k) != getattr(cfg.optim, k)]
        if differ:
            print(f"note: the plan in {where} was made for another run: {'; '.join(differ)}; its policy and caps "
                  f"are that run's memory (plan again with this run's settings)", file=stream)
    if not planned:
        return cfg
    try:  # (the file may have been edited: its values as the run's own would be read)
        as_planned = type(cfg.offload).model_validate({**cfg.offload.model_dump(exclude_unset=True), **planned})
    except ValidationError as e:
        raise ConfigError(f"the plan in {where} holds settings this run refuses: {e.errors()[0]['msg']}") from None
    planned = {k: getattr(as_planned, k) for k in planned}
    take = {k: v for k, v in planned.items() if k not in cfg.offload.model_fields_set}

    def shown(k, v):
        return v if k == "prefetch_depth" or v is None else format_size(v)

    differ = [f"offload.{k}={shown(k, getattr(cfg.offload, k))} (planned {shown(k, v)})" for k, v in planned.items()
              if k not in take and getattr(cfg.offload, k) != v]
    if main and take:
        print(f"note: {', '.join(f'offload.{k}={shown(k, v)}' for k, v in take.items())} from the plan in {where}",
              file=stream)
    if main and differ:
        print(f"note: this run gives {', '.join(differ)}: it may need other memory than the plan in {where}",
              file=stream)
    if main and isinstance(budget, int) and budget != cfg.offload.cpu_mem:
        print(f"note: the plan in {where} was made for --cpu-mem {format_size(budget)}; this run gives "
              f"{format_size(cfg.offload.cpu_mem)}: its caps and policy are that budget's (plan again with this one)",
              file=stream)
    if not take:
        return cfg
    return cfg.model_copy(update={"offload": type(cfg.offload).model_validate(
        {**cfg.offload.model_dump(exclude_unset=True), **take})})


_OFFLOAD_FLAGS = {"cpu_mem": "--cpu-mem", "gpu_mem": "--gpu-mem", "act_policy": "--act-policy", "ssd_dirs": "--ssd"}


def _offload_ignored_in_memory(cfg) -> list[str]:
    """The offload settings given a value other than their default, which an in-memory run does not use
    (a new-user pass: --gpu-mem and --act-policy were ignored in silence; a config file's offload.ssd_dirs
    without offload.mode=ssd trained in memory without a word; the --ssd flag is refused in cli.py)."""
    if cfg.offload.mode != "none":
        return []
    from fuyou.policy import stage_input_dtypes

    # checkpoint dtypes other than fp32 apply in memory too: the reference rounds block inputs as the engine would
    # (a pass was told they were ignored, and trained other weights)
    rounded = stage_input_dtypes(cfg)
    used = {"checkpoint_dtype"} if rounded else set()
    # the policy's tiers are not: it is used only where it changes what is rounded (it was validated, then
    # ignored without a note whenever anything was rounded: a pass)
    plain = cfg.model_copy(update={"offload": cfg.offload.model_copy(update={"act_policy": "recompute"})})
    if rounded != stage_input_dtypes(plain):
        used.add("act_policy")
    fields = type(cfg.offload).model_fields
    return [f"offload.{k}" + (f" ({_OFFLOAD_FLAGS[k]})" if k in _OFFLOAD_FLAGS else "")
            for k in fields if k != "mode" and k not in used and getattr(cfg.offload, k) != fields[k].get_default(
                call_default_factory=True)]


# full fine-tuning's optimizer settings: with LoRA the base has no optimizer state and the adapters' AdamW runs on
# the compute device after backward, so none of them applies
FULL_OPTIMIZER_SETTINGS = ("resident_mem", "resident_spare", "optimizer_chunk", "optimizer_depth", "optimizer_threads",
                           "max_pending_updates", "clip_schedule", "handoff_weights")


def _offload_ignored_by_lora(cfg) -> list[str]:
    """``FULL_OPTIMIZER_SETTINGS`` given a value other than their default in a LoRA run (a new-user pass: they were
    taken in silence, where optim.master and optim.moments are refused)."""
    if not cfg.lora.enabled or cfg.offload.mode != "ssd":
        return []
    fields = type(cfg.offload).model_fields
    return [f"offload.{k}" for k in FULL_OPTIMIZER_SETTINGS if getattr(cfg.offload, k) != fields[k].default]


STOP_WRITE_RATE = 1e9  # bytes/s a stop's commit is assumed to write at (a consumer NVMe drive, with its fsyncs)


def _torchrun_shutdown_timeout() -> float:
    """torchrun's --shutdown-timeout: from its command line (the workers' parent, torch's elastic agent), else
    PET_SHUTDOWN_TIMEOUT (torchrun's flags' environment form), else TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else its
    default 30 s."""
    try:
        args = [a.decode(errors="replace") for a in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        args = []
    try:
        for i, a in enumerate(args):
            for flag in ("--shutdown-timeout", "--shutdown_timeout"):
                if a == flag and i + 1 < len(args):
                    return float(args[i + 1])
                if a.startswith(flag + "="):
                    return float(a.partition("=")[2])
        return float(os.environ.get("PET_SHUTDOWN_TIMEOUT") or os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
    except ValueError:
        return 30.0


def _note_torchrun_shutdown(trainer, dist: distributed.Dist, stream) -> None:
    """torchrun passes a stop (Ctrl-C, SIGTERM) on to its workers and kills them 30 s later
    (``--shutdown-timeout``, or TORCH_ELASTIC_SHUTDOWN_TIMEOUT): a stop's commit writing the optimizer state held
    in CPU memory may need longer, and a worker killed mid-commit leaves the previous commit (steps lost,
    nothing damaged). Said once, by rank 0, when the commit would need more than the timeout at
    ``STOP_WRITE_RATE``."""
    plan = getattr(trainer, "plan", None)
    if not dist.enabled or not dist.is_main or "TORCHELASTIC_RUN_ID" not in os.environ or plan is None:
        return
    timeout = _torchrun_shutdown_timeout()
    need = plan.resident_bytes / STOP_WRITE_RATE
    if need > timeout:
        print(f"fuyou: note: a stop (Ctrl-C, SIGTERM) commits the {format_size(plan.resident_bytes)} of optimizer "
              f"state this rank holds in CPU memory (~{need:.0f} s at 1 GB/s), and torchrun kills its workers "
              f"{timeout:g} s after passing a stop on: launch it (torchrun or fuyou launch) with --shutdown-timeout "
              f"{max(60, int(2 * need))} (else a stop keeps the previous commit), or cap offload.resident_mem",
              file=stream)


def run_training(cfg: FuyouConfig, stream=None, trace: str | Path | None = None, plan_auto: bool = False,
                 resume: Path | None = None) -> RunResult:
    """Train ``cfg`` in a new run directory, or continue the run in ``resume`` from its last commit."""
    saved_raw = read_toml(Path(resume) / "config.toml") if resume is not None else {}  # the run's config as written

    def saved_section(name: str) -> dict:
        return saved_raw.get(name) if isinstance(saved_raw.get(name), dict) else {}

    run_precision = _run_precision(Path(resume), cfg, saved_section) if resume is not None else None
    if run_precision is not None and cfg.train.precision_chosen:  # auto given to a resume: the run's own precision
        # (it was refused as a change to this machine's choice: a pass)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": run_precision})})
    _check_settings(cfg, resume is None, saved_section("hardware"))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    resumed_run = None
    if resume is not None:  # its id (a run from before ids: its directory's name)
        rid = run_id(Path(resume))
        resumed_run = f"run id {rid}" if rid else f"{Path(resume).name} (a run without an id)"
    if resume is not None and cfg.offload.mode == "ssd":
        refuse_live(Path(resume), cfg)
    dist = distributed.init(cfg, Path(resume) if resume is not None else None, resumed_run)  # torchrun: join the ranks
    if dist.enabled and plan_auto:
        raise ConfigError(f"--plan auto measures this machine for one process; with torchrun, plan the ranks "
                          f"(`fuyou plan --gpus {dist.local_world} ... --json > plan.json`, --profile from `fuyou "
                          f"probe` for this machine's figures) and give the plan: --act-policy plan.json")
    if resume is not None:  # (its world size checked by distributed.init)
        run_path = Path(resume)
    else:  # rank 0 names the run (the name may hold the time): one run directory for every rank
        named = None
        if dist.is_main:
            try:
                named = str(run_dir_path(cfg))
            except FuyouError as e:  # every rank stops with it (``Dist.broadcast``), none waits on a dead peer
                named = e
        run_path = Path(dist.broadcast(named, "naming the run directory", started=False))
    if resume is not None:  # a commit to resume from (a new run: once it has committed, ``_loop``)
        dist.run_dir = run_path
    # the run's id (fuyou-run.json), which its SSD state's owner file records (``claim_state``): rank 0's, given
    # before the state is claimed; a run from before ids gets one now
    recorded = run_id(run_path) if resume is not None else None
    rid = recorded
    if rid is None:
        import uuid

        rid = dist.broadcast(uuid.uuid4().hex if dist.is_main else None, "giving the run its id",
                             started=resume is not None)
    if not dist.is_main:  # progress, metrics and files are rank 0's; errors are every rank's own
        stream = open(os.devnull, "w")
    if plan_auto:
        from fuyou.planner.auto import plan_config

        cfg = plan_config(cfg, run_path, stream)
    elif resume is None:
        cfg = _adopt_planned_settings(cfg, stream or sys.stderr, dist.is_main)
    if resume is not None:
        _refuse_unresumable(run_path, cfg, saved_section("offload"), saved_section("lora"))
    changed, dirs = (_resume_changes(run_path, cfg, saved_section, run_precision) if resume is not None
                     else (None, None))
    if resume is not None:
        refuse_finished(run_path, cfg, dist)
        refuse_renamed(run_path, cfg)
        refuse_others_state(cfg, run_path, recorded)
        refuse_unlike_commit(cfg, run_path)
    if dist.is_main:
        _note_budget_beyond_memory(cfg, stream or sys.stderr, dist.local_world)
    space = None
    if dist.is_main:  # (rank 0 saves; its refusal reaches every rank, none waits on it: ``Dist.broadcast``)
        try:
            check_run_dir_space(cfg, run_path)
        except FuyouError as e:
            space = e
    dist.broadcast(space, "checking the run directory's disk", started=False)
    # refuses impossible configs (and unresumable states) before anything is written
    split = "content"
    if resume is not None:  # (every rank reads the run directory, as its id above; rank 0's decides)
        split = dist.broadcast(run_split(run_path) if dist.is_main else None, "agreeing on the held-out examples")
    if resume is None:
        agree_on_sources(cfg, dist)
    # a name drawn from the time, one process (--plan auto wrote its plan into the drawn directory already)
    drawn = resume is None and cfg.run.name is None and not dist.enabled and not plan_auto
    claimed = None  # the empty state directory that claims a name taken after another's (``next_free_name``)
    vocabulary = run_vocabulary(run_path) if resume is not None else {}  # (filled in as the data loads)
    loaded: dict = {}  # (the data, loaded once: a build retried under the next name takes it up)
    while True:
        try:
            trainer = build_trainer(cfg, run_path.name, resume=resume is not None, split=split, vocabulary=vocabulary,
                                    loaded=loaded)
            loaded.clear()  # (the trainer holds what it uses of it)
            break
        except BaseException as e:
            if claimed is not None:  # (removed only while empty: the run stopped before its state was made there)
                with contextlib.suppress(OSError):
                    claimed.rmdir()
            if not (drawn and isinstance(e, NameTaken)):  # another run started in the same second drew the name (a
                raise  # job array's runs refused each other: a pass): the next free one (torchrun: ranks stop)
            run_path, claimed = _next_name(cfg, run_path, stream or sys.stderr)
    if resume is not None and dist.is_main and recorded is None:
        write_run_id(run_path, rid)
    claim_state(trainer, run_path, rid)
    if resume is not None:
        _take_up_resume(run_path, cfg, trainer, dist, changed, dirs, split, vocabulary, stream or sys.stderr)
    if dist.is_main:
        _notes_on_the_settings(cfg, resume is None, stream or sys.stderr)
    _note_torchrun_shutdown(trainer, dist, stream or sys.stderr)
    stop = StopOnSignal()
    stop.commits = cfg.offload.mode == "ssd" and cfg.offload.commit != "none"  # (in memory it said "commit intact")
    try:
        if resume is not None:
            run_dir = run_path
        else:
            run_dir = _make_run_dir_everywhere(cfg, run_path, rid, trainer, vocabulary, dist)
        if resume is not None and dist.is_main:  # (after every refusal: a refused resume deleted them: a review)
            from fuyou.train.run import prune_abandoned

            pruned = prune_abandoned(run_path, cfg.train.keep_snapshots)
            if pruned:
                print(f"fuyou: note: deleted the set-aside snapshot(s) {', '.join(p.name for p in pruned)}: the "
                      f"newest train.keep_snapshots={cfg.train.keep_snapshots} set aside are kept (raise it to keep "
                      f"more; a LoRA run over one needs it for export --merge)", file=stream or sys.stderr)
        result = _loop(cfg, trainer, run_dir, stream or sys.stderr, trace, stop, dist)
    except BaseException as e:
        # Whatever failed (a step, an evaluation, the save), closing must not wait on or write to a
        # state that may be mid-update: the last commit is the state of record.
        trainer.failed = True
        advice = _resume_advice(e, trainer, run_path)
        if advice:
            raise FuyouError(f"{e}. {advice}") from e
        raise
    finally:
        stop.restore()
        trainer.close()
    dist.close()
    return result


def _check_settings(cfg: FuyouConfig, new_run: bool, saved_hardware: dict) -> None:
    """What a run is refused for before the ranks join: a logger that is not installed, an unknown hardware
    preset (``saved_hardware``: a resumed run's own config.toml names it), a kept state nothing could use."""
    if cfg.run.tensorboard and not tensorboard_available():
        raise ConfigError("run.tensorboard=true needs the tensorboard package: pip install 'fuyou[tensorboard]'")
    check_wandb(cfg.run.wandb)  # (rank 0, which logs; a refusal there ends the others: torchrun stops the group)
    from fuyou.planner.hardware import check_names

    try:
        check_names(cfg.hardware)  # (the summary's wear and --plan auto read them)
    except ConfigError as e:
        if all(saved_hardware.get(k) != getattr(cfg.hardware, k) for k in ("gpu", "ssd", "pcie")
               if getattr(cfg.hardware, k) is not None):
            raise  # (a name this resume gave)
        # (a preset a later fuyou renamed or dropped: the run's own config.toml names it, and the resume can replace it)
        raise ConfigError(f"{e} (the run's config.toml names it: resume with hardware.gpu=, hardware.ssd= or "
                          f"hardware.pcie= set to a known one, or to none)") from None
    off = cfg.offload
    if off.keep_state and off.commit == "none" and off.mode == "ssd" and new_run:
        # (49 MB kept that --resume then refused: a pass; a new run only, a resume of one says what it can do)
        raise ConfigError("offload.keep_state=true keeps the SSD state for a resume or an export, and "
                          "offload.commit=none writes no commit for either: the state kept could not be used; "
                          "give one of them")


def _refuse_unresumable(run_path: Path, cfg: FuyouConfig, saved_off: dict, saved_lora: dict) -> None:
    """A resume of a run that keeps no resumable state (in memory, or offload.commit=none) is told what it
    kept to start a new run from. ``saved_off``, ``saved_lora``: the run's own settings (an override of them
    is a change a resume refuses, not a run without state: the review)."""
    if saved_off.get("mode", cfg.offload.mode) == "ssd" and saved_off.get("commit", cfg.offload.commit) != "none":
        return
    from fuyou.snapshots import snapshot_dirs

    lora = int(saved_lora.get("rank", cfg.lora.rank) or 0) > 0  # (a LoRA run saves adapters)
    saved = "adapter.safetensors" if lora else "model.safetensors"
    kept = [*snapshot_dirs(run_path / "snapshots"), *([run_path] if (run_path / saved).is_file() else [])]
    why = ("an in-memory run, offload.mode=none, commits no state to resume from"
           if saved_off.get("mode", cfg.offload.mode) != "ssd" else "offload.commit=none commits nothing")
    # (a LoRA run's advice named --init-from its adapters, which that refuses: a pass)
    how = (f"export its last saved adapters (`fuyou export {kept[-1]} --out DIR`) and start a run over the same "
           f"base with lora.init_from=DIR" if lora else f"start a new run from its last saved weights, "
                                                        f"--init-from {kept[-1]}") if kept else None
    raise ConfigError(f"{run_path} keeps no resumable state ({why}): "
                      + (how or f"it saved no {'adapters' if lora else 'weights'} to start a new run from either "
                                f"(train.save_every keeps snapshots)")
                      + "; nothing was changed")  # (it said "never committed ... or moved (resume with --ssd)")


def _run_precision(run_path: Path, cfg: FuyouConfig, saved_section) -> str | None:
    """The precision a run trained in: its config.toml's, or where that was edited to auto, the one its last
    commit was made in (offloaded runs; this machine's auto may choose another); None where neither says."""
    saved = saved_section("train").get("precision")
    if saved not in ("bf16", "fp32") and cfg.offload.mode == "ssd":
        saved = (committed_settings(cfg, run_path) or {}).get("train.precision")
    return saved if saved in ("bf16", "fp32") else None


def _resume_changes(run_path: Path, cfg: FuyouConfig, saved_section, run_precision: str | None
                    ) -> tuple[dict, dict]:
    """What a resume changes of the run's saved config (``resume_changes``), refusing what it cannot change,
    before the state is opened; and the resume's SSD directories and data files by key (the saved ones may
    have moved). ``saved_section``: a section of the run's config.toml as written; ``run_precision``: the
    precision the run trained in (``_run_precision``)."""
    from fuyou.config import load_config

    # the saved config as it was, but over this resume's SSD directories and data files (the saved
    # ones may have moved: validating them would refuse the resume that names their new place)
    dirs = {"offload.ssd_dirs": list(cfg.offload.ssd_dirs), "data.path": list(cfg.data.path),
            "data.eval_path": list(cfg.data.eval_path)}
    # (model.init_from is not compared, and the checkpoint it names may be gone: the shape is in the file)
    flags = {**dirs, "model.init_from": None}
    if saved_section("train").get("precision") == "auto" and run_precision is not None:  # (edited to auto: this
        flags["train.precision"] = run_precision  # machine's choice is not the run's)
    try:
        saved_cfg = load_config(run_path / "config.toml", flags=flags)
    except ConfigError as e:  # (one an earlier fuyou took, such as commit_every='0s': the override did not mend it)
        raise ConfigError(f"{run_path / 'config.toml'}, the run's config as it was, is not valid now: {e}. Edit "
                          f"those values there (to the run's own, where a resume cannot change them) and resume"
                          ) from None
    changed = resume_changes(saved_cfg, cfg)
    for key in dirs:
        section, field = key.split(".")
        saved_paths = saved_section(section).get(field)
        if saved_paths is not None and user_paths(saved_paths) != user_paths(dirs[key]):
            changed[key] = ([saved_paths] if isinstance(saved_paths, str) else list(saved_paths), dirs[key])
            if key == "data.eval_path" and bool(saved_paths) != bool(dirs[key]) and cfg.data.val_fraction and \
                    cfg.data.source != "synthetic":  # (a pass: the held-out examples were trained on)
                swap = "held out would be trained on" if dirs[key] else "trained on would be held out"
                raise ConfigError(f"a resumed run cannot {'add' if dirs[key] else 'drop'} data.eval_path: "
                                  f"without it data.val_fraction holds examples of the data out, so the "
                                  f"run's training examples and held-out set would change (examples {swap}). "
                                  f"Resume as the run started, or start a new run from its weights")
    return changed, dirs


def _take_up_resume(run_path: Path, cfg: FuyouConfig, trainer: Trainer, dist: distributed.Dist, changed: dict,
                    dirs: dict, split: str, vocabulary: dict, out) -> None:
    """A resume's state is open: the snapshots of the steps it redoes are set aside, a train.steps below the
    steps done is refused, and what changed (``_resume_changes``, and the data under the run) is recorded
    (resumes.jsonl) and said, with what it does to the schedule and the place in the data."""
    if dist.is_main:
        from fuyou.train.run import set_aside_later_snapshots

        moved, dropped = set_aside_later_snapshots(run_path, trainer.start_step)
        if moved or dropped:
            print(f"fuyou: note: {len(moved) + len(dropped)} snapshot(s) after step {trainer.start_step}, the commit "
                  f"this resume starts from, belong to the steps it redoes: "
                  + "; ".join(([f"renamed {', '.join(p.name for p in moved)}"] if moved else [])
                              + ([f"deleted {', '.join(p.name for p in dropped)} (the same as the abandoned "
                                  f"snapshot of its step kept already)"] if dropped else [])),
                  file=sys.stderr)
    # the data as the run recorded it, and now (with train.epochs: after the loader)
    data_then = recorded_data(run_path)
    data_now = data_fingerprint(cfg, like=data_then)
    data_moved = data_then is not None and data_then["files"] != data_now["files"]
    if trainer.start_step > cfg.train.steps:
        # Finishing would save the weights of the committed step and delete the resumable state: a
        # train.steps below the steps done is a mistake to refuse, not a request to end the run
        trainer.failed = True  # nothing is written on closing
        trainer.close()
        if cfg.train.epochs is not None:
            raise ConfigError(f"{run_path} has committed {trainer.start_step} steps and this resume's train.epochs="
                              f"{cfg.train.epochs} makes {cfg.train.steps} of its data"
                              f"{' (the data changed since the run started)' if data_moved else ''}: "
                              f"give more train.epochs, or train.epochs=none with train.steps of at least "
                              f"{trainer.start_step}, or `fuyou export {run_path}` for the committed weights; nothing "
                              f"was changed")
        raise ConfigError(f"{run_path} has committed {trainer.start_step} steps and this resume sets train.steps="
                          f"{cfg.train.steps}: give train.steps of at least {trainer.start_step} (equal to end the "
                          f"run there and save its weights), or `fuyou export {run_path}` for the committed weights; "
                          f"nothing was changed")
    # data that changed under the run: its batches, epochs and held-out set follow it
    if data_moved:
        changed["data files (size, modified)"] = (data_then["files"], data_now["files"])
    made = data_then.get("steps") if isinstance(data_then, dict) else None  # the steps the run's epochs made
    if cfg.train.epochs is not None and made not in (None, cfg.train.steps):
        changed["train.steps (from train.epochs)"] = (made, cfg.train.steps)
    if "train.steps" in changed and made:  # (the epochs' steps, not the unused train.steps: "240 -> 30")
        changed["train.steps"] = (made, changed["train.steps"][1])
    if cfg.train.epochs is not None and "train.steps" in changed:  # steps made epochs: its steps are the epochs'
        then = changed.pop("train.steps")[0]  # (it said "100 -> 240", the default, for 57 steps: a pass)
        if then != cfg.train.steps:
            changed.setdefault("train.steps (from train.epochs)", (then, cfg.train.steps))
    if dist.is_main:
        then_data = changed.get("data.path", [cfg.data.path])[0] or []
        then_eval = changed.get("data.eval_path", [cfg.data.eval_path])[0] or []
        # "old -> new" by position within each list of the same length (else an eval file showed as renamed)
        then_paths = ([*then_data, *then_eval] if len(then_data) == len(cfg.data.path) and
                      len(then_eval) == len(cfg.data.eval_path) else None)
        before = record_resume(run_path, cfg, trainer.start_step, changed)
        record_data(run_path, cfg, data_now, split, vocabulary)
        if changed:
            print("resumed with changes (recorded in resumes.jsonl; config.toml is now the effective config): "
                  + ", ".join(data_files_change(cfg, a, b, split, then_paths)
                              if k == "data files (size, modified)" else f"{k} {a!r} -> {b!r}"
                              for k, (a, b) in changed.items()), file=out)
            from fuyou.config import load_config

            schedule_note = _schedule_change(load_config(before, ["model.init_from=none"], dirs), cfg,
                                             trainer.start_step, changed, made)
            if schedule_note:
                print(schedule_note, file=out)
            if data_moved and trainer.start_step:  # (the epoch field went back, unexplained: a pass)
                from fuyou.data.examples import ExampleSampler

                seen = _seen(trainer, cfg, trainer.start_step).get("epoch")
                order = ("the examples' order is drawn over the changed data, so in the pass under way some are read "
                         "once more or once less than the others" if isinstance(trainer.batches, ExampleSampler) else
                         "its windows are drawn at random over the changed data")
                print(f"note: the run's place in its data is a count of batches ({trainer.start_step} steps'): it "
                      f"goes on at that count in the changed data"
                      + (f", epoch {seen:.3g} of it (metrics.jsonl's epoch counts the changed data from here on); "
                         f"{order}" if seen is not None else ""), file=out)


def _notes_on_the_settings(cfg: FuyouConfig, new_run: bool, out) -> None:
    """Notes on settings that do something other than a user may think (rank 0; most for a new run only)."""
    if cfg.data.seq_len > cfg.model.max_seq_len and cfg.model.family == "llama" and new_run:
        print(f"note: data.seq_len={cfg.data.seq_len} is beyond the model's {cfg.model.max_seq_len} positions "
              f"(model.max_seq_len): RoPE extends past them, but a pretrained model was not trained there",
              file=out)
    from fuyou.hf.config_map import unexportable

    if unexportable(cfg.model) and new_run:
        print(f"note: {unexportable(cfg.model)}: this model trains, but `fuyou export` cannot write it for "
              f"transformers", file=out)
    ignored = _offload_ignored_in_memory(cfg)
    if ignored:
        one = len(ignored) == 1
        print(f"note: {', '.join(ignored)} {'applies' if one else 'apply'} to SSD offload (--offload ssd) and "
              f"{'is' if one else 'are'} ignored in memory (offload.mode=none): the whole training state is held, "
              f"and a model that does not fit the machine is refused", file=out)
    ignored = _offload_ignored_by_lora(cfg)
    if ignored and new_run:
        one = len(ignored) == 1
        print(f"note: {', '.join(ignored)} {'sets' if one else 'set'} full fine-tuning's CPU optimizer and "
              f"{'is' if one else 'are'} not used with LoRA (lora.rank={cfg.lora.rank}): the base has no optimizer "
              f"state, and the adapters' AdamW runs on the compute device after backward", file=out)
    if cfg.lora.enabled and not cfg.model.init_from and new_run:
        print(f"note: LoRA over a base drawn at random (train.seed={cfg.train.seed}; no --init-from): the adapters "
              f"learn to correct noise, which suits a test, not a fine-tune; give --init-from HF_DIR for a "
              f"pretrained base", file=out)
    if cfg.optim.master == "bf16" and cfg.train.precision == "fp32" and cfg.offload.mode == "ssd" and new_run:
        # (auto's fp32 was told as the user's, with advice of bf16 where it runs tens of times slower: a pass)
        chosen = " (train.precision=auto's choice here)" if cfg.train.precision_chosen else ""
        slow = not precision.bf16_native(precision.compute_device_type(cfg.train.device))
        print(f"note: optim.master=bf16 with fp32 compute{chosen}: every update rounds the weights to bf16, but they "
              "are computed in fp32 from a separate fp32 copy (4 B a parameter more to store and stream); with "
              "train.precision=bf16 the bf16 master is the compute weights"
              + (", but this device computes bf16 tens of times slower" if slow else ""), file=out)
    if cfg.offload.checkpoint_dtype == "compute" and cfg.train.precision == "fp32" and cfg.offload.mode == "ssd" \
            and new_run:
        # (auto's fp32 made it store fp32 checkpoints, the README's "half the bytes" unsaid: a pass)
        print("note: offload.checkpoint_dtype=compute stores the block inputs in the compute dtype, fp32 here"
              + (" (train.precision=auto's choice)" if cfg.train.precision_chosen else "")
              + ": no bytes saved; `--act-policy checkpoint_dtype=bf16` rounds them to bf16 (half the bytes)",
              file=out)
    t = cfg.train
    _note_cpu_bf16(t, new_run, out)
    if cfg.offload.mode == "none" and not cfg.run.save_weights and new_run:
        # (the weights were dropped without a word, and export then said to export a finished run: a pass)
        print("note: run.save_weights=false in memory: the final weights are kept nowhere (no SSD state either)"
              + ("; only the snapshots of train.save_every before the last step are" if t.save_every else "")
              + "; leave run.save_weights on to keep them", file=out)
    if new_run and t.lr_schedule != "constant" and t.warmup >= t.steps > 1:
        # (a 10-step run warmed up to its last step at the peak, cosine and min_lr_ratio unused, unsaid: a pass)
        given = "train.warmup_ratio" if t.warmup_ratio is not None else "train.warmup_steps"
        print(f"note: the warm-up ({t.warmup} steps, {given}) covers all {t.steps} steps: the learning rate rises "
              f"to optim.lr and never decays (train.lr_schedule={t.lr_schedule} does not apply); give fewer warm-up "
              f"steps for a schedule", file=out)


def _note_cpu_bf16(t, new_run: bool, out) -> None:
    """On a CPU without native bf16 (``bf16_native``), what train.precision does there: auto computes in fp32,
    bf16 crawls (the default run took 14.6 s a step in bf16 on an AVX2 host, 0.37 s in fp32)."""
    if precision.compute_device_type(t.device) != "cpu" or precision.bf16_native("cpu"):
        return
    cap = torch.backends.cpu.get_cpu_capability()
    if t.precision == "fp32" and t.precision_chosen and new_run:
        print(f"note: train.precision=auto computes in fp32 here: this CPU ({cap}) has no native bf16 matmul "
              f"(torch's fast path needs AVX-512 or AMX); train.precision=bf16 forces bf16", file=out)
    elif t.precision == "bf16":
        print(f"warning: train.precision=bf16 on a CPU without native bf16 matmul ({cap}; torch's fast path needs "
              f"AVX-512 or AMX): each step runs tens of times slower than in fp32 here; "
              + ("train.precision=fp32 (or auto, which chooses it here) computes in fp32" if new_run else
                 "a resumed run keeps the precision it started in (its stored compute weights are in it)"),
              file=out)


def _make_run_dir_everywhere(cfg: FuyouConfig, run_path: Path, rid: str, trainer: Trainer, vocabulary: dict,
                             dist: distributed.Dist) -> Path:
    """A new run's directory: rank 0 makes it and writes every record a resume reads, then tells the others
    (a refusal, such as a name another process took meanwhile, reaches every rank). Once step 0 has committed,
    a peer lost from here on leaves a run to resume (``dist.run_dir``)."""
    made: Path | ConfigError = run_path
    committed = getattr(trainer, "last_commit_step", None) is not None  # step 0's, on every rank
    if dist.is_main:
        existed = run_path.exists()  # (--plan auto's, with its profile and policy)
        making = [run_path]  # the directory being made (in memory, another name if this one was taken meanwhile)
        try:  # the directory and every record a resume reads, before the others hear of it
            made = _make_dir(cfg, making, rid, dist)
            _record_run(made, cfg, vocabulary, dist)
            fault("run_dir")  # tests: rank 0 killed once its run directory is whole, before it says so
        except ConfigError as e:
            made = e
        except (FuyouError, OSError) as e:  # (a full disk: the others waited out the collective's timeout)
            made = ConfigError(f"making the run directory {making[0]} failed: "
                               f"{(e.strerror or e) if isinstance(e, OSError) else e}")
            if making[0] != run_path or not existed:  # half made, it named a resume of the state this refusal
                shutil.rmtree(making[0], ignore_errors=True)  # removes (a review); never another run's (a review)
        if committed and not isinstance(made, ConfigError):  # a peer lost from here on leaves a run to
            dist.run_dir = made  # resume (Dist._collective's advice): rank 0 said "nothing was started"
            # when a peer killed writing its step-0 record was gone before this broadcast (a racy test)
    try:  # every rank learns of it: under torchrun the others' states were left behind (a pass)
        run_dir = Path(dist.broadcast(made if isinstance(made, ConfigError) else str(made),
                                      "making the run directory", started=dist.run_dir is not None))
    except ConfigError:  # another process took the name meanwhile: the state made for it is no run's (it
        trainer.abandoned = True  # was left committed, and later named as "another run's": a pass)
        raise
    except distributed.DistributedError as e:
        if dist.is_main or not committed:
            raise
        raise distributed.DistributedError(_rank_0_lost(e, run_path, dist, cfg.run.name is not None,
                                                        trainer.state_location())) from e
    if committed:
        dist.run_dir = run_dir
    return run_dir


def _make_dir(cfg: FuyouConfig, making: list[Path], rid: str, dist: distributed.Dist) -> Path:
    """``make_run_dir`` of ``making[0]``; one process in memory whose name drawn from the time another run took
    meanwhile takes the next free one, in ``making[0]`` (an SSD run's state is named after its run: it stops,
    ``NameTaken``)."""
    while True:
        try:
            return make_run_dir(cfg, making[0], rid)
        except NameTaken:
            if cfg.offload.mode == "ssd" or dist.enabled:
                raise
            making[0], _ = _next_name(cfg, making[0], sys.stderr)


def _next_name(cfg: FuyouConfig, taken: Path, out) -> tuple[Path, Path | None]:
    """``next_free_name`` after ``taken``, a name drawn from the time that another run took, said to ``out``."""
    path, claim = next_free_name(cfg, taken)
    print(f"fuyou: note: the name {taken.name}, drawn from the time, is another run's, started in the same second: "
          f"this run is {path.name}", file=out)
    return path, claim


def _rank_0_lost(e: distributed.DistributedError, run_path: Path, dist: distributed.Dist, named: bool,
                 state: str | None) -> str:
    """A rank's advice when rank 0 was lost after step 0's commit, before it said it had made the run directory:
    made whole (``distributed.WORLD_FILE``, its last record, is there), the run resumes; not made, the same
    command starts it again, and under the same ``run.name`` (``named``) this rank's ``state``, a run's that
    never was, is removed then (a name drawn from the time is a new run's: delete it); half made, remove the
    directory first. Rank 1 said "nothing was started" in every case (a racy test). A peer on another machine
    cannot see rank 0's directory: it names both."""
    cause = e.__cause__ or e
    why = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    head = (f"rank {dist.rank}: making the run directory failed ({why}): rank 0 stopped or is stuck (its own error "
            f"says why)")
    resume = f"continue with `{distributed.resume_command(run_path, dist)}` ({dist.world} processes in all, as now)"
    left = (f"the SSD state made for it ({state}) is removed then" if named else
            f"a run named by the time gets a new name: delete the SSD state made for this one ({state})")
    again = f"fix the cause and start it again with the same command ({left})"
    if dist.world > dist.local_world:
        return (f"{head} after step 0's commit: if it made the run directory {run_path} (on its machine) whole, "
                f"with its {distributed.WORLD_FILE}, {resume}; if not, remove what there is of it and {again}")
    if (run_path / distributed.WORLD_FILE).is_file():
        return f"{head} after step 0's commit and after it made the run directory: fix the cause, then {resume}"
    if run_path.exists():
        return f"{head} while it made the run directory {run_path}: remove that directory, then {again}"
    return f"{head} before it made the run directory {run_path}: {again}"


def _record_run(run_dir: Path, cfg: FuyouConfig, vocabulary, dist: distributed.Dist) -> None:
    """A new run's records beside its config: its data (``record_data``), a LoRA base's identity and, under
    torchrun, its world; a resume reads them."""
    record_data(run_dir, cfg, vocabulary=vocabulary)
    record_chat_template(run_dir, vocabulary)
    if cfg.lora.enabled:
        from fuyou.hf.peft import record_base

        record_base(run_dir)  # export --merge checks the base is still the one trained over
    if dist.enabled:
        distributed.record_world(run_dir, dist)


def _kept_before_non_finite(e: NonFiniteError, run_dir: Path, trainer: Trainer, cfg: FuyouConfig,
                            step: int) -> tuple[NonFiniteError, Path | None]:
    """An in-memory run whose step ``step + 1`` was not finite applied no update: its weights (those after ``step``
    steps; with LoRA its adapters) are kept as a snapshot when they are finite, as an engine run keeps its last
    commit (it trained on with NaN weights, and its snapshots rotated the good ones away: a pass). The error to
    raise, and the snapshot (None: none kept)."""
    if step == 0:  # before any update: the start gave it, which a snapshot would only copy (a pass)
        return NonFiniteError(f"{e}; {NonFiniteError.BEFORE_ANY_UPDATE}", e.step), None
    trained = trainer.adapter_state().values() if cfg.lora.enabled else trainer.master_chunks()
    what = "adapters" if cfg.lora.enabled else "weights"
    if not all(bool(torch.isfinite(c).all()) for c in trained):
        return NonFiniteError(f"{e}; the {what} were not finite already (no snapshot written). Start again from an "
                              f"earlier snapshot, if the run has one, with a lower optim.lr", e.step), None
    from fuyou.snapshots import snapshot_dirs, snapshot_path

    snap = snapshot_path(run_dir, step)  # (train.save_every may have written it already)
    try:
        if not snap.is_dir():  # not rotated: they are what gave the non-finite loss, and pushed out finite older ones
            snap = save_snapshot(run_dir, trainer, cfg, step, rotate=False)
    except SaveError as err:
        return NonFiniteError(f"{e}; the {what} of step {step} could not be kept: {err}", e.step), None
    earlier = [d for d in snapshot_dirs(run_dir / "snapshots") if d != snap]

    def how(src):  # (--init-from a LoRA snapshot is refused)
        return (f"export it (`fuyou export {src} --out DIR`) and start a run over the same base with lora.init_from="
                f"DIR" if cfg.lora.enabled else f"start a run with --init-from {src}")

    # (the advice was to start from them: they gave the same non-finite loss again, a loop; a pass)
    start = (f"start from an earlier snapshot ({how(earlier[-1])})" if earlier else
             "start again from the run's beginning")
    return NonFiniteError(f"{e}; the {what} of step {step} are kept in {snap}, but they are the ones that gave it "
                          f"and may not train on at all (an in-memory run keeps no resumable state): lower optim.lr "
                          f"(or check the data) and {start}, or {how(snap)} if they do", e.step), snap


SCHEDULE_FIELDS = ("train.steps", "train.epochs", "train.warmup_steps", "train.warmup_ratio", "train.lr_schedule",
                   "train.min_lr_ratio", "optim.lr")


def _schedule_change(old: FuyouConfig, new: FuyouConfig, step: int, changed: dict,
                     old_steps: int | None = None) -> str | None:
    """What a resume that changes the schedule's fields does to the learning rate: the schedule is a
    function of (step, train.steps, ...), so from the resumed step on the run follows the new schedule
    as if it had always been the run's (it is not stretched over the remaining steps). ``old_steps``: the
    steps the run's train.epochs made (``data-files.json``), its config's train.steps being unused then."""
    # (the steps the epochs make of data that changed under the run count too: the lr jumped unexplained, a pass)
    keys = [k for k in changed if k in SCHEDULE_FIELDS or k == "train.steps (from train.epochs)"]
    if not keys:
        return None
    from fuyou.optim.schedule import lr_of

    if step >= new.train.steps:
        return None  # no step is left to run: no learning rate is used
    if old.train.epochs is not None and old_steps:
        object.__setattr__(old.train, "steps", old_steps)  # (as load_training_data sets it)
    # (lr_of takes the 0-based index of a step; the note counts steps from 1, as the progress line does)
    was = ("" if (old.train.epochs is not None and not old_steps) or step >= old.train.steps else
           f"{lr_of(old, step):.3g} -> ")
    return (f"note: the learning-rate schedule is a function of the step and {', '.join(keys)}; from step {step + 1} "
            f"on the run follows the new schedule as if it had been the run's from the start (not rescaled to the "
            f"remaining steps): learning rate at step {step + 1} {was}{lr_of(new, step):.3g}, "
            f"at the last step ({new.train.steps}) {lr_of(new, new.train.steps - 1):.3g}")


def _seen(trainer: Trainer, cfg: FuyouConfig, steps: int) -> dict:
    """Tokens run (padding included) and epochs of training data after ``steps`` steps, for every
    metrics line."""
    t = cfg.train
    out = {"tokens": steps * t.micro_batch_size * t.grad_accum * cfg.data.seq_len}
    epoch = trainer.batches.epochs(steps * t.grad_accum)
    if epoch is not None:
        out["epoch"] = round(epoch, 6)
    return out


def _stop_before_any_step(cfg: FuyouConfig, trainer: Trainer, run_dir: Path, log, progress, stop, start_step: int,
                          first_eval: float | None) -> RunResult:
    """A stop that came during the evaluation before this launch's first step: nothing was trained. A run
    that commits is left at its commit (step 0's, or the one it resumed from); any other keeps nothing."""
    from fuyou.engine.malloc import resident_bytes

    log.write({"stopped": stop.requested, "step": start_step})
    log.close()
    if cfg.offload.mode == "ssd" and cfg.offload.commit == "cow":
        how = distributed.resume_command(run_dir)
        progress.message(f"stopped by {stop.requested}{stop.origin} before step {start_step + 1}: nothing was "
                         f"trained in this launch; the commit of step {start_step} is intact; continue with: {how}")
    else:
        if cfg.offload.mode == "ssd":  # (offload.commit=none: a state nothing resumes goes, as a finished run's)
            trainer.completed = True
        again = "delete it or give another run.name to start the run again"
        if not distributed.current().enabled and not trainer.resumed:  # (its directory refused the same command)
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            again = "it is removed, so the same command starts the run again"
        progress.message(f"stopped by {stop.requested}{stop.origin} before the first step: nothing was trained "
                         f"and nothing is kept in {run_dir}: {again}")
    return RunResult(run_dir, first_eval, None, float("nan"), 0.0, resident_bytes("VmHWM"), stopped=True,
                     exit_status=stop_status(stop.requested))


def _resume_advice(e: BaseException, trainer, run_path: Path) -> str | None:
    """What a disk that filled up or refused writes during training leaves (a pass: its error named the disk
    and not the commit that is intact, nor how to go on from it)."""
    from fuyou.store.errors import StoreFullError, StorePermissionError, StoreSpaceError

    step = getattr(trainer, "durable_commit_step", None)
    if not isinstance(e, (StoreFullError, StorePermissionError, StoreSpaceError)) or step is None:
        return None
    if "--resume" in str(e) or not (run_path / "config.toml").is_file():  # (said already; a run never started)
        return None
    queued = getattr(trainer, "pending_commit_step", None)
    later = (f" (step {queued}'s, still being written then, may be too: a resume starts at the latest whole one)"
             if queued is not None else "")  # (it named the earlier one only: a note)
    return (f"It happened during training: the commit of step {step} is intact{later}, and once that is mended "
            f"`{distributed.resume_command(run_path)}` continues from it")


def _save_after_a_failed_final_commit(cfg: FuyouConfig, trainer: Trainer, run_dir: Path, dist: distributed.Dist,
                                      steps: int, error: FuyouError) -> str | None:
    """The run trained every step but its final commit failed (the SSD directory full, removed or refusing
    writes): the weights are still in CPU memory and the store's open files, so they are saved to the run
    directory before the error is raised, with what it means for the state. A finished run whose commit failed
    lost everything since its last commit (at the default interval, often step 0: a hostile pass). Returns the
    error's message with what was saved (None: nothing saved, the error is raised as it is). One process; a
    data-parallel run's ranks raise as before."""
    from fuyou.watchdog import StallError

    # (not after a stall, whose job may still be writing the resident state, nor when an update failed or was
    # skipped after an earlier commit's failure: the original error, with its advice, then: a review)
    if not cfg.run.save_weights or dist.enabled or isinstance(error, StallError):
        return None
    if not cfg.lora.enabled and not trainer.weights_settled():
        return None
    try:
        path = save_weights(run_dir, trainer, cfg, steps, as_they_are=True)
    except (FuyouError, OSError):
        return None
    kept = (f"the SSD state ({trainer.state_location()}) holds no commit of step {steps}: a --resume would go "
            f"back to an earlier one, so delete it once the weights are safe")
    what = "adapters" if cfg.lora.enabled else "weights"
    return (f"{error}. The run had trained all {steps} steps: their {what} are saved in {path}, read from memory "
            f"and the state's open files; {kept}")


def _serve_weights(trainer) -> None:
    """A rank other than 0 while rank 0 saves: with a sharded optimizer state it sends the master
    weights of the stages it owns (``Engine.master_chunks`` is a collective); else nothing."""
    if getattr(trainer, "sharded", False):
        for _ in trainer.master_chunks():
            pass


def _loop(cfg: FuyouConfig, trainer: Trainer, run_dir: Path, stream, trace, stop,
          dist: distributed.Dist | None = None) -> RunResult:
    """Open the run's log (metrics.jsonl, TensorBoard, W&B) and train (``_steps``); a failure is its last line."""
    dist = dist or distributed.Dist()
    tb = cfg.run.tensorboard
    # a resume from an earlier commit redoes steps already logged: TensorBoard drops its points from there
    # (purge_step), and the log says where the redone steps start (a "resumed" record)
    purge = trainer.start_step + 1 if trainer.resumed else None
    wandb = (WandbLog(run_dir, cfg.run.wandb, cfg.run.wandb_project, cfg.run.wandb_entity,
                      cfg.model_dump(mode="json"), stream) if dist.is_main and cfg.run.wandb != "off" else None)
    log = (MetricsLog(run_dir / "metrics.jsonl", tensorboard=tensorboard_available() if tb is None else tb,
                      purge_step=purge, wandb=wandb)
           if dist.is_main else MetricsLog(Path(os.devnull)))  # one log: rank 0's
    try:
        return _steps(cfg, trainer, run_dir, stream, trace, stop, dist, log)
    except Exception as e:  # (W&B recorded a launch that failed as one that finished: a pass)
        log.fail(e)
        raise


@dataclass
class _Totals:
    """What this launch's steps did, for the metrics lines' running totals and the summary."""

    tokens: int = 0
    written: int = 0  # SSD bytes, the commits' included
    read: int = 0
    commit_written: int = 0
    commits: int = 0
    redone: int = 0  # steps that redid their updates for exact clipping: their writes are in the step's own bytes
    deferred: int = 0  # steps that clipped after one that did, their updates waiting for the norm (clip_schedule=auto)
    step_s: float = 0.0  # the steps' own time (the wear's hours: evaluations and snapshots write nothing to the state)

    def add(self, counters: dict) -> None:
        """A step's (or the final commit's) engine counters."""
        self.written += counters.get("ssd_write_bytes", 0)
        self.read += counters.get("ssd_read_bytes", 0)
        self.commit_written += counters.get("commit_write_bytes", 0)
        self.commits += counters.get("commits", 0)


def _steps(cfg: FuyouConfig, trainer: Trainer, run_dir: Path, stream, trace, stop, dist: distributed.Dist,
           log: MetricsLog) -> RunResult:
    """The run's evaluations, steps, final commit and save, logged to ``log`` (``_loop``)."""
    from fuyou.engine.malloc import resident_bytes

    model = StageModel(cfg.model)
    flops_per_token = model.flops_per_token(cfg.data.seq_len, frozen=cfg.lora.enabled)
    t = cfg.train
    progress = Progress(t.steps, t.log_every, stream)
    mode = "in memory" if cfg.offload.mode == "none" else f"SSD offload ({', '.join(cfg.offload.ssd_dirs)})"
    from fuyou.data.examples import ExampleSampler

    data = ("fine-tuning examples" if isinstance(getattr(trainer, "batches", None), ExampleSampler)
            else f"{cfg.data.source} data")
    progress.message(
        f"fuyou: training {cfg.model.preset or cfg.model.family} ({si(model.num_params)} parameters) on "
        f"{trainer.device}, {mode}, {data}, {t.precision}{' (auto)' if t.precision_chosen else ''}, "
        f"{t.steps} step{'s' if t.steps != 1 else ''} of "
        f"{t.micro_batch_size * t.grad_accum} x {cfg.data.seq_len} tokens"
        + (f" ({t.grad_accum} micro-batches of {t.micro_batch_size})" if t.grad_accum > 1 else "")
        + f"; run dir {run_dir}"
    )
    for line in trainer.startup_lines():
        progress.message(line)

    start_step = trainer.start_step
    if trainer.resumed:
        progress.message(f"resuming at step {start_step} from the last commit")
        progress.done = start_step
        log.write({"resumed": start_step})  # records of later steps before this line are of the redone steps
    def should_stop() -> bool:  # between held-out batches: a stop abandons an evaluation (every rank at once)
        return stop.agree(dist, "agreeing on a stop during the evaluation")

    def evaluate(at: int) -> float | None:
        try:
            return trainer.evaluate(should_stop)
        except EvaluationStopped:
            progress.message(f"the evaluation at step {at} was abandoned ({stop.requested}{stop.origin})")
            return None

    first_eval = last_eval = evaluate(start_step)
    if first_eval is not None:
        # (evaluated at the commit's step already, to the same value: held-out data changed on resume logs anew)
        if not (trainer.resumed and log.logged_eval(start_step) == first_eval):
            log.write({"step": start_step, "eval_loss": first_eval, **_seen(trainer, cfg, start_step)})
        progress.message(f"eval loss at step {start_step}: {first_eval:.4f}")
    ran = start_step < t.steps  # (a finished run resumed with no step left: nothing to evaluate again or sum up)
    if trace is not None and trainer.trace_step >= 0:  # this launch's second step (the first warms caches), or
        # its only one (a trace of a one-step run, or of a resume, was never written, in silence)
        trainer.trace_step = start_step + 1 if start_step + 1 < t.steps else start_step
    start = time.perf_counter()
    # a stop before the first step (the evaluation abandoned, or none to abandon), agreed: a rank that returned
    # alone left the others in the step's collectives (a review)
    fault("loop_start")  # tests: a stop that reaches one rank between the first evaluation and the first step
    if ran and stop.agree(dist, "agreeing on a stop before the first step"):
        return _stop_before_any_step(cfg, trainer, run_dir, log, progress, stop, start_step, first_eval)
    done = _Totals()
    overflow_said = False  # the note that the cpu tier's activations overflowed to the SSD, once a launch
    stats = None
    for step in range(start_step, t.steps):
        log.step = step + 1  # (a failure's line names it: the last logged step was named, 30 for 37: a review)
        t0 = time.perf_counter()
        try:
            stats = trainer.train_step(step)
        except NonFiniteError as e:
            if cfg.offload.mode != "none":
                raise  # (the engine's last commit is the state of record)
            err, snap = _kept_before_non_finite(e, run_dir, trainer, cfg, step)
            log.write({"stopped": "non-finite", "step": step, **({"snapshot": os.path.abspath(snap)} if snap else {})})
            log.close()
            raise err from None
        dt = time.perf_counter() - t0
        done.step_s += dt
        done.tokens += stats.tokens
        tps = stats.tokens / dt
        record = {
            "step": step + 1, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
            "step_time_s": dt, "tokens_per_s": tps, "tflops": tps * flops_per_token / 1e12,
            "loss_tokens": stats.loss_tokens, **_seen(trainer, cfg, step + 1),
        }
        counters = trainer.step_counters()
        if counters is not None:
            record.update(counters)
            done.add(counters)
            # (a deferred step waited for the norm, and LoRA's adapters clip in memory: neither redoes an update)
            done.redone += bool(counters.get("clipped")) and not counters.get("deferred") and not cfg.lora.enabled
            done.deferred += bool(counters.get("clipped")) and bool(counters.get("deferred")) and not cfg.lora.enabled
            # this launch's running totals: a line's own counters are its step's, and the steps between two lines
            # (train.log_every) were in none (a pass summed the lines' commit bytes to a quarter of the summary's)
            record.update(ssd_read_bytes_total=done.read, ssd_write_bytes_total=done.written,
                          commit_write_bytes_total=done.commit_written, commits_total=done.commits)
        if (step + 1) % t.log_every == 0 or step == 0 or step + 1 == t.steps:
            log.write(record)
        if counters and counters.get("act_overflow_bytes") and not overflow_said:
            overflow_said = True
            progress.message(f"note: step {step + 1}: {format_size(counters['act_overflow_bytes'])} of the cpu tier's "
                             f"activations overflowed to the SSD, its share (offload.act_cpu_mem) being full; a "
                             f"larger share keeps them in CPU memory (metrics.jsonl: act_overflow_bytes)")
        fields = {"loss": f"{stats.loss:.4f}", "tok/s": si(tps), "TFLOPS": f"{record['tflops']:.3g}",
                  "step": f"{dt:.2f}s"}
        if stats.grad_norm is not None:  # "clipped": the norm exceeded train.grad_clip
            fields["norm"] = f"{stats.grad_norm:.3g}" + (" clipped" if stats.grad_norm > t.grad_clip else "")
        if counters is not None:
            fields["compute"] = f"{counters['compute_s']:.2f}s"
            fields["wait w/opt"] = f"{counters['wait_weights_s']:.2f}/{counters['wait_optimizer_s']:.2f}s"
            fields["ssd r/w"] = f"{format_size(counters['ssd_read_bytes'])}/{format_size(counters['ssd_write_bytes'])}"
        progress.update(step, fields)
        if trace is not None and step == trainer.trace_step and dist.is_main:
            try:
                trainer.write_trace(trace)
                progress.message(f"wrote a trace of step {step + 1} to {trace} (open it in ui.perfetto.dev)")
            except OSError as e:  # (a trace is a diagnosis: its failure ended the run in a traceback; a pass)
                progress.message(f"warning: the trace of step {step + 1} could not be written to {trace} "
                                 f"({e.strerror or e}); training goes on")
        if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 != t.steps:
            last_eval = evaluate(step + 1)
            if last_eval is not None:
                log.write({"step": step + 1, "eval_loss": last_eval, **_seen(trainer, cfg, step + 1)})
                progress.message(f"eval loss at step {step + 1}: {last_eval:.4f}")
        if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < t.steps:
            if dist.is_main:
                try:
                    snap = save_snapshot(run_dir, trainer, cfg, step + 1)
                except SaveError as e:
                    if dist.enabled:  # the other ranks are serving it their weights: not a step to skip alone
                        raise
                    # a full run directory: training goes on (its state commits to the SSD as usual)
                    progress.message(f"warning: the snapshot of step {step + 1} was not written: {e}; training "
                                     f"goes on")
                else:
                    # (absolute: relative to the launch's directory, a resume from another wrote another base: a pass)
                    log.write({"snapshot": os.path.abspath(snap), "step": step + 1})
                    progress.message(f"snapshot of step {step + 1}: {snap}")
            else:
                _serve_weights(trainer)
        # every rank stops after the same step (a signal reaches them at different moments)
        stopping = stop.agree(dist, "agreeing on a step boundary")
        if stopping and step + 1 < t.steps:
            return _stop_after(step, cfg, trainer, run_dir, log, progress, stop, dist, stats, done, start, first_eval,
                               last_eval)
    try:
        trainer.commit(t.steps)  # the final state is committed before anything may delete it
    except FuyouError as e:
        said = _save_after_a_failed_final_commit(cfg, trainer, run_dir, dist, t.steps, e)
        if said is None:
            raise
        raise FuyouError(said) from e
    tail = trainer.step_counters()  # what landed after the last step's record: its optimizer tail, this commit
    if tail is not None:
        done.add(tail)
    if dist.enabled:  # a machine's drives and memory serve all its ranks (a pass read rank 0's alone: half the wear);
        # summed before the save, after which a rank may be gone (killed past the save: the run is complete)
        machines = max(1, dist.world // dist.local_world)
        peak_then = resident_bytes("VmHWM")
        shared = resident_bytes("RssShmem")  # the ranks' one weight cache (/dev/shm): in each rank's figure, once
        done.written, done.commit_written, done.read, ranks_peak = (
            v // machines for v in dist.reduce_ints([int(done.written), int(done.commit_written), int(done.read),
                                                     peak_then - shared], "summing the ranks' SSD writes and memory"))
        ranks_peak += dist.reduce_ints([shared], "summing the ranks' SSD writes and memory", op="max")[0]
    elapsed = time.perf_counter() - start
    if ran:
        last_eval = evaluate(t.steps)  # (a stop now skips it: the run is complete, its weights are saved next)
        if last_eval is not None:
            log.write({"step": t.steps, "eval_loss": last_eval, **_seen(trainer, cfg, t.steps)})
    if cfg.run.save_weights:
        if dist.is_main:  # rank 0 saves (sharded: the owners send it their stages)
            save_weights(run_dir, trainer, cfg, t.steps)  # fsynced and renamed before the SSD state may be deleted
        else:
            _serve_weights(trainer)
        dist.barrier("waiting for rank 0 to save the weights")  # before any rank deletes its state
        fault("saved")
        trainer.completed = True
    elif trainer.state_location() is not None:
        progress.message(f"run.save_weights=false: the trained state stays on the SSD ({trainer.state_location()}); "
                         f"delete it yourself when it is no longer needed")
    mean_tps, peak = _summarise(cfg, trainer, run_dir, log, progress, dist, done, start_step, ran, elapsed, first_eval,
                                last_eval, flops_per_token, ranks_peak if dist.enabled else 0,
                                peak_then if dist.enabled else 0)
    return RunResult(run_dir, first_eval, last_eval, stats.loss if stats else float("nan"), mean_tps, peak)


def _stop_after(step: int, cfg: FuyouConfig, trainer: Trainer, run_dir: Path, log: MetricsLog, progress, stop,
                dist: distributed.Dist, stats, done: "_Totals", start: float, first_eval, last_eval) -> RunResult:
    """A stop agreed after ``step`` (0-based), before the last: the step is committed and the run resumes from
    it; a run with no state to resume (in memory, offload.commit=none) keeps its weights as a snapshot."""
    from fuyou.engine.malloc import resident_bytes

    if cfg.offload.mode != "ssd" or cfg.offload.commit == "none":
        # An in-memory run (or one with offload.commit=none) has no committed state to resume: its weights
        # are kept as a snapshot, which a new run can start from (its optimizer moments and data position
        # start afresh). (commit=none said "committed; continue with --resume", which it refused: a pass)
        snap = None
        if dist.is_main:
            snap = save_snapshot(run_dir, trainer, cfg, step + 1)
        else:
            _serve_weights(trainer)
        if cfg.offload.mode == "ssd":  # nothing resumes a state never committed: it goes, as a finished run's
            trainer.completed = True
        # (rank 0's snapshot: another rank's None was a TypeError there, which left its state: a pass)
        log.write({"stopped": stop.requested, "step": step + 1,
                   **({"snapshot": os.path.abspath(snap)} if snap else {})})
        log.close()
        how = (f"export them (`fuyou export {snap} --out DIR`) and start a run over the same base with "
               f"lora.init_from=DIR" if cfg.lora.enabled else f"start a run with --init-from {snap}")
        progress.message(f"stopped by {stop.requested}{stop.origin} after step {step + 1}; the "
                         f"{'adapters' if cfg.lora.enabled else 'weights'} of step {step + 1} are in {snap}. "
                         + ("An in-memory run keeps no resumable state (offload.mode=ssd runs do)"
                            if cfg.offload.mode != "ssd" else
                            "A run with offload.commit=none keeps no resumable state (offload.commit=cow runs "
                            "do)")
                         + f": to go on from them, {how} (its AdamW moments, schedule and data position start "
                           f"afresh)")
        return RunResult(run_dir, first_eval, last_eval, stats.loss, done.tokens / (time.perf_counter() - start),
                         resident_bytes("VmHWM"), stopped=True, exit_status=stop_status(stop.requested))
    trainer.commit(step + 1)  # the step's updates and its commit are on the SSD
    log.write({"stopped": stop.requested, "step": step + 1})
    log.close()
    how = distributed.resume_command(run_dir)
    progress.message(f"stopped by {stop.requested}{stop.origin} after step {step + 1} (committed); continue "
                     f"with: {how}")
    return RunResult(run_dir, first_eval, last_eval, stats.loss, done.tokens / (time.perf_counter() - start),
                     resident_bytes("VmHWM"), stopped=True, exit_status=stop_status(stop.requested))


def _summarise(cfg: FuyouConfig, trainer: Trainer, run_dir: Path, log: MetricsLog, progress, dist: distributed.Dist,
               done: "_Totals", start_step: int, ran: bool, elapsed: float, first_eval, last_eval,
               flops_per_token: float, ranks_peak: int, peak_then: int) -> tuple[float, int]:
    """The run's summary: logged (metrics.jsonl) and said, with the SSD wear and the peak memory (data parallel:
    ``ranks_peak``, the machine's ranks' peaks summed when rank 0's was ``peak_then``). Returns this launch's
    tokens a second and the peak resident memory."""
    from fuyou.engine.malloc import resident_bytes

    t = cfg.train
    peak = resident_bytes("VmHWM")
    machine_peak = ranks_peak - peak_then + peak if dist.enabled else peak
    steps_run = max(1, t.steps - start_step)
    wear = (step_wear(cfg, done.written, done.commit_written, done.commits, steps_run, done.step_s, done.read)
            if cfg.offload.mode == "ssd" and ran else {})
    rated = endurance(cfg)
    tbw, drives = rated if rated else (None, "")
    if wear and tbw:
        wear["ssd_life_hours"] = tbw / wear["ssd_write_per_hour_bytes"] if done.written else None
    if ran:  # (a second summary of zeros was what a reader of the last one got: a pass)
        # (elapsed and tokens/s are this launch's: a resumed run's summary said "steps": 1900 beside 45 s, a pass)
        log.write({"summary": True, "steps": t.steps, **({"resumed_from": start_step} if start_step else {}),
                   "elapsed_s": elapsed, "tokens_per_s": done.tokens / elapsed,
                   "peak_rss_bytes": peak, **({"machine_peak_rss_bytes": machine_peak} if dist.enabled else {}),
                   **wear})
    elif not run_ended(run_dir):  # a stopped run resumed at its last step ends here: its summary says it completed (no
        # figures of a launch that ran nothing; a hostile pass found such a finished run without one)
        log.write({"summary": True, "steps": t.steps, "resumed_from": start_step, "steps_run": 0})
    log.close()
    mean_tps = done.tokens / elapsed
    if not ran:
        more = ("; its state is kept (offload.keep_state): raise train.steps to train on" if cfg.offload.keep_state
                else "")  # (without keep_state the state goes once the weights are saved: no resume is left)
        summary = f"done: no step left to run ({t.steps} committed{more})"
    else:
        steps = (f"{t.steps} step{'s' if t.steps != 1 else ''}" if not start_step
                else f"steps {start_step + 1}-{t.steps} of {t.steps}")
        summary = (f"done: {steps} in {elapsed:.1f}s, {si(mean_tps)} tokens/s, "
                   f"{mean_tps * flops_per_token / 1e12:.3g} TFLOPS")
    if first_eval is not None:
        summary += f"; eval loss {first_eval:.4f} -> " + (f"{last_eval:.4f}" if last_eval is not None else
                                                          "(the last evaluation was abandoned)")
    summary += f"; peak resident memory {format_size(peak)}"
    overhead = getattr(trainer, "fixed_overhead", None)  # (the engine's: an in-memory run budgets nothing)
    if isinstance(overhead, int) and cfg.offload.mode == "ssd" and not dist.enabled:
        # the budget is beyond the process's fixed overhead: the peak compared with it read as over budget (a pass)
        summary += (f" (the fixed overhead {format_size(overhead)} + {format_size(max(0, peak - overhead))}; "
                    f"--cpu-mem {format_size(cfg.offload.cpu_mem)} comes on top of that overhead)")
    if dist.enabled:
        summary += f" (rank 0; a machine's {dist.local_world} ranks together {format_size(machine_peak)})"
    if wear:
        state = ("LoRA: the base is read-only; the adapters' commits and any swapped activations" if cfg.lora.enabled
                 else f"{cfg.optim.master} master, {cfg.optim.moments} moments")
        summary += (f"\nSSD written{' (a machine, its ranks together)' if dist.enabled else ''}: "
                    f"{format_size(wear['ssd_write_per_step_bytes'])} per step ({wear_parts(cfg, wear)}), "
                    f"{format_decimal(wear['ssd_write_per_hour_bytes'])} per hour ({state}); this run's steps and "
                    f"commits {format_size(wear['ssd_written_bytes'])} in all (the initial state's write not counted)")
        if done.redone:  # (a short run's figure was above the plan's, with nothing to say why: a pass)
            # (the steps that clipped after it and deferred were not said: "1 of the 4 steps clipped" where all had)
            later = (f", {done.deferred} more clipped and deferred theirs until the norm was known (their bytes are "
                     f"`fuyou plan`'s traffic of a step after one that clipped)" if done.deferred else "")
            again = (": what a redo wrote again is in the steps' own bytes (`fuyou plan`'s wear line gives it apart "
                     "from a step's)" if wear["ssd_step_write_bytes"] else "")  # (resident state: a redo writes none)
            its = "its" if done.redone == 1 else "their"
            summary += (f"; {done.redone} of the {steps_run} steps clipped and redid {its} speculative updates (exact "
                        f"clipping){later}{again}")
        if wear.get("ssd_life_hours"):
            summary += (f"; at this rate the drives' rated {tbw / 1e15:.3g} PB ({drives}) last "
                        f"{wear['ssd_life_hours']:,.0f} hours")
        elif not tbw:
            summary += "; set hardware.ssd (a preset) or hardware.ssd_tbw for how long the drives last"
    progress.message(summary + f"\nrun directory: {run_dir}")
    return mean_tps, peak
