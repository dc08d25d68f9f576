"""Run directories: the resolved config, the metrics log and the final weights."""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path


from fuyou.tomlfile import read_toml
from fuyou.engine.state import write_run_id
from fuyou.snapshots import snapshot_dirs, snapshot_path
from fuyou.config import (DATA_ORDER, DATA_POSITION, FIXED_ON_RESUME, NOT_COMPARED, FuyouConfig, flat_settings,
                          orders_rows, to_toml)
from fuyou.engine.commit import state_name
from fuyou.errors import ConfigError, FuyouError, NameTaken
from fuyou.distributed import WORLD_FILE, rank_state_name, resume_command
from fuyou.hf.weights import write_safetensors


DATA_FILES = "data-files.json"  # the data files a resumable run read, and the steps its epochs made (train.loop)


def recorded_data(run_dir: Path) -> dict | None:
    """The run's ``DATA_FILES`` record; None for a run from before it, or a damaged one: nothing to compare."""
    try:
        return json.loads((run_dir / DATA_FILES).read_text())
    except (OSError, ValueError):
        return None


def taken(path: Path) -> str:
    """Why a new run cannot have ``path``, and what the run there can do: the same command again after a crash
    was told to choose another name, and nothing of the committed state that a resume continues (a pass)."""
    said = f"run directory {path} already exists; choose another run.name"
    if not (path / "config.toml").is_file():
        return said
    where = path.resolve()
    if (path / ADAPTER_FILE).is_file():
        return (f"{said} (it holds a finished LoRA run: `fuyou export {where} --out DIR`, then lora.init_from=DIR "
                f"trains its adapters on)")
    if (path / "model.safetensors").is_file():
        return (f"{said} (it holds a finished run: `fuyou export {where} --out DIR`, or --init-from {where} to train "
                f"on from its weights)")
    try:
        off = read_toml(path / "config.toml").get("offload", {})
    except (OSError, ConfigError):
        off = {}
    resumable = isinstance(off, dict) and off.get("mode") == "ssd" and off.get("commit", "cow") == "cow"
    if resumable and not run_ended(path):
        dirs = off.get("ssd_dirs")
        held = state_holder(path, [str(d) for d in dirs] if isinstance(dirs, list) else [])
        if held is not None:  # (it named the resume of a run still training, which is refused: a pass)
            from fuyou.store.lock import holder_task

            holder = held[1]
            task = holder_task(holder)
            if task != "training":
                return (f"{said}: process {holder} is {task} the run it holds; once it ends, continue that run with "
                        f"`{resume_command(where)}`" + (" (or the resume the reshard names)" if task == "resharding"
                                                        else ""))
            return (f"{said}: it holds a run that is still training (process {holder}); wait for it to end, or stop "
                    f"it (Ctrl-C commits and stops) and continue it with `{resume_command(where)}`")
        return (f"{said}, or continue the run it holds, which did not finish: `{resume_command(where)}` (from its "
                f"last commit)")
    return (f"{said} (the run it holds ended, or keeps no resumable state: in memory or offload.commit=none; its "
            f"snapshots, if any, are in {where / 'snapshots'})")


