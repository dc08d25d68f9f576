"""Typed errors a user can cause. Each message says what is wrong and what to do about it.

``assert`` is reserved for our own invariants; anything a user's input, disk or budget can trigger
raises one of these. The CLI prints the message and exits with the error's ``exit_status``, so that a script
or a scheduler can tell what to do without reading the message:

- 2: the command, its configuration, data or budgets are wrong (a place that cannot be written included), or a
  state cannot be resumed as asked (argparse's usage errors are 2 as well): nothing was started, or nothing
  was lost; fix the command. Running it again as it is fails again.
- 3: training diverged (a non-finite loss or gradient norm): the state before that step is kept; running it
  again as it is diverges again.
- 4: the run failed while running (the SSD's I/O, a full disk, a stall, a failed commit or save, another
  rank's failure): the last commit is intact; once the cause is fixed, ``--resume`` goes on.
- 5: the SSD state is damaged (a checksum, the manifest, the commit record or a file's length is not what was
  written): it cannot be trusted, and a resume of it fails again; start anew (from a snapshot or exported
  weights).

A signal's stop is 128 + the signal's number (130 for Ctrl-C), as a shell reports it; 1 is a bug (a
traceback).
"""

from __future__ import annotations


class FuyouError(Exception):
    """Base class of every error fuyou raises on purpose."""

    exit_status = 4  # (the module's docstring) failed while running; subclasses say otherwise


class ConfigError(FuyouError, ValueError):
    """A configuration value, file or override is invalid."""

    exit_status = 2


class NameTaken(ConfigError):
    """A new run's name drawn from the time (no ``run.name``) is another run's, started in the same second: a
    single process draws the next free name and goes on (``fuyou.train.loop``); torchrun's ranks stop with it."""


class DataError(FuyouError):
    """A data path, corpus or token file is missing or malformed."""

    exit_status = 2


class NonFiniteError(FuyouError):
    """The loss or the gradient norm of a step is not finite: the step's update is not kept (the engine
    commits nothing of it; an in-memory run applies none, and keeps the weights before it as a snapshot).
    ``step``: the step's number, from 1."""

    exit_status = 3

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step

    #: the advice for step 1, engine's and in-memory's alike: no learning rate made it (lower-lr advice looped: a pass)
    BEFORE_ANY_UPDATE = ("no update had been made yet, so the initial weights (model.init_std, --init-from) or the "
                         "data make it so, not the learning rate: check them and start again")


class BudgetError(FuyouError):
    """A memory or disk budget cannot hold what the configuration needs."""

    exit_status = 2


class StoreError(FuyouError):
    """Base of the SSD tier's errors (I/O failures, corruption, missing space)."""


def encoding_advice(raw: bytes) -> str:
    """How to convert a file that is not UTF-8, from its first bytes: UTF-16 (a byte-order mark, or NUL bytes
    between ASCII characters) has its own command (Latin-1's, followed, filled the text with NULs: a pass)."""
    head = raw[:200]
    odd, even = head[1::2], head[0::2]  # UTF-16's ASCII: a NUL every other byte, on one side only
    # (CJK between the ASCII leaves fewer NULs on that side, but none on the other; a binary has them on both)
    halves = (odd.count(0) > len(odd) * 0.25 and even.count(0) < len(even) * 0.05) or (
        even.count(0) > len(even) * 0.25 and odd.count(0) < len(odd) * 0.05)
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or halves:
        return "it looks like UTF-16: convert it with `iconv -f utf-16 -t utf-8`"
    if b"\x00" in head:  # (an executable read as UTF-16: a hostile pass)
        return "it looks like a binary file, not text: give text, JSONL or JSON files (or a prepared dataset)"
    return "save the file as UTF-8 (for example `iconv -f latin1 -t utf-8` for Latin-1)"
