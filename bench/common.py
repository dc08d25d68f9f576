"""What every benchmark in bench/ shares: the machine header of its report, the worker subprocess that
runs one measurement in a fresh process, and the report's tail (printed, and appended to the markdown
file that ``--markdown`` names, such as bench/RESULTS.md)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def machine_header(*extra: str) -> str:
    """One line naming the machine and the versions a figure depends on: host, CPUs, RAM, the GPU when
    there is one, the kernel, Python and torch; ``extra`` parts are appended (the SSD, a peer's version)."""
    import torch

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    parts = [f"host {platform.node()}", f"{os.cpu_count()} CPUs", f"{ram:.0f} GiB RAM"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        parts.append(f"GPU {p.name} ({p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})")
    parts += [f"Linux {platform.release()}", f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        parts.append(f"load average {os.getloadavg()[0]:.1f} at start")
    except OSError:
        pass
    return ", ".join(parts + list(extra))


def repo_env() -> dict[str, str]:
    """The environment for a child process that imports fuyou from this checkout: the repository put
    in front of PYTHONPATH, whatever else is there kept (a GPU machine's carried packages live on it)."""
    repo, path = str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": repo + (os.pathsep + path if path else "")}


DS_VENV = "/tmp/dsvenv/bin/python"  # tools/setup_deepspeed_peer.sh's venv
NO_DEEPSPEED = ("needs DeepSpeed: run `bash tools/setup_deepspeed_peer.sh` (a venv at /tmp/dsvenv with the pinned "
                "version, bench/PEERS_SETUP.md)")


def require_deepspeed(what: str, python: str | None = None, skip: str = "") -> None:
    """Before any measuring: ``what`` needs DeepSpeed, in this interpreter or in ``python``; else a sentence and exit
    status 2 (scripts ran every fuyou side first, then failed with a traceback: a pass). ``skip``: the flag that
    leaves the peer out."""
    import importlib.util

    # (not resolved: a venv's python is a link to its base interpreter, which has no deepspeed: /tmp/dsvenv's
    # peer was refused)
    if python is None or Path(python).absolute() == Path(sys.executable).absolute():
        ok, where = importlib.util.find_spec("deepspeed") is not None, sys.executable
    else:
        ok, where = Path(python).exists() and subprocess.run(
            [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('deepspeed') is None)"],
            capture_output=True).returncode == 0, python
    if not ok:
        print(f"{what} {NO_DEEPSPEED}; {where} has none" + (f" (or give {skip} to leave the peer out)" if skip else ""),
              file=sys.stderr)
        raise SystemExit(2)


def run_worker(script: str, args: list[str], timeout: float, what: str = "run") -> dict:
    """Run ``script --worker ARGS`` in a fresh Python process and return the JSON object it prints last;
    a failure raises with the tail of its stderr."""
    cmd = [sys.executable, script, "--worker", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def publish(lines: list[str] | str, markdown: str | Path | None) -> str:
    """Print the report and append it to ``markdown`` when given; returns the report."""
    report = lines if isinstance(lines, str) else "\n".join(lines)
    print(report)
    if markdown:
        with open(markdown, "a", encoding="utf-8") as fh:
            fh.write(report + "\n")
    return report


def timed_engine_run(overrides: list[str], steps: int, warmup: int, store_name: str) -> tuple[float, list]:
    """The engine (``fuyou.engine.engine.Engine``) on the config of ``overrides``, in this process:
    ``warmup`` steps and a wait for the optimizer, then ``steps`` steps timed to the end of their
    optimizer work. Returns (seconds per timed step, the timed steps' ``StepCounters``, read after the
    last wait: a step's updates may finish during the next one). Its SSD state is deleted at the end."""
    from fuyou.config import load_config
    from fuyou.data import load_data
    from fuyou.engine.engine import Engine

    cfg = load_config(overrides=overrides)
    eng = Engine(cfg, load_data(cfg.data), f"{store_name}-{os.getpid()}")
    try:
        for step in range(warmup):
            eng.train_step(step)
        eng.worker.wait_all()
        t0 = time.perf_counter()
        counters = []
        for step in range(warmup, warmup + steps):
            eng.train_step(step)
            counters.append(eng.counters)
        eng.worker.wait_all()
        return (time.perf_counter() - t0) / steps, counters
    finally:
        eng.completed = True  # a benchmark run: delete its SSD state at close
        eng.close()
