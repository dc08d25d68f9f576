"""The engine's daemon thread pool (fuyou/engine/threads.py): what ThreadPoolExecutor does, minus the join
at exit that held a failed run whose loader was stuck."""

import subprocess
import sys
import textwrap
import threading

import pytest

from fuyou.engine.threads import DaemonExecutor


def test_results_errors_and_cancellation():
    ex = DaemonExecutor(2, "t")
    gate = threading.Event()
    assert ex.submit(lambda a, b: a + b, 2, 3).result(5) == 5
    with pytest.raises(ZeroDivisionError):
        ex.submit(lambda: 1 / 0).result(5)
    blocked = [ex.submit(gate.wait, 10) for _ in range(2)]  # both threads busy
    queued = ex.submit(lambda: "ran")
    while sum(f.running() for f in blocked) < 2:
        threading.Event().wait(0.01)
    assert not ex.idle()
    assert queued.cancel() and queued.cancelled()
    gate.set()
    assert all(f.result(5) for f in blocked)
    assert ex.idle()
    ex.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        ex.submit(lambda: None)


@pytest.mark.timeout(60)
def test_a_stuck_thread_does_not_hold_the_exit():
    code = textwrap.dedent("""
        import time
        from fuyou.engine.threads import DaemonExecutor
        ex = DaemonExecutor(1, "stuck")
        ex.submit(time.sleep, 3600)
        queued = ex.submit(print, "never")
        time.sleep(0.2)
        ex.shutdown(wait=False, cancel_futures=True)
        assert queued.cancelled()
        raise SystemExit(2)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "never" not in r.stdout, r.stderr