def state_holder(run_dir: Path, ssd_dirs: list[str]) -> tuple[Path, str] | None:
    """A state directory of the run in ``run_dir`` that a process holds (training it, or reading it: ``holder_task``),
    and that process's PID; None when none is held. Every rank's state (``distributed.json``'s world size), in the
    directories ``ssd_dirs``."""
    from fuyou.store.lock import lock_holder

    try:
        world = int(json.loads((run_dir / WORLD_FILE).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        world = 1
    for r in range(world):
        states = [Path(d) / rank_state_name(state_name(run_dir.name), r) for d in ssd_dirs]
        if not any(s.is_dir() for s in states):
            break  # (no further rank's state: a damaged world size is not probed on)
        for state in states:
            holder = lock_holder(state)
            if holder:
                return state, holder
    return None


def run_ended(path: Path) -> bool:
    """The run's last launch finished (its metrics' summary, after any stop)."""
    last = None
    try:
        for line in (path / "metrics.jsonl").read_text().splitlines():
            if '"summary"' in line or '"stopped"' in line:
                last = line
    except OSError:
        return False
    return last is not None and '"summary"' in last


def run_dir_path(cfg: FuyouConfig) -> Path:
    """The directory this run will write to (not created yet). Never an existing one."""
    parent = Path(cfg.run.out_dir)
    name = cfg.run.name or f"{cfg.model.preset or cfg.model.family}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = parent / name
    if cfg.run.name is not None:
        if path.exists():
            raise ConfigError(taken(path))
        return path
    n = 1
    while path.exists():
        n += 1
        path = parent / f"{name}-{n}"
    return path


def next_free_name(cfg: FuyouConfig, path: Path) -> tuple[Path, Path | None]:
    """After ``path``, a name drawn from the time that another run took (``NameTaken``: started in the same
    second), the next of ``run_dir_path``'s numbered names that no run directory in run.out_dir and no SSD
    state has. Numbered from the name the runs drew (a second drawn later could be theirs too), and an SSD
    run's name is claimed: its state directory is made, empty, at once (``mkdir`` is atomic), so runs retrying
    at once take one number each (unclaimed, they met again at each number, and loaded their data each time:
    a review). Returns the name and the claim (None in memory); the caller removes the claim, empty, if the run
    stops before its state is made there."""
    m = re.fullmatch(r"(.*-\d{8}-\d{6})(?:-(\d+))?", path.name)
    base, n = (m.group(1), int(m.group(2) or 1)) if m else (path.name, 1)
    ssd = cfg.offload.ssd_dirs if cfg.offload.mode == "ssd" else []
    while True:
        n += 1
        path = path.parent / f"{base}-{n}"
        if path.exists() or any(any(Path(d).glob(state_name(path.name) + "*")) for d in ssd):
            continue
        if not ssd:
            return path, None
        claim = Path(ssd[0]) / state_name(path.name)
        try:
            claim.mkdir()
            return path, claim
        except FileExistsError:  # another run claimed it since the look above
            continue


def _blocking(path: Path) -> str | None:
    """What stops ``path`` (or a directory above it) from being made: a link to nothing, or a file; None: nothing
    of that (another run made it, and may have removed it again)."""
    for q in [*reversed(path.parents), path]:
        if q.is_symlink() and not q.exists():
            return f"{q} is a link to {os.readlink(q)}, which does not exist"
        if q.exists() and not q.is_dir():
            return f"{q} is a file, not a directory"
    return None


def make_run_dir(cfg: FuyouConfig, path: Path | None = None, rid: str | None = None) -> Path:
    """Create the run directory and write the resolved config and the run's id ``rid`` into it."""
    path = path or run_dir_path(cfg)
    try:
        path.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        blocked = _blocking(path) if not path.is_dir() else None
        if blocked is not None:  # it, or a directory above it, a link to nothing or a file: taken for a name another
            # run took, and the next names tried for ever (`--out LINK`, its target gone: a pass)
            raise ConfigError(f"cannot create run directory {path}: {blocked}; check run.out_dir (--out) and "
                              f"run.name") from None
        if not (path / "act-policy.json").is_file():  # made by --plan auto for its profile and policy
            if cfg.run.name is None:  # (it was told to resume the other run, or to choose a name it never gave)
                raise NameTaken(f"run directory {path} was made meanwhile by another run that drew the same name "
                                f"from the time (started in the same second): give each run started at once "
                                f"its own run.name") from None
            raise ConfigError(taken(path)) from None
    except OSError as e:
        raise ConfigError(f"cannot create run directory {path}: {e.strerror}; check run.out_dir") from e
    (path / "config.toml").write_text(to_toml(cfg))
    if rid is not None and cfg.offload.mode == "ssd":  # (what the SSD state records; in memory there is none)
        write_run_id(path, rid)
    if cfg.model.init_from:  # the source's config and tokenizer, kept with the run: export needs them, and the
        # source may be gone by then (a new-user pass: an export without tokenizer and token ids, said nowhere)
        from fuyou.hf.source import HF_META, copy_small_files, hf_files_dir

        meta = hf_files_dir(cfg.model.init_from)
        if meta is not None and meta.resolve() != (path / HF_META).resolve():
            copy_small_files(meta, path / HF_META)
    return path


ADAPTER_FILE = "adapter.safetensors"  # LoRA's adapters (fuyou.hf.peft reads it)


def save_weights(path: Path, trainer, cfg: FuyouConfig, step: int, run_dir: Path | None = None,
                 as_they_are: bool = False) -> Path:
    """fp32 weights by global key (shared parameters once, at their owner) into model.safetensors; with
    LoRA, the adapters by global key into adapter.safetensors (the base is model.init_from's); the
    ``step`` they are the weights of in the metadata (``weights_step``). ``run_dir``: the run's directory
    when ``path`` is not it (a snapshot), for the advice of a failed write. ``as_they_are``: read without
    writing the resident state back first (``Engine.master_chunks_now``: after a failed commit)."""
    from fuyou.models import StageModel

    if cfg.lora.enabled:
        return save_adapters(path, trainer.adapter_state(), cfg, step)

    specs = StageModel(cfg.model).param_specs()
    chunks = trainer.master_chunks_now() if as_they_are else trainer.master_chunks()
    try:
        return write_safetensors(path / "model.safetensors", {k: s.shape for k, s in specs.items()}, chunks,
                                 # (init_from is the run's config.toml's; a resume's config has none, and its file
                                 # differed in bytes from an uninterrupted run's by it: a pass, as the adapters')
                                 {"fuyou_model": json.dumps(cfg.model.model_dump(exclude={"init_from"})),
                                  "fuyou_step": str(step)})
    except OSError as e:
        kept = (f" The trained state is kept on the SSD: free space or fix the disk, then "
                f"`{resume_command(run_dir or path)}` saves it." if cfg.offload.mode == "ssd" else "")
        raise SaveError(f"writing {path / 'model.safetensors'} failed ({e.strerror or e}).{kept}") from e


def save_snapshot(run_dir: Path, trainer, cfg: FuyouConfig, steps: int, rotate: bool = True) -> Path:
    """``snapshots/step-N``: the weights after ``steps`` steps (model.safetensors) and a config.toml whose
    ``model.init_from`` is the run directory, so ``fuyou export`` finds the source's config and tokenizer.
    Written under a temporary name and renamed, so a snapshot directory is complete or absent; then all
    but the newest ``train.keep_snapshots`` are deleted (``rotate``; not for the weights a failed step leaves).
    Training waits while the masters are read (from the SSD state with offload: 4 bytes a parameter)."""
    import shutil

    final = snapshot_path(run_dir, steps)
    root, tmp = final.parent, final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # (a snapshots path that is a file, a full disk: a sentence, not a traceback: a pass)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise SaveError(f"the snapshot of step {steps} cannot be written: making {tmp} failed ({e.strerror or e})"
                        + (f"; {root} is not a directory" if root.exists() and not root.is_dir() else "")) from e
    try:
        save_weights(tmp, trainer, cfg, steps, run_dir=run_dir)
        snap_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": str(run_dir.resolve())})})
        (tmp / "config.toml").write_text(to_toml(snap_cfg))
        (tmp / SNAPSHOT_RECORD).write_text(json.dumps({"step": steps, "lineage": lineage(run_dir)}) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(f"the snapshot of step {steps} was not written to {final} ({e.strerror or e})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in snapshot_dirs(root)[:-cfg.train.keep_snapshots] if rotate else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def weights_step(path: Path) -> int | None:
    """The step whose weights a model.safetensors or adapter.safetensors fuyou saved holds (recorded since
    2026-12-05; None before, or for a file from elsewhere)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            step = (f.metadata() or {}).get("fuyou_step")
        return int(step) if step is not None else None
    except Exception:  # (unreadable, or safetensors' own error for a damaged file: the reader that follows says so)
        return None


def newer_commit(run: Path, weights: Path, ssd_dirs: list[str] | None = None) -> int | None:
    """The step of the run's last commit when it is newer than ``weights``, the weights file in the run
    directory; None when that file is the run's latest. A finished run whose state was kept
    (``offload.keep_state``) and is resumed to train on keeps the weights it finished with there until it
    finishes again: its export, after a stop, took them for the run's in silence (a new-user pass). Told by
    the steps (the file's ``weights_step``) or, for a file without one, by which was written last (the final
    commit is written before the weights). ``ssd_dirs``: where the state is now, if it moved."""
    from fuyou.engine.commit import RECORD

    if not (run / "config.toml").is_file():
        return None
    try:
        raw = read_toml(run / "config.toml")
    except (OSError, ConfigError):
        return None
    off = raw.get("offload", {})
    if off.get("mode") != "ssd":
        return None
    records = [Path(d) / state_name(run.name) / RECORD for d in ssd_dirs or off.get("ssd_dirs", [])]
    record = next((r for r in records if r.is_file()), None)
    if record is None:
        return None
    from fuyou.engine.state import owner_mismatch, run_id

    if owner_mismatch(record.parent, run, run_id(run)) is not None:  # a namesake's state (its run.name)
        return None
    try:
        step = int(json.loads(record.read_text())["step"])
        newer = record.stat().st_mtime_ns > weights.stat().st_mtime_ns
    except (OSError, ValueError, KeyError, TypeError):
        return None
    mine = weights_step(weights)
    return step if (step > mine if mine is not None else newer and step > 0) else None


SNAPSHOT_RECORD = "fuyou-snapshot.json"  # in a snapshot: its step and the lineage of the weights (``lineage``)


def lineage(run_dir: Path) -> str:
    """What a run's weights at a step follow from beyond its start: the resumes that changed something
    (``resumes.jsonl``), in order. A resume starts from the last commit, so the steps a run redoes after a
    resume that changed nothing are the steps it abandoned, bit for bit; the same lineage and step, the same
    weights. A changed setting that changes no bit (the CPU budget) makes a new lineage too: the safe side."""
    import hashlib

    try:
        entries = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        entries = []
    changes = [[e.get("resumed_at_step"), e.get("changed")] for e in entries
               if isinstance(e, dict) and e.get("changed")]
    return hashlib.sha256(json.dumps(changes, sort_keys=True, default=str).encode()).hexdigest()[:16]


def snapshot_record(snap: Path) -> dict | None:
    try:
        rec = json.loads((snap / SNAPSHOT_RECORD).read_text())
        return rec if isinstance(rec, dict) and isinstance(rec.get("lineage"), str) else None
    except (OSError, ValueError):
        return None  # (a snapshot from before the record: never taken for another)


def same_sampled(a: Path, b: Path, samples: int = 16, chunk: int = 1 << 20) -> bool:
    """Whether snapshots ``a`` and ``b`` hold the same files, of the same sizes, with the same config.toml
    and weights files equal in ``samples`` chunks spread over them (their headers first and their ends
    last): a few MiB read, where a redo of the same steps is equal everywhere and any other weights
    (another learning rate, another kernel's rounding) differ in nearly every element."""
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    if names != sorted(p.name for p in b.iterdir() if p.is_file()):
        return False
    for n in names:
        size = (a / n).stat().st_size
        if size != (b / n).stat().st_size:
            return False
        whole = size <= samples * chunk or not n.endswith(".safetensors")
        starts = [0] if whole else sorted({k * (size - chunk) // (samples - 1) for k in range(samples)})
        with open(a / n, "rb") as fa, open(b / n, "rb") as fb:
            for at in starts:
                fa.seek(at)
                fb.seek(at)
                want = size if whole else chunk
                if fa.read(want) != fb.read(want):
                    return False
    return True


def set_aside_later_snapshots(run_dir: Path, step: int) -> tuple[list[Path], list[Path]]:
    """A resume from the commit of ``step``: snapshots of later steps belong to the trajectory it abandons
    (they would be kept over the new ones, which have lower numbers); renamed ``abandoned-step-N``. One of
    the step and lineage (``lineage``) of an abandoned snapshot kept already is deleted instead: the same
    weights (a run killed and resumed again redoes its steps bit for bit; a new-user pass found a copy of
    the weights piling up at every kill), checked by ``same_sampled``: the same config.toml (an edited
    learning rate is no recorded change) and weights alike where sampled (another trajectory, even one
    of other kernels' rounding, differs nearly everywhere), not by reading both copies whole (a 70B
    model's are 280 GB each). Returns (the renamed, the deleted)."""
    import shutil

    moved, dropped = [], []
    for p in snapshot_dirs(run_dir / "snapshots"):
        if int(p.name[5:]) > step:
            rec = snapshot_record(p)
            kept = [q for q in p.parent.iterdir() if re.fullmatch(rf"abandoned-(\d+-)?{re.escape(p.name)}", q.name)]
            same = next((q for q in kept if rec is not None and snapshot_record(q) == rec and same_sampled(p, q)),
                        None)
            if same is not None:
                shutil.rmtree(p)
                dropped.append(p)
                os.utime(same)  # set aside again, as now (``prune_abandoned`` keeps the newest: a review)
                continue
            target = p.with_name(f"abandoned-{p.name}")
            n = 2
            while target.exists():
                target, n = p.with_name(f"abandoned-{n}-{p.name}"), n + 1
            p.rename(target)
            moved.append(target)
    return moved, dropped


def prune_abandoned(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` (train.keep_snapshots) set-aside snapshots (``abandoned-...``), newest by
    when they were set aside: each resume from an earlier commit adds its later steps' snapshots, and with a change
    recorded each was another lineage, kept: seven directories under keep_snapshots=1 (a pass). Returns the
    deleted."""
    import shutil

    root = run_dir / "snapshots"
    if not root.is_dir():
        return []
    aside = [(p, m) for p in root.iterdir() if p.is_dir()
             and (m := re.fullmatch(r"abandoned-(?:(\d+)-)?step-(\d+)", p.name))]
    # set aside when renamed (a rename changes the inode's ctime, not its mtime: a review), then by step and copy
    aside.sort(key=lambda pm: (pm[0].stat().st_ctime_ns, int(pm[1].group(2)), int(pm[1].group(1) or 1)))
    aside = [p for p, _ in aside]
    gone = aside[:-keep] if keep > 0 else aside
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def save_adapters(path: Path, adapters: dict, cfg: FuyouConfig, step: int | None = None) -> Path:
    """LoRA's adapters (fp32, fuyou's keys) with the model and LoRA settings in the metadata; atomic. Written
    by ``write_safetensors``, whose header is in a fixed order: safetensors' own writer orders the metadata
    as its hash map does, and a resumed run's file differed in bytes from an uninterrupted one's (a pass)."""
    out = path / ADAPTER_FILE
    keys = sorted(adapters)
    try:
        write_safetensors(out, {k: tuple(adapters[k].shape) for k in keys}, (adapters[k] for k in keys),
                          # (the base is the run's config.toml's init_from; a resume's config has none, and its
                          # file's bytes differed from an uninterrupted run's by it: a pass)
                          metadata={"fuyou_model": json.dumps(cfg.model.model_dump(exclude={"init_from"}),
                                                              sort_keys=True),
                                    "fuyou_lora": json.dumps(cfg.lora.model_dump(), sort_keys=True),
                                    **({"fuyou_step": str(step)} if step is not None else {})})
    except OSError as e:
        raise SaveError(f"writing {out} failed ({e.strerror or e}); free space or fix the disk") from e
    return out


class SaveError(FuyouError):
    """The final weights could not be written (nothing trained is lost with SSD offload)."""


ADAPTER_SHAPE = ("lora.rank", "lora.alpha", "lora.use_rslora", "lora.targets")  # an adapter's own (``lora.init_from``)


def _shown(saved: FuyouConfig, key: str, value):
    """A saved setting as a refusal names it: lora.targets unset as the targets it means (it read "None")."""
    if key == "lora.targets" and value is None and saved.lora.enabled:
        from fuyou.models.lora import DEFAULT_TARGETS

        return DEFAULT_TARGETS[saved.model.family]
    return value


def resume_changes(saved: FuyouConfig, cfg: FuyouConfig) -> dict[str, tuple]:
    """Fields that differ between the run's committed config and the resumed one, ``{key: (old,
    new)}``; raises ConfigError naming the fields a resume cannot change."""
    old, new = flat_settings(saved), flat_settings(cfg)
    changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) and not k.startswith(NOT_COMPARED)}
    if "lora.targets" in changed and saved.lora.enabled and cfg.lora.enabled:
        from fuyou.models.lora import same_targets

        if same_targets(saved.model.family, saved.lora.targets, cfg.lora.targets):  # (the same matmuls)
            del changed["lora.targets"]
    new_run = ("start a new run with lora.init_from its exported adapter (`fuyou export RUN --out DIR`), over the "
               "same base" if saved.lora.enabled else
               "start a new run with --init-from its run directory once it holds model.safetensors")
    moved = [k for k in changed if k in DATA_POSITION]
    if moved:  # (a new-user pass: grad_accum 1 -> 2 on resume skipped 44 of 95 examples of an epoch, saying nothing)
        g = cfg.train.global_batch
        mb, ga = saved.train.micro_batch_size, saved.train.grad_accum
        implied = (f" (from train.global_batch={g}: the run's micro_batch_size x grad_accum is {mb} x {ga})"
                   if "train.global_batch" in changed and g is not None else "")
        raise ConfigError("a resumed run cannot change " + ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})"
                                                                 for k in moved)
                          + implied + ": its place in the data is counted in steps of train.grad_accum x "
                          "train.micro_batch_size rows of data.seq_len tokens, so other values would skip or repeat "
                          f"data. Resume with the run's own values (another batch: {new_run})")
    order = [k for k in changed if k in DATA_ORDER and orders_rows(k, saved, cfg)]
    if order:
        raise ConfigError("a resumed run cannot change " + ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})"
                                                                 for k in order)
                          + ": they decide the rows its data makes, their order and the held-out set, so other "
                          "values would skip or repeat examples of the epoch under way and could hold out examples "
                          f"it trained on. Resume with the run's own values, or {new_run}")
    fixed = [k for k in changed if k.startswith(FIXED_ON_RESUME)]
    if fixed:
        scale = {"lora.alpha", "lora.use_rslora"}
        why = ("they set the scale its committed adapters were trained at" if set(fixed) <= scale else
               "they fix the shape, place or format of its committed state"
               + (" (lora.alpha and lora.use_rslora: the scale its adapters were trained at)" if scale & set(fixed)
                  else ""))
        if saved.lora.enabled and any(k in ADAPTER_SHAPE for k in fixed):  # (lora.init_from refuses an adapter of
            # other settings: the advice led to a second refusal; a pass)
            new_run = ("train new adapters with the new values: over the same base (--init-from BASE), or over this "
                       "run's weights merged (`fuyou export RUN --out DIR --merge`, then --init-from DIR)")
        raise ConfigError("a resumed run cannot change " + ", ".join(f"{k} ({_shown(saved, k, changed[k][0])!r} -> "
                                                                 f"{changed[k][1]!r})" for k in fixed)
                          + f": {why}. Resume with the run's own values, or {new_run}")
    return changed


def record_resume(run_dir: Path, cfg: FuyouConfig, step: int, changed: dict[str, tuple]) -> Path | None:
    """Append the resume to ``resumes.jsonl`` and make ``config.toml`` the effective config (the
    previous one is kept as ``config.step-<N>.toml`` when anything changed, ``config.step-<N>-<k>.toml`` for
    the k-th resume at the same step: six resumes at one commit left only the last one's: a pass). Returns the
    previous config's file, or None."""
    entry = {"resumed_at_step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "changed": {k: [a, b] for k, (a, b) in changed.items()}}
    with open(run_dir / "resumes.jsonl", "a") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")
    if changed:
        from fuyou.tomlfile import read_toml

        # the resumed config's model.init_from is none (the weights come from the SSD state); the rewritten
        # config keeps the source's, which export and snapshots follow to its config and tokenizer
        source = read_toml(run_dir / "config.toml").get("model", {}).get("init_from")
        if source and not cfg.model.init_from:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": source})})
        kept, k = run_dir / f"config.step-{step}.toml", 2
        while kept.exists():
            kept, k = run_dir / f"config.step-{step}-{k}.toml", k + 1
        (run_dir / "config.toml").replace(kept)
        (run_dir / "config.toml").write_text(to_toml(cfg))
        return kept
    return None


def export_run_dir(run_dir: str | Path, out_dir: str | Path, dtype: str = "fp32", shard_size: int = 2 * 1024**3,
                   stream=None, merge: bool = False, ssd_dirs: list[str] | None = None) -> list[str]:
    """``fuyou export``: a run directory (or a snapshot, or a ``fuyou import`` directory) as a Hugging
    Face model directory (``fuyou.hf.export_run``). An offloaded run without ``model.safetensors``,
    stopped or still training, exports its last commit from the SSD state (``fuyou.engine.committed``);
    a failed export of it removes its half-written output. A LoRA run (``adapter.safetensors``, or the
    last commit's adapters for one stopped before saving them) is written as a PEFT adapter directory,
    or with ``merge`` as the base with the adapters merged in (``fuyou.hf.peft``). ``ssd_dirs``: where
    the run's SSD state is now, if it moved (``fuyou export --ssd``)."""
    out = Path(out_dir).expanduser().absolute()  # (--out .: its lock beside it, not in it: a review)
    with _export_lock(out):
        return _export_run_dir(Path(run_dir).expanduser(), out, dtype, shard_size, stream, merge, ssd_dirs)


class ExportBusy(ConfigError):
    """Another export is writing to the same --out: nothing of it is this one's to clean up."""


@contextmanager
def _export_lock(out: Path):
    """One export into ``out`` at a time: a lock (``fuyou.store.lock.held``) on ``.<name>.fuyou-export.lock``
    beside it, for the export. Two exports into one --out raced: the one refused ("not empty") cleared the
    other's finished files as its own half-written ones (a pass). The second is now refused while the first
    writes, and afterwards by the check of ``out`` it makes under the lock."""
    from fuyou.store.lock import held

    made = [q for q in [out.parent, *out.parent.parents] if not q.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # (a new nested --out: its lock needs the parent)
    except OSError:  # (the export says what is wrong with --out)
        made = []
    try:
        with held(out.parent / f".{out.name}.fuyou-export.lock",
                  lambda pid: ExportBusy(f"another fuyou export is writing to {out} now (process {pid}): wait for it "
                                         f"to end and use its export, or choose another --out")):
            yield
    finally:
        for q in made:  # the parents made for it, if the export left nothing there
            try:
                q.rmdir()
            except OSError:
                break


def _export_run_dir(run: Path, out: Path, dtype: str, shard_size: int, stream, merge: bool,
                    ssd_dirs: list[str] | None) -> list[str]:
    import sys

    from fuyou.hf import export_run

    if out.is_dir() and any(out.iterdir()):  # before any note about what would be exported
        raise ConfigError(f"{out} exists and is not empty; choose a new --out directory")
    adapters = lora_adapters(run, stream, ssd_dirs)
    if adapters is not None:
        from fuyou.hf.peft import write_merged, write_peft_adapter

        if merge:
            if adapters.lora.get("base", "compute") != "compute":
                print(f"fuyou: the adapters were trained over the {adapters.lora['base']} base (lora.base="
                      f"{adapters.lora['base']}); they are merged into the base's own weights, as QLoRA adapters are",
                      file=stream or sys.stderr)
            return write_merged(run, out, dtype, shard_size, adapters=adapters)
        return write_peft_adapter(run, out, dtype, adapters=adapters, stream=stream)
    if merge:
        raise ConfigError(f"--merge merges a LoRA run's adapters into its base; {run} is no LoRA run (no "
                          f"{ADAPTER_FILE}): export it without --merge")
    finished = None  # the weights file a newer commit is exported over (the fallback if that cannot be read)
    if (run / "model.safetensors").is_file() or not (run / "config.toml").is_file():
        if not (run / "model.safetensors").is_file() or newer_commit(run, run / "model.safetensors", ssd_dirs) is None:
            _unused_ssd(run, "model.safetensors", ssd_dirs, stream)
            return export_run(run, out, dtype, shard_size)
        _say_newer_commit(run, "model.safetensors", stream)
        finished = run / "model.safetensors"
    from fuyou.engine.committed import CommitMoved, CommittedWeights
    from fuyou.store.lock import holder_task

    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out directory")
    created = not out.exists()
    for attempt in range(1, EXPORT_ATTEMPTS + 1):  # a run still training may commit while it is read
        try:
            with CommittedWeights(run, ssd_dirs) as weights:
                state = "still training" if weights.live else "stopped"
                task = holder_task(weights.holder) if weights.live and weights.holder is not None else "training"
                if task == "resharding":  # (it renames and deletes the state being read: a review)
                    raise ConfigError(f"{run}'s state is being resharded by process {weights.holder}: wait for it to "
                                      f"end, then export")
                if task != "training":
                    state = f"stopped; process {weights.holder} is {task} it too"
                c = weights.cfg
                steps = c.train.steps
                if c.train.epochs is not None:  # its steps are its epochs', recorded with its data (a review)
                    rec = recorded_data(run)
                    steps = rec.get("steps") if isinstance(rec, dict) else None
                if not weights.live and not c.run.save_weights and isinstance(steps, int) and weights.step >= steps:
                    state = "finished with run.save_weights=false"  # (it said "stopped": a pass)
                what = ("was resumed past its model.safetensors" if finished is not None else
                        "has no model.safetensors")
                if finished is None and (run / "model.safetensors").is_file():  # (it finished meanwhile: it was
                    what, state = "had no model.safetensors", "it finished meanwhile"  # "resumed past": a pass)
                    finished = run / "model.safetensors"  # (the fallback if its commit cannot be read: a review)
                print(f"fuyou: {run} {what} ({state}): exporting its last commit (step "
                      f"{weights.step}) from the SSD state" + (UNTRAINED if weights.step == 0 else ""),
                      file=stream or sys.stderr)
                return export_run(run, out, dtype, shard_size, weights=weights)
        except CommitMoved:
            _clear_out(out, created)
            if attempt == EXPORT_ATTEMPTS:
                raise
            print("fuyou: the run committed a newer step meanwhile; reading that one", file=stream or sys.stderr)
        except FuyouError as e:
            _clear_out(out, created)
            if finished is None:
                raise
            print(f"fuyou: note: its last commit cannot be read ({e}); exporting {finished} instead",
                  file=stream or sys.stderr)
            return export_run(run, out, dtype, shard_size)
        except BaseException:
            _clear_out(out, created)
            raise


def _say_newer_commit(run: Path, name: str, stream=None) -> None:
    import sys

    step = weights_step(run / name)
    print(f"fuyou: note: {run / name} holds the weights the run finished with{f' at step {step}' if step else ''}, "
          f"and it was resumed (offload.keep_state) and has committed later steps: its last commit is exported",
          file=stream or sys.stderr)


def _unused_ssd(run: Path, name: str, ssd_dirs: list[str] | None, stream=None) -> None:
    import sys

    if ssd_dirs:
        print(f"fuyou: note: --ssd is not read: the weights exported are {run / name}", file=stream or sys.stderr)


EXPORT_ATTEMPTS = 5
UNTRAINED = ("; note: no step was trained: these are the initial weights (the base, or adapters whose B is 0, "
             "which change nothing)")


def _clear_out(out: Path, created: bool) -> None:
    import shutil

    if created:
        shutil.rmtree(out, ignore_errors=True)
    elif out.is_dir():  # it was empty: leave it so
        for p in out.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def lora_adapters(run: Path, stream=None, ssd_dirs: list[str] | None = None):
    """The adapters ``fuyou export`` writes for ``run`` (a ``fuyou.hf.peft.Adapters``), None if it is
    no LoRA run. A LoRA run stopped before it wrote ``adapter.safetensors`` exports the adapters of its
    last commit (``fuyou.engine.lora_state``: the file the commit record names, checked by its SHA-256), as
    does one resumed past the adapters it finished with (``newer_commit``)."""
    import sys

    from fuyou.hf.peft import read_adapters

    if (run / ADAPTER_FILE).is_file():
        if newer_commit(run, run / ADAPTER_FILE, ssd_dirs) is None:
            _unused_ssd(run, ADAPTER_FILE, ssd_dirs, stream)
            return read_adapters(run)
        _say_newer_commit(run, ADAPTER_FILE, stream)
        try:
            return _committed_adapters(run, stream, ssd_dirs)
        except ConfigError as e:  # (a damaged commit: the finished adapters are still there)
            print(f"fuyou: note: its last commit cannot be read ({e}); exporting {run / ADAPTER_FILE} instead",
                  file=stream or sys.stderr)
            return read_adapters(run)
    if (run / "model.safetensors").is_file() or not (run / "config.toml").is_file():
        return None
    return _committed_adapters(run, stream, ssd_dirs)


def _committed_adapters(run: Path, stream=None, ssd_dirs: list[str] | None = None):
    """``lora_adapters`` of the run's last commit (None: no LoRA run)."""
    import hashlib
    import sys

    from fuyou.engine.committed import run_state_config
    from fuyou.hf.peft import Adapters, base_path

    cfg = run_state_config(run, ssd_dirs)
    if not cfg.lora.enabled:
        return None
    missing = (f"{run} is a LoRA run resumed past its {ADAPTER_FILE}" if (run / ADAPTER_FILE).is_file() else
               f"{run} is a LoRA run without {ADAPTER_FILE} (still training, or stopped before saving its adapters)")
    if cfg.offload.mode != "ssd" or cfg.offload.commit != "cow":
        snaps = snapshot_dirs(run / "snapshots")  # (named, as a full fine-tuning run's error does: a pass)
        kept = (f"its last snapshot is {snaps[-1]} (a stopped run keeps its adapters there): `fuyou export "
                f"{snaps[-1]} --out DIR`" if snaps else "it wrote no snapshot, so nothing of it was kept")
        raise ConfigError(f"{missing} and kept no commits (offload.mode={cfg.offload.mode}, offload.commit="
                          f"{cfg.offload.commit}): {kept}")
    from fuyou.engine.commit import RECORD

    state = Path(cfg.offload.ssd_dirs[0]) / state_name(run.name)
    hint = (f"resume it (fuyou train --resume {run}{''.join(f' --ssd {d}' for d in ssd_dirs or [])}) or export a "
            f"snapshot (RUN_DIR/snapshots/step-N)")
    for _ in range(3):  # a live run may replace its commit file between reading the record and the file
        try:
            rec = json.loads((state / RECORD).read_text())
        except (OSError, ValueError):
            raise ConfigError(f"{missing} and no readable commit in {state}: {hint}") from None
        name = rec.get("lora_state")
        try:
            data = (state / name).read_bytes() if name else b""
        except OSError:
            continue
        if name and hashlib.sha256(data).hexdigest() == rec.get("lora_sha256"):
            break
    else:
        raise ConfigError(f"{missing} and the adapters its commit record in {state} names are missing or damaged: "
                          f"{hint}")
    from safetensors.torch import load

    tensors = {k.removeprefix("adapter/"): v.float() for k, v in load(data).items() if k.startswith("adapter/")}
    print(f"fuyou: {missing}: exporting the adapters of its last commit (step {rec['step']}) from {state}"
          + (UNTRAINED if rec["step"] == 0 else ""), file=stream or sys.stderr)
    return Adapters(tensors, rec.get("model") or cfg.model.model_dump(), rec.get("lora") or cfg.lora.model_dump(),
                    base_path(run), cfg.train.seed, str(state / name))


def import_checkpoint(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """``fuyou import HF_DIR --out RUN_DIR``: the checkpoint converted into a run directory
    (``fuyou.hf.convert_checkpoint``) with ``RUN_DIR/config.toml``, the resolved config with
    ``model.init_from = RUN_DIR``, so ``fuyou train --config RUN_DIR/config.toml`` starts from it."""
    from fuyou.config import load_config
    from fuyou.hf import convert_checkpoint

    out = convert_checkpoint(hf_dir, out_dir)
    cfg = load_config(flags={"model.init_from": str(out.resolve())})
    if cfg.data.seq_len > cfg.model.max_seq_len:  # a checkpoint of fewer positions than the default length
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"seq_len": cfg.model.max_seq_len})})
    # data.source left out: `--config RUN_DIR/config.toml data.path=DIR` infers it from the path (written
    # as "builtin", it made such a run train on the embedded corpus; a new-user pass found it)
    (out / "config.toml").write_text(to_toml(cfg, omit=frozenset({"data.source"})))
    return out
