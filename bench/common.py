"""What every benchmark in bench/ shares: the machine header of its report, the worker subprocess that
runs one measurement in a fresh process, and the report's tail (printed, and appended to the markdown
file that ``--markdown`` names, such as bench/RESULTS.md)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
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
