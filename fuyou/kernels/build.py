"""Lazy build of fuyou's C++ kernels, with a fallback that never stops training.

The kernels are plain C functions (``adamw.cpp``, ``storeio.cpp``; neither includes a torch header, so
a build takes seconds, not a minute) compiled on first use by ``torch.utils.cpp_extension.load(is_python_module=False)``
into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and
called through :mod:`ctypes`, which releases the GIL for the duration of each call: the engine's
optimizer worker runs the kernel while Python threads go on.

The library holds AVX-512, AVX2 and scalar code and picks one at run time (``__builtin_cpu_supports``),
so it is built without ``-march=native`` and a cache shared by several x86 machines stays valid; the
machine's architecture (x86_64, aarch64) is part of the extension's name.

Each library's name carries a hash of its source and flags, so a cached build always matches the source,
and a library built once is loaded as it is (a ``fuyou-built.json`` record beside it, written after a
build that succeeded, names it and its size): torch's own check rebuilt it whenever another install of
the same source (another checkout, a CI clone) had built it last, its ``build.ninja`` naming the other
source path.
Builds never wait forever: the builder holds an ``flock`` on ``fuyou-build.lock`` in the build
directory (released by the kernel however the process ends); a process that gets it while torch's
own ``lock`` file is still there knows that file is stale (its builder was killed, which once made
every later run wait on it silently) and removes it. Waiting for another live builder, and the build
itself, are bounded by ``FUYOU_BUILD_TIMEOUT`` seconds (default 600); past it the fallback is used.

Any failure to build or load (no compiler, no ninja, a compile error) is logged as ONE warning line
and :func:`load_adamw_lib` / :func:`load_storeio_lib` return ``None``; callers then use their
fallbacks (pure torch; the store's Python-thread engine). Setting
``FUYOU_NO_EXT=1`` forces the fallback without trying to build.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import os
import platform
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "adamw", "storeio" -> ctypes.CDLL or None once tried

# The flags that matter: -O3 and no floating-point contraction (see the note [Bit-exact with torch]
# in adamw.cpp). The kernel uses its own threads, not OpenMP (note [Own threads, not OpenMP]).
CFLAGS = ("-O3", "-pthread", "-ffp-contract=off", "-fno-math-errno", "-std=c++17")
LDFLAGS = ("-pthread",)


def ext_disabled() -> bool:
    """True when ``FUYOU_NO_EXT`` is set to a true value (1, true, yes)."""
    return os.environ.get("FUYOU_NO_EXT", "").strip().lower() in {"1", "true", "yes", "on"}


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_i64, c_dbl, c_vp = ctypes.c_int, ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    lib.fuyou_adamw_best_isa.restype = c_int
    lib.fuyou_adamw_best_isa.argtypes = []
    lib.fuyou_adamw_step.restype = c_int
    lib.fuyou_adamw_step.argtypes = [
        c_vp, c_vp, c_int, c_vp, c_vp, c_vp, c_int, c_i64,  # p, g, gtype, m, v, lowp, ltype, n
        c_dbl, c_dbl, c_dbl, c_dbl, c_dbl, c_dbl, c_dbl, c_dbl,  # decay w1 b2 c2 bc2s eps ns gs
        c_int, c_int,  # num_threads, isa
        c_vp, c_vp, c_vp,  # the state read when not in place: p, m, v (adamw.cpp, Note: [Out of place])
    ]
    lib.fuyou_adamw_tail_step.restype = c_int
    lib.fuyou_adamw_tail_step.argtypes = [
        c_vp, c_vp, c_int, c_vp, c_vp, c_vp, c_int, c_i64,  # p, g, gtype, m, v, lowp, ltype, n
        c_dbl, c_dbl, c_dbl, c_dbl, c_dbl, c_dbl, c_dbl, c_dbl,  # decay w1 b2 c2 bc2s eps ns gs
        c_vp, c_vp, c_vp,  # the state read when not in place: p, m, v
    ]
    lib.fuyou_adamw_q_step.restype = c_int
    lib.fuyou_adamw_q_step.argtypes = [
        c_vp, c_int, c_vp, c_int, c_vp, c_vp, c_int, c_vp, c_vp,  # p, ptype, g, gtype, m, v, mtype, ms, vs
        c_vp, c_int, c_i64, c_i64, ctypes.c_uint32,  # lowp, ltype, n, index0, key
        c_vp, c_vp, c_int,  # segment ends (int64), decays (double), count
        c_dbl, c_dbl, c_dbl, c_dbl, c_dbl, c_dbl, c_dbl,  # w1 b2 c2 bc2s eps ns gs
        c_int, c_int,  # num_threads, isa
        c_vp, c_vp, c_vp, c_vp, c_vp,  # the state read when not in place: p, m, v, m's and v's scales
    ]
    lib.fuyou_sumsq.restype = c_dbl
    lib.fuyou_sumsq.argtypes = [c_vp, c_int, c_i64, c_int]  # x, gtype (1 bf16, 2 fp16), n, threads
    lib.fuyou_dequant_rows.restype = c_int
    lib.fuyou_dequant_rows.argtypes = [c_vp, c_vp, c_vp, c_int, c_i64, c_i64, c_int]  # q, scale, out, otype, rows, cols, threads
    lib.fuyou_dequant_nf4.restype = c_int
    lib.fuyou_dequant_nf4.argtypes = [c_vp, c_vp, c_vp, c_int, c_i64, c_int, c_int]  # codes, absmax, out, otype, n, threads, isa
    lib.fuyou_quant_rows.restype = c_int
    lib.fuyou_quant_rows.argtypes = [c_vp, c_vp, c_vp, c_i64, c_i64, c_int]  # w, q, scale, rows, cols, threads
    lib.fuyou_quant_nf4.restype = c_int
    lib.fuyou_quant_nf4.argtypes = [c_vp, c_vp, c_vp, c_i64, c_int]  # w, codes, absmax, n, threads


def _declare_storeio(lib: ctypes.CDLL) -> None:
    c_int, c_i64, c_vp = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.fy_io_create.restype = c_vp
    lib.fy_io_create.argtypes = [c_int, c_i64, c_vp, c_int]  # threads, bounce bytes, crc fn, crc kind
    lib.fy_io_submit.restype = c_int
    lib.fy_io_submit.argtypes = [c_vp, c_i64, c_vp, c_int]  # engine, request id, units, n
    lib.fy_io_reap.restype = c_int
    lib.fy_io_reap.argtypes = [c_vp, c_vp, c_int, c_int]  # engine, out, max, timeout ms
    lib.fy_io_stop.restype = None
    lib.fy_io_stop.argtypes = [c_vp]
    lib.fy_io_free.restype = None
    lib.fy_io_free.argtypes = [c_vp]


# name -> (source, extra C flags, extra link flags, declare)
_LIBS = {
    "adamw": ("adamw.cpp", CFLAGS, LDFLAGS, _declare),
    "storeio": ("storeio.cpp", ("-O2", "-std=c++17", "-pthread"), ("-pthread",), _declare_storeio),
}


def build_timeout() -> float:
    return float(os.environ.get("FUYOU_BUILD_TIMEOUT", "600"))


def ext_name(what: str) -> str:
    """The library's name: kind, machine, and a hash of its source and flags (module docstring)."""
    source, cflags, ldflags, _ = _LIBS[what]
    h = hashlib.sha256((_HERE / source).read_bytes() + repr((cflags, ldflags)).encode()).hexdigest()[:10]
    return f"fuyou_{what}_{platform.machine().lower() or 'unknown'}_{h}"


