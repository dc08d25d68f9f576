"""A stop asked for by a signal (SIGINT, SIGTERM, SIGHUP) ends the run at the next step boundary, after its
commit; every data-parallel rank agrees on it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from fuyou import distributed


def stop_status(name: str) -> int:
    """The exit status of a run stopped by signal ``name`` (128 + its number; every rank has the signal's name,
    ``StopOnSignal.agree``)."""
    return 128 + signal.Signals[name].value


class StopOnSignal:
    """SIGINT/SIGTERM/SIGHUP end the run at the next step boundary (after its commit), not mid-step."""

    REPEAT_S = 0.5  # the same signal again within this: the first one delivered twice, not a second request

    def __init__(self):
        self.requested: str | None = None
        self.from_other = False  # requested by another rank's signal (``agree``): this rank's own copy is that stop
        self.origin = ""  # " on another rank" where it was (the messages')
        self._own: str | None = None  # the signal that reached this process first (``requested`` may be agreed)
        self.commits = True  # whether the run commits a resumable state (the second signal's words)
        self._at = 0.0
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the ssh session dropped
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.from_other:  # this rank's own copy of the stop the ranks agreed on (a review: it exited at once,
            # without the stop's commit, where signals reach each process apart, as Slurm's)
            self.from_other, self._own, self._at = False, name, time.monotonic()
            os.write(2, f"fuyou: {name}: the stop under way, from another rank\n".encode())
            return
        torchrun = self.requested is not None and name == "SIGTERM" and "TORCHELASTIC_RUN_ID" in os.environ
        repeat = torchrun or (name == self._own and time.monotonic() - self._at < self.REPEAT_S)
        if repeat:
            # one stop reaching the process twice: a signal to the process group or cgroup (systemd, Slurm's
            # scancel, `timeout`, kill -TERM -PGID) that torchrun forwards again (a hostile pass lost the stop's
            # commit). The window counts from when Python runs the handler, which a long C call delays (a review).
            # Under torchrun any SIGTERM after a stop is the same stop: torchrun passes a stop on, and a second
            # one that reaches it (`timeout` forwarding a Ctrl-C to it, two SIGHUPs of a dropped session) it
            # passes on as SIGTERM at once (a pass lost the commit so); SIGKILL, or Ctrl-C again, ends it now.
            os.write(2, (f"fuyou: {name} again: taken as the same stop\n" if name == self._own else
                         f"fuyou: {name} after {self.requested}: taken as the same stop (torchrun passing it on)\n"
                         ).encode())
            return
        if self.requested is not None:
            # A second signal ends the process now, whatever it waits for: the last commit on the SSD
            # is the state of record (atomic), so nothing committed is lost.
            os.write(2, b"\nfuyou: second signal, exiting now; " + (
                b"the last commit is intact (--resume continues)\n" if self.commits else
                b"this run commits no state: what it trained since its last snapshot is lost\n"))
            os._exit(128 + signum)
        self.requested, self._own, self._at = name, name, time.monotonic()
        os.write(2, f"\nfuyou: {self.requested}: stopping at the end of this step (an evaluation under way "
                    f"is abandoned after its batch), with a commit of it (SSD offload) or a snapshot (in memory, or "
                    f"offload.commit=none); a second signal (after {self.REPEAT_S:g} s) exits at once\n".encode())

    def agree(self, dist: distributed.Dist, what: str) -> bool:
        """Whether any rank was asked to stop, on every rank at the same point; a rank that was not takes the
        signal's name (the largest number among the ranks'), so the ranks report the same stop and exit with
        the same status (an unsignalled rank said "a stop on another rank" and exited with SIGTERM's, which
        torchrun then named the root cause: a pass)."""
        mine = 0 if self.requested is None else signal.Signals[self.requested].value
        top = dist.reduce_ints([mine], what, op="max")[0] if dist.enabled else mine
        if top and self.requested is None:
            self.requested, self.from_other, self.origin = signal.Signals(top).name, True, " on another rank"
        elif top and top != mine:  # ranks that got different signals: all take the largest (a review)
            self.requested = signal.Signals(top).name
        return bool(top)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)

