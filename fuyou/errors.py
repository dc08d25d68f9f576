"""Typed errors a user can cause. Each message says what is wrong and what to do about it.

``assert`` is reserved for our own invariants; anything a user's input, disk or budget can trigger
raises one of these. The CLI prints the message and exits with status 2.
"""

from __future__ import annotations


class FuyouError(Exception):
    """Base class of every error fuyou raises on purpose."""


class ConfigError(FuyouError, ValueError):
    """A configuration value, file or override is invalid."""


class DataError(FuyouError):
    """A data path, corpus or token file is missing or malformed."""


class NonFiniteError(FuyouError):
    """The loss or the gradient norm of a step is not finite: the step's update is not kept (the engine
    commits nothing of it; an in-memory run applies none, and keeps the weights before it as a snapshot).
    ``step``: the step's number, from 1."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class BudgetError(FuyouError):
    """A memory or disk budget cannot hold what the configuration needs."""


class StoreError(FuyouError):
    """Base of the SSD tier's errors (I/O failures, corruption, missing space)."""
