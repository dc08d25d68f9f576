"""What a run shows and records: a progress line and a JSON-lines metrics log."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TextIO

from fuyou.distributed import resume_command


class MetricsLog:
    """Append-only JSON lines; each line is flushed so a crash loses at most the line being written.
    Strict JSON: a non-finite number is written as null (``NaN`` is not JSON), and every line carries
    the wall-clock time (``time``, seconds since the epoch).

    ``tensorboard``: also write every numeric field of a line with a ``step`` as a TensorBoard scalar
    (``train/loss``, ``eval/eval_loss``, ...) into ``tb/`` beside the log (torch's ``SummaryWriter``,
    which needs the ``tensorboard`` package: the ``tensorboard`` extra). ``purge_step``: a resume from an
    earlier commit; TensorBoard drops the points of the steps from there on, which are redone."""

    def __init__(self, path: Path, tensorboard: bool = False, purge_step: int | None = None):
        self.path = path
        _drop_torn_line(path)
        self._fh = path.open("a", encoding="utf-8")
        self._evals: dict[int, float] | None = None  # (logged_eval: evaluations before this launch, read once)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._tb = SummaryWriter(str(path.parent / "tb"), purge_step=purge_step)

    def logged_eval(self, step: int) -> float | None:
        """The evaluation loss the log holds at ``step`` from an earlier launch, if any (a resume at that step's
        commit would log the same again: twice in metrics.jsonl, and in TensorBoard, whose purge starts after it:
        a pass)."""
        if self._evals is None:
            self._evals = {}
            try:
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and "eval_loss" in rec and isinstance(rec.get("step"), int):
                        self._evals[rec["step"]] = rec["eval_loss"]
            except OSError:
                pass
        return self._evals.get(step)

    def write(self, record: dict) -> None:
        clean = {"time": round(time.time(), 3),
                 **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}}
        from fuyou.errors import FuyouError

        self._check_directory()
        try:
            self._fh.write(json.dumps(clean, allow_nan=False) + "\n")
            self._fh.flush()
        except OSError as e:  # a full run directory: a typed error; the SSD state's last commit is intact
            raise FuyouError(f"writing {self.path} failed ({e.strerror or e}): free space in {self.path.parent.parent} "
                             f"(the run directory's disk), then `{resume_command(self.path.parent)}` continues "
                             f"from the last commit (SSD offload)") from e
        if self._tb is not None and isinstance(record.get("step"), int) and "summary" not in record:
            group = "eval" if "eval_loss" in record else "train"
            try:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        self._tb.add_scalar(f"{group}/{k}", v, record["step"], walltime=clean["time"])
                self._tb.flush()
            except Exception as e:  # noqa: BLE001 -- its writer thread's error, re-raised here
                self._check_directory()
                raise FuyouError(f"writing TensorBoard events in {self.path.parent / 'tb'} failed ({e}); "
                                 f"run.tensorboard=false runs without them") from e

    def _check_directory(self) -> None:
        """A run directory deleted or moved while training: the log would go on into an unlinked file (and
        TensorBoard's writer thread fail with a traceback), the snapshots and the weights nowhere."""
        if not self.path.parent.is_dir():
            from fuyou.errors import FuyouError

            d = self.path.parent
            raise FuyouError(f"the run directory {d} was deleted or moved while training: the run stopped, its "
                             f"log, snapshots and weights having nowhere to go. An SSD-offloaded run's last commit "
                             f"is intact: move the directory back and `{resume_command(d)}` continues from it; "
                             f"a deleted one cannot be resumed (its config.toml is gone): start a new run "
                             f"(offload.replace_state=true reuses the run's name)")

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def _drop_torn_line(path: Path) -> None:
    """A line cut short by a full disk or a kill leaves the file without its last newline: cut it off, so
    the next record starts a line of its own (the log stays JSON lines)."""
    try:
        with path.open("r+b") as f:
            end = f.seek(0, 2)
            if end == 0 or (f.seek(end - 1), f.read(1))[1] == b"\n":
                return
            at = end
            while at > 0:  # back to the last newline, 64 KiB at a time
                at = max(0, at - 65536)
                f.seek(at)
                cut = f.read(min(65536, end - at)).rfind(b"\n")
                if cut >= 0:
                    f.truncate(at + cut + 1)
                    return
            f.truncate(0)
    except OSError:  # absent (a new run), or not a regular file (os.devnull)
        return


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class Progress:
    """A one-line progress bar on a terminal; plain lines every ``log_every`` steps otherwise."""

    def __init__(self, total: int, log_every: int, stream: TextIO = sys.stderr):
        self.total, self.log_every, self.stream = total, log_every, stream
        self.tty = stream.isatty()
        self.start = time.perf_counter()
        self.done = 0  # steps finished before this process started (a resumed run)

    def update(self, step: int, fields: dict[str, str]) -> None:
        done = step + 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(1, done - self.done) * (self.total - done)
        width = 20
        filled = int(width * done / self.total)
        bar = "█" * filled + "░" * (width - filled)
        text = f"step {done}/{self.total} |{bar}| " + " | ".join(f"{k} {v}" for k, v in fields.items())
        text += f" | eta {int(eta // 60)}:{int(eta % 60):02d}"
        if self.tty:
            self.stream.write("\r" + text + "\033[K")
            if done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif done % self.log_every == 0 or done == self.total or done == 1:
            print(text, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        print(text, file=self.stream, flush=True)


def si(x: float) -> str:
    """3 significant figures with a k/M/G/T suffix: 15320 -> '15.3k'. Rounded before the unit is chosen,
    as ``units.format_decimal`` is (999,600 read "1e+03k")."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        v = float(f"{x / scale:.3g}")
        if abs(v) >= 1:
            return f"{v:.3g}{unit}"
    return f"{x:.3g}"
