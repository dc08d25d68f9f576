"""What a run shows and records: a progress line and a JSON-lines metrics log."""

from __future__ import annotations

import json
import math
import os
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

    def __init__(self, path: Path, tensorboard: bool = False, purge_step: int | None = None,
                 wandb: "WandbLog | None" = None):
        self.path = path
        _drop_torn_line(path)
        self._fh = path.open("a", encoding="utf-8")
        self._evals: dict[int, float] | None = None  # (logged_eval: evaluations before this launch, read once)
        self.step: int | None = None  # the step the run is on (set by the loop; ``fail``'s line names it)
        self._wandb = wandb
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
        if self._wandb is not None:
            self._wandb.write(record)
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

    def fail(self, error: BaseException) -> None:
        """The run failed: a line ``{"error": the error's first line, "step": the step it was on}`` (W&B records
        it, and a failed exit), then close. Nothing if the log is closed already (a non-finite loss writes its
        own line), or cannot be written (the error may be the log's own)."""
        if self._fh.closed:
            return
        try:
            self.write({"error": _first_line(error), **({"step": self.step} if self.step is not None else {})})
        except Exception:  # noqa: BLE001 -- the run's own error is what is raised
            pass
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


class WandbLog:
    """The metrics as a Weights & Biases run (``run.wandb``): the log's lines with a ``step`` under
    ``train/`` and ``eval/`` as TensorBoard has them, plotted against ``step`` (its own metric, so that
    the steps a resume from an earlier commit redoes are logged again rather than dropped by W&B's
    increasing step: they follow a ``train/resumed`` point at the commit's step); the run's config; the
    summary line and a stop in the run's summary. The W&B run's id is kept in ``RUN_DIR/wandb.json``,
    so a resume continues the same W&B run; its files are in ``RUN_DIR/wandb``.

    Logging is a record beside ``metrics.jsonl``, not the run's work: an online run that cannot reach
    W&B at the start logs offline instead (``wandb sync`` uploads it), and one whose logging fails later
    goes on without it, each said once. A missing API key is refused before any work
    (``check_wandb``)."""

    def __init__(self, run_dir: Path, mode: str, project: str, entity: str | None, config: dict, stream):
        import uuid

        import wandb

        from fuyou.errors import FuyouError

        self.stream, self.run_dir = stream, Path(run_dir)
        record = self.run_dir / "wandb.json"
        try:
            run_id = json.loads(record.read_text())["id"]
        except (OSError, ValueError, KeyError, TypeError):
            run_id = uuid.uuid4().hex[:12]
            record.write_text(json.dumps({"id": run_id}) + "\n")
        kw = dict(project=project, entity=entity, name=self.run_dir.name, id=run_id, resume="allow",
                  dir=str(self.run_dir), config=config)
        # console "wrap": stdout/stderr copied at Python's level (no descriptors redirected under a run whose
        # children and signals are its own); silent: the run's place is said once, below
        settings = dict(console="wrap", silent=True)
        if wandb.run is not None:  # (a run an earlier run_training of this process left: init would return it)
            wandb.run.finish(exit_code=1)
        try:
            wait = float(os.environ.get("WANDB_INIT_TIMEOUT", 60))
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=wait, **settings), **kw)
        except Exception as e:  # noqa: BLE001 -- W&B's own errors (CommError, UsageError, timeouts)
            # only a W&B that cannot be reached is logged offline instead: a refused key, entity or project
            # would be refused again by `wandb sync` (a review)
            if mode != "online" or not isinstance(e, wandb.errors.CommError) or _refused(e):
                raise FuyouError(f"Weights & Biases did not start ({_first_line(e)}); check run.wandb_project and "
                                 f"run.wandb_entity and the API key (`wandb login`), or run.wandb=off trains "
                                 f"without it") from e
            try:
                wandb.teardown()  # (the failed run holds its id in W&B's service until it goes)
                self.run = wandb.init(mode="offline", settings=wandb.Settings(**settings), **kw)
            except Exception as e2:  # noqa: BLE001
                raise FuyouError(f"Weights & Biases could not be reached ({_first_line(e)}) nor log offline "
                                 f"({_first_line(e2)}); run.wandb=off trains without it") from e2
            mode = "offline"
            print(f"fuyou: note: W&B could not be reached ({_first_line(e)}): the metrics are logged offline into "
                  f"{self.run_dir / 'wandb'}; `wandb sync {self.run_dir / 'wandb'}/offline-run-*` uploads them",
                  file=stream)
        self.run.define_metric("step")
        for group in ("train", "eval"):
            self.run.define_metric(f"{group}/*", step_metric="step")
        url = self.run.get_url() if mode == "online" else None
        print(f"fuyou: W&B run {run_id} " + (f"at {url}" if url else f"offline in {self.run_dir / 'wandb'} "
                                                   f"(`wandb sync` uploads it)"), file=stream)
        self.exit_code = 0

    def write(self, record: dict) -> None:
        if self.run is None:
            return
        try:
            if record.get("summary"):
                self.run.summary.update({k: v for k, v in record.items() if _number(v) and k != "summary"})
                if "stopped" in self.run.summary.keys():  # (an earlier launch's stop: this one completed the run;
                    # `in` on W&B's summary object itself raises KeyError)
                    del self.run.summary["stopped"]
            elif "stopped" in record:
                self.run.summary["stopped"] = record["stopped"]
                self.exit_code = 1 if record["stopped"] == "non-finite" else 0
            elif "error" in record:  # the launch failed (MetricsLog.fail): a failed W&B run, the error its summary's
                self.run.summary["error"] = record["error"]
                self.exit_code = 1
            elif "resumed" in record:
                self.run.log({"train/resumed": record["resumed"], "step": record["resumed"]})
            elif isinstance(record.get("step"), int):
                group = "eval" if "eval_loss" in record else "train"
                values = {f"{group}/{k}": v for k, v in record.items() if k != "step" and _number(v)}
                if values:
                    self.run.log({**values, "step": record["step"]})
        except Exception as e:  # noqa: BLE001 -- a record, not the run's work: said once, then left out
            print(f"fuyou: warning: logging to W&B failed ({_first_line(e)}); training goes on without it "
                  f"(metrics.jsonl has every line)", file=self.stream)
            self.exit_code = 1
            self.close()

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish(exit_code=self.exit_code)
            except Exception as e:  # noqa: BLE001
                print(f"fuyou: warning: finishing the W&B run failed ({_first_line(e)})", file=self.stream)
            self.run = None


