"""What a run is refused before it touches its SSD state, each with what to do: a finished run (nothing to
resume), a renamed run directory, another run's state under the same name, settings a resume may not change,
a state still held by another process, too little room for the run directory; data-parallel ranks that would
initialise from different checkpoints. ``claim_state`` records the run as its state's owner.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from fuyou import distributed
from fuyou.config import FuyouConfig
from fuyou.engine.commit import STATE_SUFFIX, state_name
from fuyou.engine.state import run_id
from fuyou.errors import ConfigError, FuyouError
from fuyou.units import format_size


def refuse_finished(run_path: Path, cfg: FuyouConfig, dist: distributed.Dist) -> None:
    """A finished run removed its SSD state: say that, and how to train on from it, rather than that
    the state was never committed, deleted or moved. Rank 0 decides (it saves the weights, then every rank
    deletes its state); a rank whose own state is still there was stopped after the save, before it
    deleted it (a pass found its state asking to be resumed, and the resume refused, in a loop): that
    state is of no use and is removed, as the finished run would have."""
    from fuyou.train.run import ADAPTER_FILE

    # every rank's state there: kept (offload.keep_state=true), or stopped before any was removed; it resumes.
    # (rank 0's alone decided: rank 0 stopped after the save, rank 1's state removed, asked to be resumed: a pass)
    kept = not dist.any(not any(d.is_dir() for d in state_dirs(cfg, run_path.name)), "comparing the ranks' states")
    finished = None
    if dist.is_main:
        try:
            finished = _finished(run_path, cfg, ADAPTER_FILE, kept)
        except FuyouError as e:  # (a state under the run's earlier name: every rank stops with it)
            finished = e
    finished = dist.broadcast(finished, "checking whether the run finished", started=False)
    if finished is None:
        return
    mine = [d for d in state_dirs(cfg, run_path.name) if d.is_dir()]
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


def agree_on_sources(cfg: FuyouConfig, dist: distributed.Dist) -> None:
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


def refuse_renamed(run_path: Path, cfg: FuyouConfig) -> None:
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
            # left beside another's removed, ``refuse_finished``)
            raise ConfigError(f"{run_path}'s SSD state is {d} (the run directory was named "
                              f"{d.name[:-len(STATE_SUFFIX)]!r}): fuyou finds a run's state by its directory's name; "
                              f"give it its old name back and resume it; nothing was changed")


def state_dirs(cfg: FuyouConfig, run_name: str) -> list[Path]:
    """This rank's SSD state directories, as the engine names them (``build_trainer``)."""
    dist = distributed.current()
    if cfg.offload.mode != "ssd":
        return []
    name = dist.store_name(state_name(run_name))
    return [Path(d) / name for d in dist.rank_config(cfg).offload.ssd_dirs]


def refuse_others_state(cfg: FuyouConfig, run_path: Path, rid: str | None) -> None:
    """A resume refuses another run directory's state (two runs of one run.name in different run.out_dir
    share a state directory; a new-user pass found one resuming the other's weights in silence), before
    the state is opened: opening it for a resume rebuilds the compute weights in the store. ``rid``: the id
    the run directory records (None: a run from before ids)."""
    from fuyou.engine.state import owner_mismatch

    dirs = state_dirs(cfg, run_path.name)
    other = owner_mismatch(dirs[0], run_path, rid) if dirs and dirs[0].is_dir() else None
    if other is not None:
        where = (f"Resume {other}" if Path(other).is_dir() else
                 "That run's directory is no longer there (moved? resume it where it is now)")
        raise ConfigError(f"the SSD state {dirs[0]} is the state of another run named {run_path.name!r} (the run "
                          f"in {other}), not of {run_path}: both keep their state in {dirs[0].parent}. {where}, or "
                          f"give this run's directory back its own state; nothing was changed")


def committed_settings(cfg: FuyouConfig, run_path: Path) -> dict | None:
    """The settings the last commit of an offloaded run recorded (``fixed_settings``), or None: no record, a
    damaged one, or one written before records kept the settings."""
    import json

    from fuyou.engine.commit import RECORD

    dirs = state_dirs(cfg, run_path.name)
    try:
        then = json.loads((dirs[0] / RECORD).read_text()).get("settings") if dirs else None
    except (OSError, ValueError, AttributeError):
        return None
    return then if isinstance(then, dict) else None


def refuse_unlike_commit(cfg: FuyouConfig, run_path: Path) -> None:
    """The settings a resume may not change, against those the last commit recorded (``fixed_settings``):
    the check against config.toml (``resume_changes``) misses a config.toml that was edited (a new-user
    pass doubled train.micro_batch_size there and resumed at the wrong place in the data, in silence)."""
    from fuyou.config import DATA_ORDER, fixed_settings, orders_rows

    then = committed_settings(cfg, run_path)
    if then is None:
        return  # no record, a damaged one (opening the state says so), or one from before records kept the settings
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


def claim_state(trainer, run_path: Path, rid: str) -> None:
    """Every run records itself, and its id, as its SSD state's owner (``refuse_others_state``)."""
    from fuyou.engine.state import write_owner

    for d in getattr(trainer, "store_dirs", None) or []:  # in memory: no SSD state
        if d.is_dir():
            write_owner(d, run_path, rid)


def check_run_dir_space(cfg: FuyouConfig, run_path: Path) -> None:
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


def refuse_live(run_dir: Path, cfg: FuyouConfig) -> None:
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

