"""A run's snapshots (``RUN_DIR/snapshots/step-N``), listed for every part that looks for them: the engine's
state, the trainer's saves and the Hugging Face side (which the engine imports, so it cannot import the engine:
it kept a copy of this listing)."""

from __future__ import annotations

from pathlib import Path


def snapshot_dirs(root: Path) -> list[Path]:
    """A run's snapshots ``step-N`` (in ``root``, its snapshots directory) in step order (by number: names
    sorted as text put step-1000000 before step-999999)."""
    found = [p for p in Path(root).glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def snapshot_path(run_dir: Path, step: int) -> Path:
    """Where the snapshot of ``step`` is (or goes): ``RUN_DIR/snapshots/step-NNNNNN``."""
    return Path(run_dir) / "snapshots" / f"step-{step:06d}"