def _refused(e: BaseException) -> bool:
    """A W&B error that is an answer (a refused key, a missing entity or project), not a failure to connect."""
    text = str(e).lower()
    return any(w in text for w in ("401", "403", "404", "unauthorized", "permission", "not found", "invalid"))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_wandb(mode: str) -> None:
    """``run.wandb`` before any work, on rank 0 (which logs): the package installed, and for ``online`` an API
    key, found without a prompt (W&B's own check would prompt on a terminal, or fail once the run is built)."""
    if mode == "off":
        return
    import importlib.util

    from fuyou.errors import ConfigError

    if importlib.util.find_spec("wandb") is None and os.environ.get("RANK", "0") == "0":
        raise ConfigError(f"run.wandb={mode} needs the wandb package: pip install 'fuyou[wandb]'")
    if mode == "online" and os.environ.get("RANK", "0") == "0":  # (rank 0 logs: the others need no key)
        import wandb

        try:
            wandb.setup(settings=wandb.Settings(silent=True))  # (login's "API key is configured" lines)
            # never a prompt: under torchrun every rank asked at once on one terminal (a review)
            ok = wandb.login(verify=False, prompt=False)
        except Exception as e:  # noqa: BLE001 -- wandb.errors.UsageError: no key
            ok, why = False, _first_line(e)
        else:
            why = "no key found"
        if not ok:
            raise ConfigError(f"run.wandb=online needs a W&B API key ({why}): `wandb login`, or WANDB_API_KEY=...; "
                              f"run.wandb=offline logs into the run directory without one (`wandb sync` uploads it "
                              f"later)") from None


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