class BuildTimeout(RuntimeError):
    pass


def _build(what: str) -> ctypes.CDLL:
    from torch.utils import cpp_extension  # imported here: it is slow to import

    source, cflags, ldflags, declare = _LIBS[what]
    name = ext_name(what)
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    deadline = time.monotonic() + build_timeout()
    fd = os.open(build_dir / "fuyou-build.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        while True:  # one fuyou builder at a time; the kernel frees the lock of a killed one
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildTimeout(f"another process has been building {name} for over "
                                       f"{build_timeout():.0f} s (FUYOU_BUILD_TIMEOUT)") from None
                time.sleep(0.2)
        stale = build_dir / "lock"  # torch's baton: with our flock held, nobody is building
        if stale.exists():
            logger.warning("fuyou: removing a stale build lock %s (its builder was killed)", stale)
            stale.unlink(missing_ok=True)
        for so in build_dir.glob(f"{name}*.so"):  # (no record: one cut short is removed, so ninja builds it again)
            if not whole_elf(so):
                logger.warning("fuyou: removing %s, cut short (a build killed while linking?)", so)
                so.unlink(missing_ok=True)
        built = _built(build_dir)
        if built is not None:
            try:
                lib = ctypes.CDLL(str(built))
                declare(lib)
                return lib
            except (OSError, AttributeError):  # damaged: build it again
                (build_dir / BUILT).unlink(missing_ok=True)
                built.unlink(missing_ok=True)
        result: dict = {}

        def run():
            try:
                result["path"] = cpp_extension.load(name=name, sources=[str(_HERE / source)], extra_cflags=list(cflags),
                                                    extra_ldflags=list(ldflags), build_directory=str(build_dir),
                                                    is_python_module=False, verbose=False)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result["error"] = exc

        t = threading.Thread(target=run, name=f"fuyou-build-{what}", daemon=True)
        t.start()
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            raise BuildTimeout(f"building {name} took over {build_timeout():.0f} s (FUYOU_BUILD_TIMEOUT)")
        if "error" in result:
            raise result["error"]
        so = Path(result["path"])  # (one cut short was removed above, under this lock: ninja built it again)
        lib = ctypes.CDLL(str(so))
        declare(lib)
        tmp = build_dir / (BUILT + ".tmp")
        try:  # (a cache that takes no record, full or read-only, only builds again next time)
            tmp.write_text(json.dumps({"library": so.name, "bytes": so.stat().st_size}))
            tmp.replace(build_dir / BUILT)
        except OSError:
            tmp.unlink(missing_ok=True)
        return lib
    finally:
        os.close(fd)  # releases the flock (a timed-out build thread goes on without it)


BUILT = "fuyou-built.json"


def whole_elf(path: Path) -> bool:
    """Whether ``path`` holds all an ELF file's header says it has (its section table ends within the file):
    loading a truncated library dies of SIGBUS (a pass truncated a cached one that had no build record)."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(64)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 64 or head[:4] != b"\x7fELF":
        return False
    if head[4] == 2:  # 64-bit: e_shoff at 0x28, e_shentsize and e_shnum at 0x3A
        end = "<" if head[5] == 1 else ">"
        shoff, = struct.unpack_from(end + "Q", head, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", head, 0x3A)
    else:  # 32-bit: e_shoff at 0x20, e_shentsize and e_shnum at 0x2E
        end = "<" if head[5] == 1 else ">"
        shoff, = struct.unpack_from(end + "I", head, 0x20)
        shentsize, shnum = struct.unpack_from(end + "HH", head, 0x2E)
    return shoff + shentsize * shnum <= size


def _built(build_dir: Path) -> Path | None:
    """The library a build that succeeded left in ``build_dir`` (``BUILT``), if it is there as built (one cut
    short is gone already: ``_build``). One of another size is removed with its record: ninja would not rebuild
    it (its command is unchanged)."""
    try:
        rec = json.loads((build_dir / BUILT).read_text())
        so = build_dir / Path(rec["library"]).name
        if so.is_file() and so.stat().st_size == rec["bytes"]:
            return so
        so.unlink(missing_ok=True)
        (build_dir / BUILT).unlink(missing_ok=True)
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load(what: str, fallback: str) -> ctypes.CDLL | None:
    if ext_disabled():
        return None
    if what in _STATE:
        return _STATE[what]  # type: ignore[return-value]
    with _LOCK:
        if what not in _STATE:
            try:
                _STATE[what] = _build(what)
            except Exception as exc:  # noqa: BLE001 -- a build failure must never stop training
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                logger.warning("fuyou: C++ %s library unavailable (%s: %s); using %s",
                               what, type(exc).__name__, first, fallback)
                logger.debug("fuyou: %s build failure", what, exc_info=True)
                _STATE[what] = None
    return _STATE[what]  # type: ignore[return-value]


def load_adamw_lib() -> ctypes.CDLL | None:
    """The compiled AdamW library, building it on first use; ``None`` means "use the fallback".

    Thread-safe: concurrent first callers wait for one build. The outcome (library or ``None``) is
    remembered for the life of the process, so a failed build is tried, and warned about, once.
    """
    return _load("adamw", "the slower pure-torch fallback")


def load_storeio_lib() -> ctypes.CDLL | None:
    """The store's native I/O engine (``storeio.cpp``), built on first use like the AdamW kernel;
    ``None`` means "use the Python-thread engine" (``fuyou/store/engine.py``)."""
    return _load("storeio", "the store's Python-thread I/O engine")
