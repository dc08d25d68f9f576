"""Typed errors a user can cause. Each message says what is wrong and what to do about it.

``assert`` is reserved for our own invariants; anything a user's input, disk or budget can trigger
raises one of these. The CLI prints the message and exits with status 2.
"""

from __future__ import annotations


class FuyouError(Exception):
    """Base class of every error fuyou raises on purpose."""


class ConfigError(FuyouError, ValueError):
    """A configuration value, file or override is invalid."""


class NameTaken(ConfigError):
    """A new run's name drawn from the time (no ``run.name``) is another run's, started in the same second: a
    single process draws the next free name and goes on (``fuyou.train.loop``); torchrun's ranks stop with it."""


class DataError(FuyouError):
    """A data path, corpus or token file is missing or malformed."""


class NonFiniteError(FuyouError):
    """The loss or the gradient norm of a step is not finite: the step's update is not kept (the engine
    commits nothing of it; an in-memory run applies none, and keeps the weights before it as a snapshot).
    ``step``: the step's number, from 1."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step

    #: the advice for step 1, engine's and in-memory's alike: no learning rate made it (lower-lr advice looped: a pass)
    BEFORE_ANY_UPDATE = ("no update had been made yet, so the initial weights (model.init_std, --init-from) or the "
                         "data make it so, not the learning rate: check them and start again")


class BudgetError(FuyouError):
    """A memory or disk budget cannot hold what the configuration needs."""


class StoreError(FuyouError):
    """Base of the SSD tier's errors (I/O failures, corruption, missing space)."""


def encoding_advice(raw: bytes) -> str:
    """How to convert a file that is not UTF-8, from its first bytes: UTF-16 (a byte-order mark, or NUL bytes
    between ASCII characters) has its own command (Latin-1's, followed, filled the text with NULs: a pass)."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or raw[:200].count(b"\x00") > len(raw[:200]) // 4:
        return "it looks like UTF-16: convert it with `iconv -f utf-16 -t utf-8`"
    return "save the file as UTF-8 (for example `iconv -f latin1 -t utf-8` for Latin-1)"
