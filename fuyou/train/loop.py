"""``run_training``: the loop shared by the in-memory reference trainer and the three-tier engine.

A trainer provides ``train_step(step) -> StepStats``, ``evaluate() -> float | None``,
``master_chunks()`` (its fp32 weights as a flat stream, for saving) and ``close()``; this function
owns the run directory, logging, evaluation cadence, tracing and saving.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from fuyou.tomlfile import read_toml
from fuyou.config import FuyouConfig
from fuyou.data import load_data
from fuyou.engine.commit import STATE_SUFFIX, state_name
from fuyou.models import StageModel
from fuyou.train.metrics import MetricsLog, Progress, WandbLog, check_wandb, si, tensorboard_available
from fuyou.train.reference import ReferenceTrainer
from fuyou.engine.state import run_id, write_run_id
from fuyou.train.run import (DATA_FILES, SaveError, make_run_dir, record_resume, recorded_data, resume_changes,
                             run_dir_path, save_snapshot, save_weights)
from fuyou.errors import ConfigError, DataError, FuyouError, NonFiniteError
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
                  vocabulary: dict | None = None) -> Trainer:
    """The trainer for ``cfg``: the in-memory reference, or the engine (with data parallelism, this rank's
    share of the machine's budgets and its own state: fuyou/distributed.py). ``split``: how fine-tuning
    examples are held out (``fuyou.data.tokenize_records``; a resume keeps its run's). ``vocabulary``:
    ``load_training_data``'s record of the data's vocabulary (a resume gives the run's)."""
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
    return Engine(dist.rank_config(cfg), lambda: load_training_data(cfg, resume, split, vocabulary),
                  store_name=dist.store_name(state_name(run_name)), resume=resume, init_values=init_values)


def data_fingerprint(cfg: FuyouConfig, like: dict | None = None) -> dict:
    """What a resume compares to tell whether the run's data changed: each data.path and data.eval_path
    entry's size and modification time (a directory's file count, total size and newest time; a moved
    file keeps its figures; prepared data: a digest of its meta.json and of samples of its files instead of
    the time, so that data prepared again the same compares equal: a pass was told its data changed, and
    its rows' order too), and with train.epochs the steps they made. ``like``: a record to match the form of
    (a run recorded before prepared data had a digest: its times)."""
    from fuyou.data.config import is_prepared
    from fuyou.data.dataset import PREPARED_FILES
    from fuyou.hf.peft import files_fingerprint

    def one(p: Path, then):
        if p.is_file():
            st = p.stat()
            return [st.st_size, st.st_mtime_ns]
        if p.is_dir():
            if is_prepared(p) and not (isinstance(then, list) and len(then) == 3 and isinstance(then[2], int)):
                # its own files only (a killed prepare's hidden leftovers, other files beside it: a review), by a
                # sampled fingerprint, which reads the small meta.json whole, and so its hash of all the tokens
                paths = [p / n for n in PREPARED_FILES if (p / n).is_file()]
                return [len(paths), sum(f.stat().st_size for f in paths),
                        "sha256:" + files_fingerprint(paths)[:32]]
            files = [f.stat() for f in sorted(p.rglob("*")) if f.is_file()]
            return [len(files), sum(f.st_size for f in files), max((f.st_mtime_ns for f in files), default=0)]
        return None
    paths = [] if cfg.data.source in ("synthetic", "builtin") else [*cfg.data.path, *cfg.data.eval_path]
    then = (like or {}).get("files") if isinstance(like, dict) else None
    then = then if isinstance(then, list) else []
    return {"files": [one(Path(p), then[i] if i < len(then) else None) for i, p in enumerate(paths)],
            "steps": cfg.train.steps if cfg.train.epochs is not None else None}


def _data_files_change(cfg: FuyouConfig, then: list, now: list, split: str = "content",
                       then_paths: list | None = None) -> str:
    """``data_fingerprint``'s figures that changed, in words (the raw lists go to resumes.jsonl).
    ``then_paths``: the run's data.path and data.eval_path entries before the resume, named beside the
    new ones where they differ (the old figures stood under the new name)."""
    import datetime
    import itertools

    def words(f) -> str:  # (False: no such entry, the number of paths changed; None: the path is missing)
        if f is False or f is None:
            return "not given" if f is False else "missing"
        if isinstance(f[-1], str):  # prepared data's digest
            return f"{f[0]} files, {format_size(f[1])}, content {f[-1].removeprefix('sha256:')[:12]}"
        when = datetime.datetime.fromtimestamp(f[-1] / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        return (f"{format_size(f[0])}, modified {when}" if len(f) == 2 else
                f"{f[0]} files, {format_size(f[1])}, newest modified {when}")

    paths = [*cfg.data.path, *cfg.data.eval_path]
    if then_paths is not None:  # "old -> new" where the entry is another path now
        paths = [p if p is False or q is False or _absolute(q) == _absolute(p) else f"{q} -> {p}"
                 for p, q in itertools.zip_longest(paths, then_paths, fillvalue=False)]
    parts = [f"{p if p is not False else 'a path no longer given'}: {words(a)} -> {words(b)}"
             for p, a, b in itertools.zip_longest(paths, then, now, fillvalue=False) if a != b]
    held = ("" if cfg.data.eval_path or not cfg.data.val_fraction or cfg.data.source == "prepared" else
            "; of data.val_fraction's held-out share, " + (
                "fine-tuning examples keep their side (each is held out by its content)" if split == "content" else
                "fine-tuning examples are drawn again (this run started before fuyou held them out by content), "
                "possibly among the examples trained on") + ", and plain text's is the tail of the changed token "
            "stream: evaluation losses from before and after this resume are not comparable")
    return "the data changed since the run started (" + "; ".join(parts) + ")" + held


def record_data(run_dir: Path, cfg: FuyouConfig, fp: dict | None = None, split: str = "content",
                vocabulary: dict | None = None) -> None:
    """Write ``data_fingerprint`` (``fp`` when already taken) into a resumable run's directory (SSD
    offload, data from files), with how its fine-tuning examples are held out (``split``) and the data's
    vocabulary (``load_training_data``'s record), which a resume's data must share."""
    import json

    fp = fp or data_fingerprint(cfg)
    if cfg.offload.mode == "ssd" and (fp["files"] or (vocabulary or {}).get("vocabulary")):  # (builtin: its vocabulary)
        (run_dir / DATA_FILES).write_text(json.dumps({**fp, "split": split, **(vocabulary or {})}) + "\n")


def run_vocabulary(run_dir: Path) -> dict:
    """The vocabulary a run being resumed recorded for its data (``record_data``): ``{"vocabulary":
    fingerprint, "tokenizer": name}``, or {} for a run from before the record (nothing to compare)."""
    rec = recorded_data(run_dir)
    if not isinstance(rec, dict) or not isinstance(rec.get("vocabulary"), str):
        return {}
    from fuyou.hf.source import tokenizer_dir

    copy = tokenizer_dir(run_dir)  # the copy of its tokenizer the run keeps, if any (for the advice)
    kept = copy is not None and copy.resolve().is_relative_to(Path(run_dir).resolve())
    return {"vocabulary": rec["vocabulary"], "tokenizer": str(rec.get("tokenizer")),
            **({"copy": str(copy.resolve())} if kept else {}),
            **({"prepared": rec["prepared"]} if isinstance(rec.get("prepared"), dict) else {})}


def prepared_settings(path) -> dict | None:
    """What `fuyou data prepare` fixed of the prepared data at ``path`` that a resume must keep, as its
    meta.json records it: the kind (examples or text), the held-out share or the held-out files given
    instead, and for fine-tuning examples whether prompts carry loss. A field an earlier fuyou did not
    record is left out (and so not compared); None: no meta.json to read."""
    import json

    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    out = {"kind": "examples" if meta.get("kind") == "examples" else "text"}  # (--format text made examples text)
    if isinstance(meta.get("eval_paths"), list):  # named in the messages; compared by their content
        out["eval_paths"] = meta["eval_paths"]
    if isinstance(meta.get("eval_content"), str):
        out["eval_content"] = meta["eval_content"]
    if meta.get("kind") == "examples":
        if "val_fraction" in info:
            out["val_fraction"] = info["val_fraction"]
        if "held_records" in info:
            out["eval_files"] = bool(info["held_records"])
        if "train_on_prompt" in info:
            out["train_on_prompt"] = bool(info["train_on_prompt"])
    elif "held_documents" in meta:
        out.update(val_fraction=meta.get("val_fraction"), eval_files=bool(meta["held_documents"]))
    elif meta.get("val_fraction") is not None:
        out["val_fraction"] = meta["val_fraction"]
    return out


def check_prepared_settings(run: dict, now: dict | None, cfg: FuyouConfig) -> None:
    """Prepared data prepared again with another held-out share, other held-out files or another loss on
    prompts under a run being resumed: refused as those settings are when given to the resume (a new-user
    pass: four of seven new held-out examples had been trained on, and the masks changed mid-run, while the
    resume said only "the data changed"). Only what both records hold is compared."""
    then = run.get("prepared")
    if not isinstance(then, dict) or now is None:
        return
    # (held-out files are compared by content: the same files elsewhere, a copied data directory, are the same)
    both = then.keys() & now.keys()
    changed = {k for k in both if then[k] != now[k] and not (k == "eval_paths" and "eval_content" in both)}
    if not changed:
        return

    def flags(d: dict) -> str:
        if d.get("eval_paths"):
            out = [f"--eval {p}" for p in d["eval_paths"]]
        elif d.get("eval_files"):
            out = ["--eval FILES"]
        elif d.get("val_fraction") is not None:
            out = [f"--val-fraction {d['val_fraction']:g}"]
        else:
            out = ["a held-out share it did not record"]
        if d.get("train_on_prompt"):
            out.append("--train-on-prompt")
        return " ".join(out)
    what = []
    if "kind" in changed:  # (--format text made the run's examples a token stream: a hostile pass)
        kinds = {"examples": "fine-tuning examples", "text": "plain text"}
        what.append(f"its {kinds[then['kind']]} became {kinds[now['kind']]}: which tokens carry loss and what is "
                    f"held out changed")
    if changed & {"val_fraction", "eval_files", "eval_paths", "eval_content"}:
        held = "examples" if "train_on_prompt" in now else "tokens"
        what.append(f"its held-out {held} could be ones the run trained on")
    if "train_on_prompt" in changed:
        what.append("the tokens that carry loss changed")
    restore = flags(then) if (then.get("eval_paths") or then.get("val_fraction") is not None) else "as it was"
    if "kind" in changed:
        restore += " --format auto" if then["kind"] == "examples" else " --format text"
    raise DataError(f"{cfg.data.path[0]} was prepared again with {flags(now)} where this run started on data "
                    f"prepared with {flags(then)}: {' and '.join(what)}. Prepare it as it was (`fuyou data prepare "
                    f"... --out {cfg.data.path[0]} {restore}`), or start a new run from this run's weights; "
                    f"nothing was changed")


def run_split(run_dir: Path) -> str:
    """How a run being resumed holds its fine-tuning examples out: as recorded, else as fuyou did before
    it recorded it (a seeded shuffle): its resume keeps the run's held-out set (examples held out by their
    content from then on would have put examples it trained on among them, in silence)."""
    rec = recorded_data(run_dir)
    return rec.get("split", "shuffle") if isinstance(rec, dict) else "shuffle"


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
              f"{timeout:g} s after passing a stop on: launch torchrun with --shutdown-timeout "
              f"{max(60, int(2 * need))} (else a stop keeps the previous commit), or cap offload.resident_mem",
              file=stream)


def _refuse_finished(run_path: Path, cfg: FuyouConfig, dist: distributed.Dist) -> None:
    """A finished run removed its SSD state: say that, and how to train on from it, rather than that
    the state was never committed, deleted or moved. Rank 0 decides (it saves the weights, then every rank
    deletes its state); a rank whose own state is still there was stopped after the save, before it
    deleted it (a pass found its state asking to be resumed, and the resume refused, in a loop): that
    state is of no use and is removed, as the finished run would have."""
    from fuyou.train.run import ADAPTER_FILE

    # every rank's state there: kept (offload.keep_state=true), or stopped before any was removed; it resumes.
    # (rank 0's alone decided: rank 0 stopped after the save, rank 1's state removed, asked to be resumed: a pass)
    kept = not dist.any(not any(d.is_dir() for d in _state_dirs(cfg, run_path.name)), "comparing the ranks' states")
    finished = None
    if dist.is_main:
        try:
            finished = _finished(run_path, cfg, ADAPTER_FILE, kept)
        except FuyouError as e:  # (a state under the run's earlier name: every rank stops with it)
            finished = e
    finished = dist.broadcast(finished, "checking whether the run finished", started=False)
    if finished is None:
        return
    mine = [d for d in _state_dirs(cfg, run_path.name) if d.is_dir()]
    if mine and not cfg.offload.keep_state:
        from fuyou.engine.state import owner_mismatch

        if owner_mismatch(mine[0], run_path, run_id(run_path)) is None:  # (this run's own, not a namesake's)
            print(f"fuyou: rank {dist.rank}: removing the SSD state {', '.join(map(str, mine))}, left by a process "
                  f"stopped after the run's weights were saved, before it removed it", file=sys.stderr)
            for d in mine:
                shutil.rmtree(d, ignore_errors=True)
    raise ConfigError(finished)


def _finished(run_path: Path, cfg: FuyouConfig, adapter_file: str, kept: bool) -> str | None:
    """Why ``run_path`` has nothing to resume (its weights saved, a rank's state removed), or None; ``kept``:
    every rank's state is there."""
    done = next((f for f in ("model.safetensors", adapter_file) if (run_path / f).is_file()), None)
    if done is None or cfg.offload.mode != "ssd" or not cfg.offload.ssd_dirs:
        return None
    if kept:
        return None  # kept (offload.keep_state=true): it resumes
    _refuse_renamed_by_id(run_path, cfg)  # kept, under the name the run had (a pass got "finished" for it)
    how = (f"lora.init_from=DIR with its adapter exported (`fuyou export {run_path} --out DIR`), over the same base"
           if cfg.lora.enabled else f"--init-from {run_path}")
    return (f"{run_path} finished: its {'adapters' if cfg.lora.enabled else 'weights'} are in "
            f"{run_path / done}, and a finished run removes its SSD state (offload.keep_state=true keeps "
            f"it), so there is nothing to resume. To train on from it, start a new run with {how} (its "
            f"AdamW moments and schedule start afresh)")


def _agree_on_sources(cfg: FuyouConfig, dist: distributed.Dist) -> None:
    """Data parallel, a new run: model.init_from and lora.init_from may name another path on each machine
    (``distributed.PER_MACHINE``), but each rank initialises the stages it owns from its own: a pass trained a
    model whose layers came from two checkpoints, and two adapters as one, in silence. The ranks compare the
    fingerprints of the files each reads (``hf.peft.files_fingerprint``: a few small reads a tensor; the shape is
    among the settings compared) before anything is read: another file beside them is no difference."""
    if not dist.enabled:
        return
    from fuyou.hf.peft import files_fingerprint

    def read_files(key: str, path: Path) -> list[Path]:
        if key == "lora.init_from":
            return [path / "adapter_model.safetensors"]
        from fuyou.hf import open_checkpoint

        return sorted(set(open_checkpoint(path).weights.index.values()))

    for key, path in (("model.init_from", cfg.model.init_from), ("lora.init_from", cfg.lora.init_from)):
        err = None
        try:  # (every rank takes part, one without the setting too: 0)
            f = int(files_fingerprint(read_files(key, Path(path).expanduser()))[:15], 16) if path else 0
        except (OSError, FuyouError) as e:
            f, err = -1, e
        lo, hi = dist.min_max(f, f"comparing the ranks' {key}")
        unreadable = dist.any(err is not None, f"comparing the ranks' {key}")
        if isinstance(err, FuyouError):
            raise err
        if err is not None:
            raise ConfigError(f"{key}={path} cannot be read ({err.strerror or err})")
        if unreadable:
            raise ConfigError(f"another rank could not read its {key} (its error says why)")
        if lo != hi:
            raise ConfigError(f"the ranks' {key} hold different weights (rank {dist.rank}: "
                              f"{path or 'none, a seeded init'}): each rank initialises the stages it owns from its "
                              f"own, so every machine's {key} must hold a copy of the same checkpoint (the paths may "
                              f"differ)")


def _absolute(paths) -> list[str]:
    """Paths as config.toml records them (``config.user_path``), so that the same ones compare equal."""
    from fuyou.config import user_path

    paths = [paths] if isinstance(paths, str) else paths
    return [str(user_path(p)) for p in paths]


def load_training_data(cfg: FuyouConfig, resume: bool = False, split: str = "content",
                       vocabulary: dict | None = None):
    """The run's tokens (None: synthetic), checked against the model's vocabulary; with ``train.epochs``,
    ``train.steps`` is set to the steps that make them (before the schedule is read). A resume does not
    refuse what its saved config says of prepared data (``fuyou.data.load_data``). ``vocabulary``: the
    run's record of its data's vocabulary, which the data must share (a resume: ``run_vocabulary``;
    its checkpoint, which ``check_tokenizer`` compares with, is not read again), else filled in with it."""
    data = load_data(cfg.data, check_prepared=not resume, split=split)
    if data is not None:
        check_tokenizer(cfg, data)
        if vocabulary is not None and data.fingerprint:
            check_vocabulary(vocabulary, data, cfg)
            vocabulary.pop("copy", None)
            vocabulary.update(vocabulary=data.fingerprint, tokenizer=data.tokenizer)
        if vocabulary is not None and cfg.data.source == "prepared":
            settings = prepared_settings(cfg.data.path[0])
            check_prepared_settings(vocabulary, settings, cfg)
            if settings is not None:  # (else the run's record stays, for a later resume to compare)
                vocabulary["prepared"] = settings
    if cfg.train.epochs is not None:  # the steps that make the epochs, from the data
        from fuyou.data.batches import make_batches

        t = cfg.train
        sampler, _ = make_batches(cfg, data, quiet=True)
        per_step = t.micro_batch_size * t.grad_accum
        object.__setattr__(t, "steps", sampler.steps_for(t.epochs, per_step))
        drawn = t.steps * per_step / sampler.per_epoch()
        if drawn > 1.25 * t.epochs and distributed.current().is_main:  # a step larger than the data asked for
            print(f"note: train.epochs={t.epochs} of {sampler.per_epoch():.0f} sequences at {per_step} a step rounds "
                  f"up to {t.steps} step(s), which draw {drawn:.2f} epochs"
                  f"{' (sequences repeat)' if drawn > 1 else ''}; lower train.micro_batch_size or train.grad_accum "
                  f"for closer to {t.epochs}", file=sys.stderr)
    return data


def run_training(cfg: FuyouConfig, stream=None, trace: str | Path | None = None, plan_auto: bool = False,
                 resume: Path | None = None) -> RunResult:
    """Train ``cfg`` in a new run directory, or continue the run in ``resume`` from its last commit."""
    if cfg.run.tensorboard and not tensorboard_available():
        raise ConfigError("run.tensorboard=true needs the tensorboard package: pip install 'fuyou[tensorboard]'")
    check_wandb(cfg.run.wandb)  # (rank 0, which logs; a refusal there ends the others: torchrun stops the group)
    from fuyou.planner.hardware import check_names

    saved_raw = read_toml(Path(resume) / "config.toml") if resume is not None else {}  # the run's config as written

    def saved_section(name: str) -> dict:
        return saved_raw.get(name) if isinstance(saved_raw.get(name), dict) else {}

    try:
        check_names(cfg.hardware)  # (the summary's wear and --plan auto read them)
    except ConfigError as e:
        saved = saved_section("hardware")
        if all(saved.get(k) != getattr(cfg.hardware, k) for k in ("gpu", "ssd", "pcie")
               if getattr(cfg.hardware, k) is not None):
            raise  # (a name this resume gave)
        # (a preset a later fuyou renamed or dropped: the run's own config.toml names it, and the resume can replace it)
        raise ConfigError(f"{e} (the run's config.toml names it: resume with hardware.gpu=, hardware.ssd= or "
                          f"hardware.pcie= set to a known one, or to none)") from None
    off = cfg.offload
    if off.keep_state and off.commit == "none" and off.mode == "ssd" and resume is None:
        # (49 MB kept that --resume then refused: a pass; a new run only, a resume of one says what it can do)
        raise ConfigError("offload.keep_state=true keeps the SSD state for a resume or an export, and "
                          "offload.commit=none writes no commit for either: the state kept could not be used; "
                          "give one of them")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    resumed_run = None
    if resume is not None:  # its id (a run from before ids: its directory's name)
        rid = run_id(Path(resume))
        resumed_run = f"run id {rid}" if rid else f"{Path(resume).name} (a run without an id)"
    if resume is not None and cfg.offload.mode == "ssd":
        _refuse_live(Path(resume), cfg)
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
    # the run's id (fuyou-run.json), which its SSD state's owner file records (``_claim_state``): rank 0's, given
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
    saved_off = saved_section("offload")
    # (the run's own settings: an override of them is a change a resume refuses, not a run without state: the review)
    if resume is not None and (saved_off.get("mode", cfg.offload.mode) != "ssd"
                               or saved_off.get("commit", cfg.offload.commit) == "none"):
        from fuyou.snapshots import snapshot_dirs

        lora = int(saved_section("lora").get("rank", cfg.lora.rank) or 0) > 0  # (a LoRA run saves adapters)
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
    changed = None
    if resume is not None:  # refuses what a resume cannot change, before the state is opened
        from fuyou.config import load_config

        # the saved config as it was, but over this resume's SSD directories and data files (the saved
        # ones may have moved: validating them would refuse the resume that names their new place)
        dirs = {"offload.ssd_dirs": list(cfg.offload.ssd_dirs), "data.path": list(cfg.data.path),
                "data.eval_path": list(cfg.data.eval_path)}
        # (model.init_from is not compared, and the checkpoint it names may be gone: the shape is in the file)
        try:
            saved_cfg = load_config(run_path / "config.toml", flags={**dirs, "model.init_from": None})
        except ConfigError as e:  # (one an earlier fuyou took, such as commit_every='0s': the override did not mend it)
            raise ConfigError(f"{run_path / 'config.toml'}, the run's config as it was, is not valid now: {e}. Edit "
                              f"those values there (to the run's own, where a resume cannot change them) and resume"
                              ) from None
        changed = resume_changes(saved_cfg, cfg)
        for key in dirs:
            section, field = key.split(".")
            saved_paths = saved_section(section).get(field)
            if saved_paths is not None and _absolute(saved_paths) != _absolute(dirs[key]):
                changed[key] = ([saved_paths] if isinstance(saved_paths, str) else list(saved_paths), dirs[key])
                if key == "data.eval_path" and bool(saved_paths) != bool(dirs[key]) and cfg.data.val_fraction and \
                        cfg.data.source != "synthetic":  # (a pass: the held-out examples were trained on)
                    swap = "held out would be trained on" if dirs[key] else "trained on would be held out"
                    raise ConfigError(f"a resumed run cannot {'add' if dirs[key] else 'drop'} data.eval_path: "
                                      f"without it data.val_fraction holds examples of the data out, so the "
                                      f"run's training examples and held-out set would change (examples {swap}). "
                                      f"Resume as the run started, or start a new run from its weights")
    if resume is not None:
        _refuse_finished(run_path, cfg, dist)
        _refuse_renamed(run_path, cfg)
        _refuse_others_state(cfg, run_path, recorded)
        _refuse_unlike_commit(cfg, run_path)
    if dist.is_main:
        _note_budget_beyond_memory(cfg, stream or sys.stderr, dist.local_world)
    space = None
    if dist.is_main:  # (rank 0 saves; its refusal reaches every rank, none waits on it: ``Dist.broadcast``)
        try:
            _check_run_dir_space(cfg, run_path)
        except FuyouError as e:
            space = e
    dist.broadcast(space, "checking the run directory's disk", started=False)
    # refuses impossible configs (and unresumable states) before anything is written
    split = "content"
    if resume is not None:  # (every rank reads the run directory, as its id above; rank 0's decides)
        split = dist.broadcast(run_split(run_path) if dist.is_main else None, "agreeing on the held-out examples")
    if resume is None:
        _agree_on_sources(cfg, dist)
    vocabulary = run_vocabulary(run_path) if resume is not None else {}  # (filled in as the data loads)
    trainer = build_trainer(cfg, run_path.name, resume=resume is not None, split=split, vocabulary=vocabulary)
    if resume is not None and dist.is_main and recorded is None:
        write_run_id(run_path, rid)
    _claim_state(trainer, run_path, rid)
    if resume is not None and dist.is_main:
        from fuyou.train.run import set_aside_later_snapshots

        moved, dropped = set_aside_later_snapshots(run_path, trainer.start_step)
        if moved or dropped:
            print(f"fuyou: note: {len(moved) + len(dropped)} snapshot(s) after step {trainer.start_step}, the commit "
                  f"this resume starts from, belong to the steps it redoes: "
                  + "; ".join(([f"renamed {', '.join(p.name for p in moved)}"] if moved else [])
                              + ([f"deleted {', '.join(p.name for p in dropped)} (the same as the abandoned "
                                  f"snapshot of its step kept already)"] if dropped else [])),
                  file=sys.stderr)
    if resume is not None:  # the data as the run recorded it, and now (with train.epochs: after the loader)
        data_then = recorded_data(run_path)
        data_now = data_fingerprint(cfg, like=data_then)
        data_moved = data_then is not None and data_then["files"] != data_now["files"]
    if resume is not None and trainer.start_step > cfg.train.steps:
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
    if changed is not None:  # data that changed under the run: its batches, epochs and held-out set follow it
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
    if changed is not None and dist.is_main:
        then_data = changed.get("data.path", [cfg.data.path])[0] or []
        then_eval = changed.get("data.eval_path", [cfg.data.eval_path])[0] or []
        # "old -> new" by position within each list of the same length (else an eval file showed as renamed)
        then_paths = ([*then_data, *then_eval] if len(then_data) == len(cfg.data.path) and
                      len(then_eval) == len(cfg.data.eval_path) else None)
        before = record_resume(run_path, cfg, trainer.start_step, changed)
        record_data(run_path, cfg, data_now, split, vocabulary)
        if changed:
            print("resumed with changes (recorded in resumes.jsonl; config.toml is now the effective config): "
                  + ", ".join(_data_files_change(cfg, a, b, split, then_paths)
                              if k == "data files (size, modified)" else f"{k} {a!r} -> {b!r}"
                              for k, (a, b) in changed.items()), file=stream or sys.stderr)
            schedule_note = _schedule_change(load_config(before, ["model.init_from=none"], dirs), cfg,
                                             trainer.start_step, changed, made)
            if schedule_note:
                print(schedule_note, file=stream or sys.stderr)
            if data_moved and trainer.start_step:  # (the epoch field went back, unexplained: a pass)
                from fuyou.data.examples import ExampleSampler

                seen = _seen(trainer, cfg, trainer.start_step).get("epoch")
                order = ("the examples' order is drawn over the changed data, so in the pass under way some are read "
                         "once more or once less than the others" if isinstance(trainer.batches, ExampleSampler) else
                         "its windows are drawn at random over the changed data")
                print(f"note: the run's place in its data is a count of batches ({trainer.start_step} steps'): it "
                      f"goes on at that count in the changed data"
                      + (f", epoch {seen:.3g} of it (metrics.jsonl's epoch counts the changed data from here on); "
                         f"{order}" if seen is not None else ""), file=stream or sys.stderr)
    if cfg.data.seq_len > cfg.model.max_seq_len and cfg.model.family == "llama" and resume is None and dist.is_main:
        print(f"note: data.seq_len={cfg.data.seq_len} is beyond the model's {cfg.model.max_seq_len} positions "
              f"(model.max_seq_len): RoPE extends past them, but a pretrained model was not trained there",
              file=stream or sys.stderr)
    from fuyou.hf.config_map import unexportable

    if unexportable(cfg.model) and resume is None and dist.is_main:
        print(f"note: {unexportable(cfg.model)}: this model trains, but `fuyou export` cannot write it for "
              f"transformers", file=stream or sys.stderr)
    ignored = _offload_ignored_in_memory(cfg)
    if ignored and dist.is_main:
        one = len(ignored) == 1
        print(f"note: {', '.join(ignored)} {'applies' if one else 'apply'} to SSD offload (--offload ssd) and "
              f"{'is' if one else 'are'} ignored in memory (offload.mode=none): the whole training state is held, "
              f"and a model that does not fit the machine is refused", file=stream or sys.stderr)
    if cfg.lora.enabled and not cfg.model.init_from and resume is None and dist.is_main:
        print(f"note: LoRA over a base drawn at random (train.seed={cfg.train.seed}; no --init-from): the adapters "
              f"learn to correct noise, which suits a test, not a fine-tune; give --init-from HF_DIR for a "
              f"pretrained base", file=stream or sys.stderr)
    if (cfg.optim.master == "bf16" and cfg.train.precision == "fp32" and cfg.offload.mode == "ssd" and resume is None
            and dist.is_main):
        print("note: optim.master=bf16 with train.precision=fp32: every update rounds the weights to bf16, but they "
              "are computed in fp32 from a separate fp32 copy (4 B a parameter more to store and stream); with "
              "train.precision=bf16 the bf16 master is the compute weights", file=stream or sys.stderr)
    t = cfg.train
    if cfg.offload.mode == "none" and not cfg.run.save_weights and resume is None and dist.is_main:
        # (the weights were dropped without a word, and export then said to export a finished run: a pass)
        print("note: run.save_weights=false in memory: the final weights are kept nowhere (no SSD state either)"
              + ("; only the snapshots of train.save_every before the last step are" if t.save_every else "")
              + "; leave run.save_weights on to keep them", file=stream or sys.stderr)
    if resume is None and dist.is_main and t.lr_schedule != "constant" and t.warmup >= t.steps > 1:
        # (a 10-step run warmed up to its last step at the peak, cosine and min_lr_ratio unused, unsaid: a pass)
        given = "train.warmup_ratio" if t.warmup_ratio is not None else "train.warmup_steps"
        print(f"note: the warm-up ({t.warmup} steps, {given}) covers all {t.steps} steps: the learning rate rises "
              f"to optim.lr and never decays (train.lr_schedule={t.lr_schedule} does not apply); give fewer warm-up "
              f"steps for a schedule", file=stream or sys.stderr)
    _note_torchrun_shutdown(trainer, dist, stream or sys.stderr)
    stop = _StopOnSignal()
    stop.commits = cfg.offload.mode == "ssd" and cfg.offload.commit != "none"  # (in memory it said "commit intact")
    try:
        if resume is not None:
            run_dir = run_path
        else:
            made: Path | ConfigError = run_path
            committed = getattr(trainer, "last_commit_step", None) is not None  # step 0's, on every rank
            if dist.is_main:
                existed = run_path.exists()  # (--plan auto's, with its profile and policy)
                try:  # the directory and every record a resume reads, before the others hear of it
                    made = make_run_dir(cfg, run_path, rid)
                    _record_run(made, cfg, vocabulary, dist)
                    fault("run_dir")  # tests: rank 0 killed once its run directory is whole, before it says so
                except ConfigError as e:
                    made = e
                except (FuyouError, OSError) as e:  # (a full disk: the others waited out the collective's timeout)
                    made = ConfigError(f"making the run directory {run_path} failed: "
                                       f"{(e.strerror or e) if isinstance(e, OSError) else e}")
                    if not existed:  # half made, it named a resume of the state this refusal removes (a review)
                        shutil.rmtree(run_path, ignore_errors=True)
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
    if cfg.lora.enabled:
        from fuyou.hf.peft import record_base

        record_base(run_dir)  # export --merge checks the base is still the one trained over
    if dist.enabled:
        distributed.record_world(run_dir, dist)


def _check_run_dir_space(cfg: FuyouConfig, run_path: Path) -> None:
    """The run directory's disk must hold the weights the run saves: model.safetensors (fp32, 4 B a parameter) and,
    with train.save_every, up to train.keep_snapshots snapshots of the same size. A snapshot is written and then the
    oldest beyond the kept number deleted, and the final weights are written beside the kept snapshots: the most
    held at once is min(snapshots made, kept) + 1 copies (a resume: less the snapshots there already, which count
    among them; its model.safetensors, if any, is rewritten beside itself and not counted off). An in-memory run
    whose disk filled up lost its trained weights at the very end (a pass); it is refused before any work, with the
    numbers. (LoRA saves only its small adapters: not checked.)"""
    import shutil

    from fuyou.models import StageModel
    from fuyou.snapshots import snapshot_dirs

    if cfg.lora.enabled or not cfg.run.save_weights:
        return
    model = StageModel(cfg.model)
    if cfg.offload.mode == "none":  # a model that cannot be trained in memory at all says so first
        from fuyou.train.reference import check_in_memory_fits, resolve_device

        check_in_memory_fits(cfg, model, resolve_device(cfg.train.device))
    # a copy: the tensors, the safetensors header (~200 B a tensor), a snapshot's config.toml, the blocks they
    # round up to (a run let through by a few KiB failed at its save: a pass)
    size = 4 * model.num_params + 256 * len(model.param_specs()) + 64 * 1024
    t = cfg.train
    snapshots = 0
    if t.save_every and t.epochs is None:  # (with train.epochs the steps are known only once the data is read: a
        # snapshot that then does not fit is a warning, and training goes on; the final weights are checked)
        snapshots = min((t.steps - 1) // t.save_every, t.keep_snapshots)
    here = run_path if run_path.exists() else next((q for q in run_path.parents if q.exists()), Path("."))
    held = sum(p.stat().st_size for d in snapshot_dirs(run_path / "snapshots")[-t.keep_snapshots:]
               for p in [d / "model.safetensors"] if p.is_file())
    need = (1 + snapshots) * size - held + 2**20  # (and the metrics and event files, as they grow)
    try:
        usage = shutil.disk_usage(here)
    except OSError:
        return
    free = usage.free
    if need > free and usage.total > 0:  # (total 0: a file system that reports no capacity, ramfs: not judged)
        kept = (f" and up to {snapshots} snapshot{'s' if snapshots != 1 else ''} of {format_size(size)} each "
                f"(train.save_every={t.save_every}, train.keep_snapshots={t.keep_snapshots})" if snapshots else "")
        raise ConfigError(f"the run directory's disk ({here}) has {format_size(free)} free, and the run writes up to "
                          f"{format_size(need)} more there: model.safetensors ({format_size(size)}, 4 B a parameter "
                          f"and its header), the logs"
                          f"{kept}. Free space, choose another run.out_dir (--out)"
                          + (", or lower train.keep_snapshots or raise train.save_every" if snapshots else ""))


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


def check_tokenizer(cfg: FuyouConfig, data) -> None:
    """Data tokenized with another vocabulary than the model's trains silently into nonsense: when the
    model starts from a checkpoint with a tokenizer, the data must have been made with that tokenizer
    (the same vocabulary, compared by fingerprint: ``fuyou.data.tokenizer``)."""
    if not cfg.model.init_from:
        return
    from fuyou.hf.source import tokenizer_dir

    tok_dir = tokenizer_dir(cfg.model.init_from)
    if tok_dir is None or data.tokenizer == f"hf:{tok_dir}":
        return
    if data.tokenizer == "byte":
        how = (f"prepare the data again with it (`fuyou data prepare ... --tokenizer {tok_dir}`)"
               if cfg.data.source == "prepared" else
               f"leave data.tokenizer at 'auto' (the model's tokenizer), or prepare the data with it (`fuyou data "
               f"prepare ... --tokenizer {tok_dir}`)")
        raise DataError(f"the data was tokenized byte by byte, but model.init_from={cfg.model.init_from} was trained "
                        f"with the tokenizer in {tok_dir}; {how}")
    from fuyou.data.tokenizer import HFTokenizer

    ours = HFTokenizer(tok_dir)
    want = ours.fingerprint
    if data.fingerprint != want:
        raise DataError(f"the data was tokenized with {data.tokenizer} (vocabulary {data.fingerprint or 'unknown'}), "
                        f"but model.init_from={cfg.model.init_from} uses the tokenizer in {tok_dir} (vocabulary "
                        f"{want}); " + (f"prepare the data again with --tokenizer {tok_dir}" if cfg.data.source ==
                                        "prepared" else "leave data.tokenizer at 'auto' (the model's tokenizer)"))
    theirs = Path(data.tokenizer.removeprefix("hf:"))  # the same vocabulary: another chat template is said (a pass)
    if data.tokenizer.startswith("hf:") and theirs.is_dir() and distributed.current().is_main:
        other = HFTokenizer(theirs)
        if (ours.chat_template, ours.eos_id) != (other.chat_template, other.eos_id):
            what = " and ".join(w for w, differ in (("chat template", ours.chat_template != other.chat_template),
                                                   ("EOS token", ours.eos_id != other.eos_id)) if differ)
            verb = "differ" if " and " in what else "differs"
            print(f"fuyou: note: the data was tokenized with {theirs}, whose {what} {verb} from the tokenizer of "
                  f"model.init_from ({tok_dir}): the model learns {theirs}'s, and `fuyou export` carries its files",
                  file=sys.stderr)


def check_vocabulary(run: dict, data, cfg: FuyouConfig) -> None:
    """A resume's data must have the vocabulary the run trained on (``run``: ``run_vocabulary``): data
    prepared again with another tokenizer at the same path, or another data.tokenizer, trained the model on
    token ids that mean other text, and its export shipped the first tokenizer with it (a new-user pass;
    a resume reads no checkpoint, so ``check_tokenizer`` had nothing to compare with)."""
    if not run.get("vocabulary") or run["vocabulary"] == data.fingerprint:
        return
    if data.tokenizer == run.get("tokenizer"):  # the same place, another vocabulary: nothing to name but that
        raise DataError(f"the tokenizer {data.tokenizer.removeprefix('hf:')} has another vocabulary now "
                        f"({data.fingerprint}) than when this run started ({run['vocabulary']}): replaced or edited "
                        f"since? Give the run the tokenizer it trained with (data.tokenizer="
                        f"{run.get('copy', 'DIR')}{': the copy the run keeps' if 'copy' in run else ''}), or start a "
                        f"new run from its weights; nothing was changed")
    how = (f"prepare the data again with the run's tokenizer (`fuyou data prepare ... --tokenizer "
           f"{run['tokenizer'].removeprefix('hf:')}`)" if cfg.data.source == "prepared" else
           f"resume with the run's own data.tokenizer ({run['tokenizer'].removeprefix('hf:')})")
    raise DataError(f"the data was tokenized with {data.tokenizer} (vocabulary {data.fingerprint}), but this run "
                    f"trained on data tokenized with {run['tokenizer']} (vocabulary {run['vocabulary']}): its token "
                    f"ids would mean other text to the model. {how[0].upper() + how[1:]}, or start a new run from its "
                    f"weights; nothing was changed")


def _refuse_renamed(run_path: Path, cfg: FuyouConfig) -> None:
    """A run's state is found by its directory's name: a renamed run directory finds none. When the SSD
    directory holds states whose run directory is gone, name them and how to resume (the store's own
    error said the state was never committed, deleted or moved)."""
    from fuyou.engine.state import read_owner

    if cfg.offload.mode != "ssd" or not cfg.offload.ssd_dirs:
        return
    ssd = Path(cfg.offload.ssd_dirs[0])
    if any(ssd.glob(state_name(run_path.name) + "*")):  # (data parallel: a rank's is ...fuyou-state.rankR)
        return
    orphans = []
    for d in sorted(ssd.glob("*" + STATE_SUFFIX)):
        owner = read_owner(d)
        if owner is not None and not Path(owner).exists():
            orphans.append(f"{d.name} (of {owner})")
    if orphans:
        raise ConfigError(f"{ssd} holds no state of a run named {run_path.name!r}: fuyou finds a run's SSD state by "
                          f"its directory's name. States there whose run directory is gone: {', '.join(orphans[:5])}. "
                          f"If {run_path} is one of those runs, renamed, give it its old name back and resume it; "
                          f"nothing was changed")


def _refuse_renamed_by_id(run_path: Path, cfg: FuyouConfig) -> None:
    """This run's kept state under the name the run directory had: its owner file records this run's id."""
    from fuyou.engine.state import owner_record

    rid = run_id(run_path)
    if rid is None:
        return
    for d in sorted(Path(cfg.offload.ssd_dirs[0]).glob("*" + STATE_SUFFIX)):
        if owner_record(d).get("run_id") == rid and d.name != state_name(run_path.name):  # (not its own: a rank's
            # left beside another's removed, ``_refuse_finished``)
            raise ConfigError(f"{run_path}'s SSD state is {d} (the run directory was named "
                              f"{d.name[:-len(STATE_SUFFIX)]!r}): fuyou finds a run's state by its directory's name; "
                              f"give it its old name back and resume it; nothing was changed")


def _state_dirs(cfg: FuyouConfig, run_name: str) -> list[Path]:
    """This rank's SSD state directories, as the engine names them (``build_trainer``)."""
    dist = distributed.current()
    if cfg.offload.mode != "ssd":
        return []
    name = dist.store_name(state_name(run_name))
    return [Path(d) / name for d in dist.rank_config(cfg).offload.ssd_dirs]


def _refuse_others_state(cfg: FuyouConfig, run_path: Path, rid: str | None) -> None:
    """A resume refuses another run directory's state (two runs of one run.name in different run.out_dir
    share a state directory; a new-user pass found one resuming the other's weights in silence), before
    the state is opened: opening it for a resume rebuilds the compute weights in the store. ``rid``: the id
    the run directory records (None: a run from before ids)."""
    from fuyou.engine.state import owner_mismatch

    dirs = _state_dirs(cfg, run_path.name)
    other = owner_mismatch(dirs[0], run_path, rid) if dirs and dirs[0].is_dir() else None
    if other is not None:
        where = (f"Resume {other}" if Path(other).is_dir() else
                 "That run's directory is no longer there (moved? resume it where it is now)")
        raise ConfigError(f"the SSD state {dirs[0]} is the state of another run named {run_path.name!r} (the run "
                          f"in {other}), not of {run_path}: both keep their state in {dirs[0].parent}. {where}, or "
                          f"give this run's directory back its own state; nothing was changed")


def _refuse_unlike_commit(cfg: FuyouConfig, run_path: Path) -> None:
    """The settings a resume may not change, against those the last commit recorded (``fixed_settings``):
    the check against config.toml (``resume_changes``) misses a config.toml that was edited (a new-user
    pass doubled train.micro_batch_size there and resumed at the wrong place in the data, in silence)."""
    import json

    from fuyou.config import DATA_ORDER, fixed_settings, orders_rows
    from fuyou.engine.commit import RECORD

    dirs = _state_dirs(cfg, run_path.name)
    try:
        then = json.loads((dirs[0] / RECORD).read_text()).get("settings") if dirs else None
    except (OSError, ValueError, AttributeError):
        return  # no record, or a damaged one: opening the state says so
    if not isinstance(then, dict):
        return  # a record written before records kept the settings
    now = fixed_settings(cfg)  # (settings fixed then and now: one freed, or renamed, since is not compared)

    def same(k: str) -> bool:
        if k in DATA_ORDER and not orders_rows(k, cfg):  # (a setting the data does not read)
            return True
        if k == "lora.targets" and cfg.lora.enabled:
            from fuyou.models.lora import same_targets

            return same_targets(cfg.model.family, then[k], now[k])
        return now[k] == then[k]

    diff = [f"{k} = {then[k]!r} (now {now[k]!r})" for k in sorted(then.keys() & now.keys()) if not same(k)]
    if diff:
        raise ConfigError(f"the last commit of {run_path} was made with " + ", ".join(diff) + ", which a resume "
                          f"cannot change (they fix the committed state's shape or the place in the data); "
                          f"{run_path / 'config.toml'} was edited since? Put the committed values back there and "
                          f"resume; nothing was changed")


def _claim_state(trainer, run_path: Path, rid: str) -> None:
    """Every run records itself, and its id, as its SSD state's owner (``_refuse_others_state``)."""
    from fuyou.engine.state import write_owner

    for d in getattr(trainer, "store_dirs", None) or []:  # in memory: no SSD state
        if d.is_dir():
            write_owner(d, run_path, rid)


def _stop_status(name: str) -> int:
    """The exit status of a run stopped by signal ``name`` (128 + its number; every rank has the signal's name,
    ``_StopOnSignal.agree``)."""
    return 128 + signal.Signals[name].value


class _StopOnSignal:
    """SIGINT/SIGTERM/SIGHUP end the run at the next step boundary (after its commit), not mid-step."""

    REPEAT_S = 0.5  # the same signal again within this: the first one delivered twice, not a second request

    def __init__(self):
        self.requested: str | None = None
        self.from_other = False  # requested by another rank's signal (``agree``): this rank's own copy is that stop
        self.origin = ""  # " on another rank" where it was (the messages')
        self._own: str | None = None  # the signal that reached this process first (``requested`` may be agreed)
        self.commits = True  # whether the run commits a resumable state (the second signal's words)
        self._at = 0.0
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the ssh session dropped
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.from_other:  # this rank's own copy of the stop the ranks agreed on (a review: it exited at once,
            # without the stop's commit, where signals reach each process apart, as Slurm's)
            self.from_other, self._own, self._at = False, name, time.monotonic()
            os.write(2, f"fuyou: {name}: the stop under way, from another rank\n".encode())
            return
        torchrun = self.requested is not None and name == "SIGTERM" and "TORCHELASTIC_RUN_ID" in os.environ
        repeat = torchrun or (name == self._own and time.monotonic() - self._at < self.REPEAT_S)
        if repeat:
            # one stop reaching the process twice: a signal to the process group or cgroup (systemd, Slurm's
            # scancel, `timeout`, kill -TERM -PGID) that torchrun forwards again (a hostile pass lost the stop's
            # commit). The window counts from when Python runs the handler, which a long C call delays (a review).
            # Under torchrun any SIGTERM after a stop is the same stop: torchrun passes a stop on, and a second
            # one that reaches it (`timeout` forwarding a Ctrl-C to it, two SIGHUPs of a dropped session) it
            # passes on as SIGTERM at once (a pass lost the commit so); SIGKILL, or Ctrl-C again, ends it now.
            os.write(2, (f"fuyou: {name} again: taken as the same stop\n" if name == self._own else
                         f"fuyou: {name} after {self.requested}: taken as the same stop (torchrun passing it on)\n"
                         ).encode())
            return
        if self.requested is not None:
            # A second signal ends the process now, whatever it waits for: the last commit on the SSD
            # is the state of record (atomic), so nothing committed is lost.
            os.write(2, b"\nfuyou: second signal, exiting now; " + (
                b"the last commit is intact (--resume continues)\n" if self.commits else
                b"this run commits no state: what it trained since its last snapshot is lost\n"))
            os._exit(128 + signum)
        self.requested, self._own, self._at = name, name, time.monotonic()
        os.write(2, f"\nfuyou: {self.requested}: stopping at the end of this step (an evaluation under way "
                    f"is abandoned after its batch), with a commit of it (SSD offload) or a snapshot (in memory, or "
                    f"offload.commit=none); a second signal (after {self.REPEAT_S:g} s) exits at once\n".encode())

    def agree(self, dist: distributed.Dist, what: str) -> bool:
        """Whether any rank was asked to stop, on every rank at the same point; a rank that was not takes the
        signal's name (the largest number among the ranks'), so the ranks report the same stop and exit with
        the same status (an unsignalled rank said "a stop on another rank" and exited with SIGTERM's, which
        torchrun then named the root cause: a pass)."""
        mine = 0 if self.requested is None else signal.Signals[self.requested].value
        top = dist.reduce_ints([mine], what, op="max")[0] if dist.enabled else mine
        if top and self.requested is None:
            self.requested, self.from_other, self.origin = signal.Signals(top).name, True, " on another rank"
        elif top and top != mine:  # ranks that got different signals: all take the largest (a review)
            self.requested = signal.Signals(top).name
        return bool(top)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _wear(cfg: FuyouConfig, written: int, commit_written: int, commits: int, steps_run: int,
          step_s: float, read: int = 0) -> dict:
    """The SSD writes of a step at the run's commit cadence, the planner's model (planner.report._wear): the
    steps' own writes plus one commit's amortized over the steps between commits; per hour of the steps' own
    time (evaluations write nothing to the state); and what this run wrote in all. A short run's final commit
    is one commit of the cadence, not a share of each step: a 4-step run said 9.5 MiB a step, 0.023 TB an
    hour, where its steps wrote nothing and a long run writes the resident state once every 10min."""
    off = cfg.offload
    mean_step = max(step_s, 1e-9) / steps_run
    per_commit = commit_written / commits if commits else 0.0
    every = float(off.steps_per_commit(mean_step)) if off.commit == "cow" and commits else None
    own = max(0, written - commit_written) / steps_run
    per_step = own + (per_commit / every if every else 0.0)
    return {"ssd_write_per_step_bytes": per_step, "ssd_write_per_hour_bytes": per_step * 3600 / mean_step,
            "ssd_step_write_bytes": own, "ssd_commit_bytes": per_commit, "steps_per_commit": every,
            "ssd_written_bytes": written, "ssd_step_read_bytes": read / steps_run}  # (`fuyou plan`'s traffic)


def _wear_parts(cfg: FuyouConfig, wear: dict) -> str:
    """What the summary's bytes a step are made of."""
    own = f"the steps' own {format_size(wear['ssd_step_write_bytes'])}"
    every = wear["steps_per_commit"]
    if every is None:
        return own + (", no commits (offload.commit=none)" if cfg.offload.commit != "cow" else "")
    steps = f"{every:,.0f} step{'s' if round(every) != 1 else ''}"
    cadence = (f"every {steps}" if cfg.offload.commit_steps is not None
               else f"every {cfg.offload.commit_every}, {steps} at this run's pace")
    if not wear["ssd_commit_bytes"]:
        return f"{own}; its commits, {cadence}, write no state: none is held in CPU memory"
    return f"{own} + a commit's {format_size(wear['ssd_commit_bytes'])} {cadence}"


def _endurance(cfg: FuyouConfig) -> tuple[float, str] | None:
    """Rated bytes the run's drives may write, counted as the planner does: hardware.ssd_tbw (per drive) or
    the hardware.ssd preset's endurance, times the preset's drive count (else the number of SSD
    directories); and how the drives were counted, for the summary."""
    hw = cfg.hardware
    devices = set()
    for d in cfg.offload.ssd_dirs:  # (two directories on one drive are one drive: a pass saw its life doubled)
        try:
            devices.add(os.stat(d).st_dev)
        except OSError:
            devices.add(d)
    dirs = max(1, len(devices))
    n, drive, how = dirs, {}, f"{dirs} drive{'s' if dirs > 1 else ''}: one per file system of the SSD directories"
    if hw.ssd:
        from fuyou.planner.hardware import _ssd_preset

        try:
            n, drive = _ssd_preset(hw.ssd)
        except Exception:  # noqa: BLE001 -- a bad preset is the planner's error to report, not the summary's
            return None
        how = f"{n} drive{'s' if n > 1 else ''}: hardware.ssd={hw.ssd}"
        if n != dirs:
            how += (f", not one per file system of the SSD directories ({dirs}; a preset such as "
                    f"{dirs}x{hw.ssd.split('x')[-1]} counts so)")
    per_drive = hw.ssd_tbw * 1e12 if hw.ssd_tbw else drive.get("tbw")
    return (per_drive * n, how) if per_drive else None


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
                     exit_status=_stop_status(stop.requested))


def _refuse_live(run_dir: Path, cfg: FuyouConfig) -> None:
    """A run whose state a process still holds (it is training) is refused as in use, before the process count
    is checked: a resume with another count was advised to reshard, which then refused the state as locked (a
    pass). Every rank's state (``distributed.json``'s world size)."""
    from fuyou.store.lock import holder_task
    from fuyou.train.run import state_holder

    held = state_holder(run_dir, cfg.offload.ssd_dirs)
    if held is None:
        return
    state, holder = held
    task = holder_task(holder)
    if task != "training":
        raise ConfigError(f"{run_dir}'s state in {state} is in use by process {holder}, {task} it; wait for it to "
                          f"end, then " + ("run the resume it names (for the processes it reshards the run for)"
                                           if task == "resharding" else "resume the run"))
    raise ConfigError(f"{run_dir} is still training: its state in {state} is in use by process {holder}; wait for "
                      f"it to end or stop it, then resume it")


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
        f"{trainer.device}, {mode}, {data}, {t.precision}, {t.steps} step{'s' if t.steps != 1 else ''} of "
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
    tokens = written = read = commit_written = commits = 0
    overflow_said = False  # the note that the cpu tier's activations overflowed to the SSD, once a launch
    redone = 0  # steps that redid their updates for exact clipping: their writes are in the step's own bytes
    deferred = 0  # steps that clipped after one that did, their updates waiting for the norm (clip_schedule=auto)
    step_s = 0.0  # the steps' own time (the wear's hours: evaluations and snapshots write nothing to the state)
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
        step_s += dt
        tokens += stats.tokens
        tps = stats.tokens / dt
        record = {
            "step": step + 1, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
            "step_time_s": dt, "tokens_per_s": tps, "tflops": tps * flops_per_token / 1e12,
            "loss_tokens": stats.loss_tokens, **_seen(trainer, cfg, step + 1),
        }
        counters = trainer.step_counters()
        if counters is not None:
            record.update(counters)
            written += counters.get("ssd_write_bytes", 0)
            read += counters.get("ssd_read_bytes", 0)
            commit_written += counters.get("commit_write_bytes", 0)
            commits += counters.get("commits", 0)
            # (a deferred step waited for the norm, and LoRA's adapters clip in memory: neither redoes an update)
            redone += bool(counters.get("clipped")) and not counters.get("deferred") and not cfg.lora.enabled
            deferred += bool(counters.get("clipped")) and bool(counters.get("deferred")) and not cfg.lora.enabled
            # this launch's running totals: a line's own counters are its step's, and the steps between two lines
            # (train.log_every) were in none (a pass summed the lines' commit bytes to a quarter of the summary's)
            record.update(ssd_read_bytes_total=read, ssd_write_bytes_total=written,
                          commit_write_bytes_total=commit_written, commits_total=commits)
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
                return RunResult(run_dir, first_eval, last_eval, stats.loss, tokens / (time.perf_counter() - start),
                                 resident_bytes("VmHWM"), stopped=True,
                             exit_status=_stop_status(stop.requested))
            trainer.commit(step + 1)  # the step's updates and its commit are on the SSD
            log.write({"stopped": stop.requested, "step": step + 1})
            log.close()
            how = distributed.resume_command(run_dir)
            progress.message(f"stopped by {stop.requested}{stop.origin} after step {step + 1} (committed); continue "
                             f"with: {how}")
            return RunResult(run_dir, first_eval, last_eval, stats.loss, tokens / (time.perf_counter() - start),
                             resident_bytes("VmHWM"), stopped=True,
                             exit_status=_stop_status(stop.requested))
    try:
        trainer.commit(t.steps)  # the final state is committed before anything may delete it
    except FuyouError as e:
        said = _save_after_a_failed_final_commit(cfg, trainer, run_dir, dist, t.steps, e)
        if said is None:
            raise
        raise FuyouError(said) from e
    tail = trainer.step_counters()  # what landed after the last step's record: its optimizer tail, this commit
    if tail is not None:
        written += tail.get("ssd_write_bytes", 0)
        read += tail.get("ssd_read_bytes", 0)
        commit_written += tail.get("commit_write_bytes", 0)
        commits += tail.get("commits", 0)
    if dist.enabled:  # a machine's drives and memory serve all its ranks (a pass read rank 0's alone: half the wear);
        # summed before the save, after which a rank may be gone (killed past the save: the run is complete)
        machines = max(1, dist.world // dist.local_world)
        peak_then = resident_bytes("VmHWM")
        shared = resident_bytes("RssShmem")  # the ranks' one weight cache (/dev/shm): in each rank's figure, once
        written, commit_written, read, ranks_peak = (
            v // machines for v in dist.reduce_ints([int(written), int(commit_written), int(read), peak_then - shared],
                                                    "summing the ranks' SSD writes and memory"))
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
    peak = resident_bytes("VmHWM")
    machine_peak = ranks_peak - peak_then + peak if dist.enabled else peak
    steps_run = max(1, t.steps - start_step)
    wear = (_wear(cfg, written, commit_written, commits, steps_run, step_s, read)
            if cfg.offload.mode == "ssd" and ran else {})
    rated = _endurance(cfg)
    tbw, drives = rated if rated else (None, "")
    if wear and tbw:
        wear["ssd_life_hours"] = tbw / wear["ssd_write_per_hour_bytes"] if written else None
    if ran:  # (a second summary of zeros was what a reader of the last one got: a pass)
        # (elapsed and tokens/s are this launch's: a resumed run's summary said "steps": 1900 beside 45 s, a pass)
        log.write({"summary": True, "steps": t.steps, **({"resumed_from": start_step} if start_step else {}),
                   "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed,
                   "peak_rss_bytes": peak, **({"machine_peak_rss_bytes": machine_peak} if dist.enabled else {}),
                   **wear})
    log.close()
    mean_tps = tokens / elapsed
    if not ran:
        more = ("; its state is kept (offload.keep_state): raise train.steps to train on" if cfg.offload.keep_state
                else "")  # (without keep_state the state goes once the weights are saved: no resume is left)
        summary = f"done: no step left to run ({t.steps} committed{more})"
    else:
        done = (f"{t.steps} step{'s' if t.steps != 1 else ''}" if not start_step
                else f"steps {start_step + 1}-{t.steps} of {t.steps}")
        summary = (f"done: {done} in {elapsed:.1f}s, {si(mean_tps)} tokens/s, "
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
                    f"{format_size(wear['ssd_write_per_step_bytes'])} per step ({_wear_parts(cfg, wear)}), "
                    f"{format_decimal(wear['ssd_write_per_hour_bytes'])} per hour ({state}); this run's steps and "
                    f"commits {format_size(wear['ssd_written_bytes'])} in all (the initial state's write not counted)")
        if redone:  # (a short run's figure was above the plan's, with nothing to say why: a pass)
            # (the steps that clipped after it and deferred were not said: "1 of the 4 steps clipped" where all had)
            later = (f", {deferred} more clipped and deferred theirs until the norm was known (their bytes are "
                     f"`fuyou plan`'s traffic of a step after one that clipped)" if deferred else "")
            again = (": what a redo wrote again is in the steps' own bytes (`fuyou plan`'s wear line gives it apart "
                     "from a step's)" if wear["ssd_step_write_bytes"] else "")  # (resident state: a redo writes none)
            summary += (f"; {redone} of the {steps_run} steps clipped and redid {'its' if redone == 1 else 'their'} "
                        f"speculative updates (exact clipping){later}{again}")
        if wear.get("ssd_life_hours"):
            summary += (f"; at this rate the drives' rated {tbw / 1e15:.3g} PB ({drives}) last "
                        f"{wear['ssd_life_hours']:,.0f} hours")
        elif not tbw:
            summary += "; set hardware.ssd (a preset) or hardware.ssd_tbw for how long the drives last"
    progress.message(summary + f"\nrun directory: {run_dir}")
    return RunResult(run_dir, first_eval, last_eval, stats.loss if stats else float("nan"), mean_tps, peak)
