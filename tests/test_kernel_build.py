"""The lazy C++ build never waits forever (issue 14: a SIGKILL during the build left torch's lock
file behind and every later run waited on it without a word)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuyou.kernels import build
from fuyou.kernels.build import ext_name

PROBE = ("import logging, sys; logging.basicConfig(level=logging.WARNING);"
         "from fuyou.kernels.build import load_adamw_lib; lib = load_adamw_lib();"
         "print('LOADED' if lib is not None else 'FALLBACK')")


def _build_dir(ext_dir):
    d = ext_dir / ext_name("adamw")  # with TORCH_EXTENSIONS_DIR set, torch builds in $DIR/NAME
    d.mkdir(parents=True)
    return d


def _probe(ext_dir, timeout_s: str, limit: int):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir), "FUYOU_BUILD_TIMEOUT": timeout_s}
    env.pop("FUYOU_NO_EXT", None)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=limit, env=env)


@pytest.mark.timeout(400)
def test_a_stale_lock_of_a_killed_builder_is_removed(tmp_path):
    d = _build_dir(tmp_path)
    (d / "lock").write_text("")  # what a builder killed mid-build leaves
    r = _probe(tmp_path, "380", 390)
    assert r.returncode == 0, r.stderr
    assert "LOADED" in r.stdout and "stale build lock" in r.stderr
    # built once, loaded as it is: another checkout of the same source had torch rebuild it at every switch
    # (its build.ninja named the other checkout's path; a pass)
    so = next(d.glob("*.so"))
    before = so.stat().st_mtime_ns
    ninja = d / "build.ninja"
    ninja.write_text(ninja.read_text().replace(str(Path(build.__file__).parent), "/another/checkout"))
    r = _probe(tmp_path, "380", 390)
    assert "LOADED" in r.stdout and so.stat().st_mtime_ns == before, r.stderr
    # a library that is not what the record says (a damaged cache) is built again; without a record (a cache
    # from before it), one cut short is too (it died of SIGBUS: a pass)
    size = so.stat().st_size
    for record in (True, False):
        if not record:
            (d / "fuyou-built.json").unlink()
        with open(so, "r+b") as f:
            f.truncate(size // 2)
        r = _probe(tmp_path, "380", 390)
        assert r.returncode == 0 and "LOADED" in r.stdout and so.stat().st_size == size, r.stderr


@pytest.mark.timeout(120)
def test_waiting_for_a_live_builder_is_bounded_and_falls_back(tmp_path):
    d = _build_dir(tmp_path)
    fd = os.open(d / "fuyou-build.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live builder that never finishes
    try:
        t0 = time.monotonic()
        r = _probe(tmp_path, "2", 100)
        assert r.returncode == 0, r.stderr
        assert "FALLBACK" in r.stdout and "FUYOU_BUILD_TIMEOUT" in r.stderr
        assert time.monotonic() - t0 < 60
    finally:
        os.close(fd)


def test_the_name_follows_the_source_and_flags(monkeypatch):
    from fuyou.kernels import build

    a = ext_name("adamw")
    monkeypatch.setitem(build._LIBS, "adamw", (build._LIBS["adamw"][0], build.CFLAGS + ("-DX",),
                                               *build._LIBS["adamw"][2:]))
    assert ext_name("adamw") != a and a.startswith("fuyou_adamw_")
