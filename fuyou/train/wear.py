"""The end-of-run summary's SSD wear: the bytes a step writes at the run's commit cadence (the planner's
model, ``planner.report``), and the drives' rated endurance.
"""

from __future__ import annotations

import os

from fuyou.config import FuyouConfig
from fuyou.units import format_size


def step_wear(cfg: FuyouConfig, written: int, commit_written: int, commits: int, steps_run: int,
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


def wear_parts(cfg: FuyouConfig, wear: dict) -> str:
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


def endurance(cfg: FuyouConfig) -> tuple[float, str] | None:
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

