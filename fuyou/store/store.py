"""The tensor store: named tensors in preallocated, striped extents of files on one or more SSDs.

Files: each directory ``dirs[i]`` holds one data file ``fuyou-store.<i>.dat`` and a marker
``fuyou-store.id`` (store id and index, so a reordered or foreign directory is refused); ``dirs[0]``
also holds the manifest ``fuyou-store.json`` (records of every tensor, see
:mod:`fuyou.store.layout`), rewritten atomically by :meth:`TensorStore.sync`.

Alignment rule (read it once; every caller depends on it)
--------------------------------------------------------
* Every extent starts at a 4 KiB multiple and is padded to a 4 KiB multiple; the padding is never
  returned.
* A request covers elements ``[start, start + tensor.numel())`` of the stored tensor. Its byte start
  must be a multiple of ``checksum_block`` (default 1 MiB, fixed at creation, ``store.checksum_block``)
  and its byte end too, unless it is the tensor's end. Example: fp32 with 1 MiB blocks -> chunk
  starts and lengths in multiples of 262144 elements. One CRC32 covers one checksum block, so a chunk
  write always rewrites whole blocks and keeps every checksum valid without read-modify-write.
* Fast path: the caller's tensor starts at a 4 KiB-aligned address (a :class:`PinnedPool` buffer or
  :func:`aligned_empty`). Any other contiguous CPU tensor works through a bounce copy, slower.
* Requests on the same bytes that are in flight together have no defined order; wait on the write's
  future before reading what it wrote.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from fuyou.store import layout as L
from fuyou.store.aligned import byte_view
from fuyou.store.checksum import ALGORITHM as CHECKSUM
from fuyou.store.config import StoreConfig
from fuyou.store.io import IOFuture, ThreadBackend, Unit
from fuyou.store.native import NativeBackend, native_available
from fuyou.store.errors import StoreCorruptError, StoreUsageError, io_error_from_oserror
from fuyou.store.layout import TensorMeta, TensorRecord
from fuyou.store.lock import lock_dirs, unlock
from fuyou.watchdog import beat
from fuyou.store.manifest import preflight as _preflight
from fuyou.store.manifest import read_manifest as _read_manifest
from fuyou.units import format_size

__all__ = ["TensorStore", "DirectIOFallbackWarning"]

Spec = tuple[str, Sequence[int], torch.dtype]


class DirectIOFallbackWarning(RuntimeWarning):
    """A directory's file system refused O_DIRECT; the store uses buffered I/O there."""


class TensorStore:
    """Named tensors on SSD with asynchronous, aligned I/O. Build with :meth:`create` or :meth:`open`.

    A context manager; :meth:`close` (or leaving the ``with``) waits for in-flight I/O, fsyncs and writes
    the manifest. Thread-safe: requests may be issued from several threads.
    """

    def __init__(self, dirs: list[Path], config: StoreConfig, manifest: dict, create: bool, locks: list[int]):
        self.dirs, self.config = dirs, config
        self._locks = locks  # store.lock: held until close
        self.uuid: str = manifest["uuid"]
        self.checksum_block: int = int(manifest["checksum_block"])
        algo = manifest.get("checksum", "crc32")  # stores written before the field existed used CRC-32
        if algo != CHECKSUM:
            raise StoreUsageError(f"the store in {dirs[0]} checksums its blocks with {algo!r}, this fuyou with "
                                  f"{CHECKSUM!r}; open it with the fuyou version that wrote it")
        if config.stripe_unit % self.checksum_block:
            raise StoreUsageError(f"stripe_unit {format_size(config.stripe_unit)} is not a multiple of this "
                                  f"store's checksum_block {format_size(self.checksum_block)}; change stripe_unit")
        self._records: dict[str, TensorRecord] = {}
        for k, v in manifest["tensors"].items():
            try:
                self._records[k] = TensorRecord.from_json(k, v, ndirs=len(dirs))
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreCorruptError(k, str(dirs[0] / L.MANIFEST), f"the manifest's record of {k!r} is damaged "
                                        f"({exc}); the state cannot be trusted") from None
        self.generation: int = int(manifest.get("generation", 0))  # manifests written so far
        unit = max(config.block_size, self.checksum_block)
        unit = -(-unit // self.checksum_block) * self.checksum_block
        self._backend = _make_backend(config, unit)  # first: a refused backend leaves no file open
        self.backend_name = "native" if isinstance(self._backend, NativeBackend) else "threads"
        self._unit_bytes = unit
        self._next: list[int] = [int(x) for x in manifest["next_offsets"]]
        self._lock = threading.Lock()
        self._inflight: set[IOFuture] = set()
        self._closed = False
        self.paths = [str(d / L.data_file_name(i)) for i, d in enumerate(dirs)]
        self._fds: list[int] = []
        self.direct: list[bool] = []
        try:
            for d, p in zip(dirs, self.paths):
                fd, direct = _open_data_file(d, p, config.direct_io, create)
                self._fds.append(fd)
                self.direct.append(direct)
        except BaseException:
            for fd in self._fds:
                os.close(fd)
            self._backend.close()
            unlock(self._locks)
            raise
        self._kvikio = None

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def create(cls, dirs: Sequence[str | Path], config: StoreConfig | None = None,
               capacity_hint_bytes: int | None = None, head_bytes: int = 0) -> "TensorStore":
        """Create an empty store in ``dirs`` (made if missing). Refuses a directory already holding one.

        ``capacity_hint_bytes``: total bytes the store will hold, spread over its directories, and
        ``head_bytes`` more in the first (the manifest); checked against free space now
        (:class:`StoreSpaceError` naming what is missing per directory) so a run fails before it starts.
        """
        config = config or StoreConfig()
        paths = _normalise(dirs)
        if config.backend == "native" and not native_available():
            _make_backend(config, 0)  # raises the typed error before anything is created
        made = [d for d in paths if not d.exists()]  # removed again if the store is refused (its lock left behind)
        for d in paths:
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise io_error_from_oserror(exc, str(d), 0, 0, "creating the directory") from exc
        locks = lock_dirs(paths)
        try:
            if (paths[0] / L.MANIFEST).exists():
                raise StoreUsageError(f"{paths[0]} already holds a training state ({L.MANIFEST}): continue that run "
                                      f"with `fuyou train --resume RUN_DIR`, or delete {paths[0]} to start afresh")
            if capacity_hint_bytes or head_bytes:
                share = -(-int(capacity_hint_bytes or 0) // len(paths))
                _preflight({d: share + (int(head_bytes) if i == 0 else 0) for i, d in enumerate(paths)})
            sid = uuid.uuid4().hex
            for i, d in enumerate(paths):
                L.write_json_atomic(d / L.MARKER, {"uuid": sid, "index": i, "dirs": len(paths)})
            manifest = {"format": L.FORMAT_VERSION, "uuid": sid, "checksum_block": config.checksum_block,
                        "checksum": CHECKSUM, "alignment": 4096,
                        "dirs": [str(d) for d in paths], "next_offsets": [0] * len(paths),
                        "tensors": {}}
            store = cls(paths, config, manifest, create=True, locks=locks)
        except BaseException:
            unlock(locks)
            for d in made:  # a refused store (no space) leaves no directory behind
                try:
                    for f in d.iterdir():
                        if f.name.startswith("fuyou-store"):
                            f.unlink()
                    d.rmdir()
                except OSError:
                    pass
            raise
        try:
            store.sync()
        except BaseException:
            store.close(sync=False)
            raise
        return store

    @classmethod
    def open(cls, dirs: Sequence[str | Path], config: StoreConfig | None = None, lock: bool = True) -> "TensorStore":
        """Open an existing store and validate it: manifest, directory markers, file sizes.

        ``lock=False`` (a reader beside the process that owns the store, ``fuyou.engine.committed``):
        no lock is taken; the caller only reads, closes with ``sync=False``, and must itself make sure
        that what it reads is not being written (the manifest it sees is whole: it is replaced by rename).

        Raises :class:`StoreNotFoundError`, :class:`StoreCorruptError` (naming the file and what is
        wrong) or :class:`StoreUsageError` (directories missing, reordered or from another store).
        """
        config = config or StoreConfig()
        paths = _normalise(dirs)
        locks = lock_dirs([p for p in paths if p.is_dir()]) if lock else []
        store = None
        try:
            manifest = _read_manifest(paths)
            store = cls(paths, config, manifest, create=False, locks=locks)
            store._validate_files()
        except BaseException:
            if store is not None:
                store._close_files()
                store._backend.close()
            unlock(locks)
            raise
        return store

    def _validate_files(self) -> None:
        ends = [0] * len(self.dirs)
        spans: list[list[tuple[int, int, str]]] = [[] for _ in self.dirs]
        for rec in self._records.values():
            for e in rec.extents:
                ends[e.dir_index] = max(ends[e.dir_index], e.offset + e.length)
                spans[e.dir_index].append((e.offset, e.offset + e.length, rec.key))
        manifest = str(self.dirs[0] / L.MANIFEST)
        for i, lane in enumerate(spans):  # a damaged manifest could make two tensors share bytes
            lane.sort()
            for (a0, a1, ka), (b0, b1, kb) in zip(lane, lane[1:]):
                if b0 < a1:
                    raise StoreCorruptError(kb, manifest, f"its extent overlaps that of {ka!r}")
            if self._next[i] < ends[i]:
                raise StoreCorruptError(None, manifest, f"the next free offset of directory {i} lies inside its "
                                        f"tensors (the manifest is damaged)")
        for i, fd in enumerate(self._fds):
            size = os.fstat(fd).st_size
            if size < ends[i]:
                raise StoreCorruptError(None, self.paths[i], (
                    f"data file truncated: {size} bytes but its extents end at {ends[i]} "
                    f"({format_size(ends[i] - size)} missing)"))

    # -- allocation ------------------------------------------------------------------------------
    def allocate(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> TensorMeta:
        """Reserve space for one tensor (see :meth:`allocate_many`)."""
        return self.allocate_many([(key, shape, dtype)])[0]

    def allocate_many(self, specs: Iterable[Spec]) -> list[TensorMeta]:
        """Reserve extents for ``(key, shape, dtype)`` specs, all or none.

        First a preflight over all of them (free space per directory; :class:`StoreSpaceError` says how
        much is missing), then ``posix_fallocate`` of every extent, so a full disk shows up here, not
        mid-training. Cost: metadata only (no data written), milliseconds per GiB on ext4/xfs.
        """
        self._check_open()
        specs = list(specs)
        with self._lock:
            planned: list[TensorRecord] = []
            nxt = list(self._next)
            for key, shape, dtype in specs:
                rec = self._plan(key, tuple(int(s) for s in shape), dtype, nxt, planned)
                for e in rec.extents:
                    nxt[e.dir_index] = e.offset + e.length
                planned.append(rec)
            _preflight({self.dirs[i]: nxt[i] - self._next[i] for i in range(len(self.dirs)) if nxt[i] > self._next[i]})
            try:
                for rec in planned:
                    rec.checksums = [None] * -(-rec.nbytes // self.checksum_block)
                    for e in rec.extents:
                        self._reserve(e)
            except BaseException:
                for i, fd in enumerate(self._fds):
                    if nxt[i] > self._next[i]:
                        os.ftruncate(fd, self._next[i])
                raise
            self._next = nxt
            for rec in planned:
                self._records[rec.key] = rec
        return [r.meta for r in planned]

    def _plan(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, nxt: list[int],
              planned: list[TensorRecord]) -> TensorRecord:
        if not isinstance(key, str) or not key:
            raise StoreUsageError(f"a tensor key must be a non-empty string, got {key!r}")
        if key in self._records or any(r.key == key for r in planned):
            raise StoreUsageError(f"tensor {key!r} is already allocated in this store; choose another key")
        if dtype not in L.SUPPORTED_DTYPES:
            raise StoreUsageError(f"dtype {dtype} is not supported; use one of "
                                  f"{', '.join(L.dtype_name(d) for d in L.SUPPORTED_DTYPES)}")
        if any(s < 0 for s in shape):
            raise StoreUsageError(f"shape {shape} of {key!r} has a negative dimension")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        padded = -(-max(nbytes, 1) // 4096) * 4096
        su, extents = L.plan_extents(padded, self.config.stripe_unit, nxt)
        return TensorRecord(key, shape, dtype, nbytes, su, extents, self.checksum_block)  # checksums: after preflight

    def _reserve(self, e: L.Extent) -> None:
        fd, path = self._fds[e.dir_index], self.paths[e.dir_index]
        try:
            if self.config.preallocate:
                os.posix_fallocate(fd, e.offset, e.length)
            elif os.fstat(fd).st_size < e.offset + e.length:
                os.ftruncate(fd, e.offset + e.length)
        except OSError as exc:
            raise io_error_from_oserror(exc, path, e.offset, e.length, "preallocate") from exc

    # -- queries ---------------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._records))

    def keys(self) -> list[str]:
        return list(self._records)

    def meta(self, key: str) -> TensorMeta:
        """Shape, dtype and byte size of a stored tensor."""
        return self.record(key).meta

    def record(self, key: str) -> TensorRecord:
        """The full record (extents, checksums); treat as read-only."""
        try:
            return self._records[key]
        except KeyError:
            raise StoreUsageError(f"no tensor {key!r} in the store at {self.dirs[0]}; allocate it first") from None

    # -- I/O -------------------------------------------------------------------------------------
    def set_tag(self, key: str, tag: str | None) -> None:
        """Label what ``key`` holds (kept in the manifest from the next :meth:`sync`)."""
        with self._lock:
            self.record(key).tag = tag

    #: called as ``observer(key, nbytes, submitted, done)`` (perf_counter times) when a write from CPU memory
    #: completes, if set: the engine's ``--trace`` records the SSD writes with it
    write_observer = None

    def write_from(self, key: str, tensor: torch.Tensor, start: int = 0) -> IOFuture:
        """Write ``tensor``'s elements to elements ``[start, start + numel)`` of ``key``; returns a future.

        Do not modify ``tensor`` until the future is done. Alignment rule: module docstring.
        """
        observer, t0 = self.write_observer, time.perf_counter()
        fut = self._submit(key, tensor, start, write=True)
        if observer is not None and hasattr(fut, "add_done_callback"):  # (kvikio's GPU-direct futures have none)
            fut.add_done_callback(lambda f: f.exception(0) or observer(key, f.nbytes, t0, time.perf_counter()))
        return fut

    def read_into(self, key: str, tensor: torch.Tensor, start: int = 0) -> IOFuture:
        """Read elements ``[start, start + numel)`` of ``key`` into ``tensor``; returns a future.

        With ``verify_checksums`` a mismatching or truncated block makes the future raise
        :class:`StoreCorruptError`; the tensor's contents are then undefined.
        """
        return self._submit(key, tensor, start, write=False)

    def _submit(self, key: str, tensor: torch.Tensor, start: int, write: bool) -> IOFuture:
        self._check_open()
        rec = self.record(key)
        a, b = self._byte_range(rec, tensor, start)
        if tensor.device.type == "cuda":
            return self._gpu().submit(rec, tensor, a, b, write)
        if b == a:
            return IOFuture(0, 0)
        mv, addr = byte_view(tensor), tensor.data_ptr()
        units, cur = [], a
        while cur < b:
            ext, foff, left = rec.locate(cur)
            n = min(b - cur, left, self._unit_bytes)
            i = ext.dir_index
            units.append(Unit(None, write, self._fds[i], self.paths[i], self.direct[i], foff,  # type: ignore[arg-type]
                              mv[cur - a:cur - a + n], addr + cur - a, n, rec, cur // self.checksum_block,
                              self.config.verify_checksums))
            cur += n
        native = self.backend_name == "native"
        fut = IOFuture(b - a, 1 if native else len(units), keepalive=tensor)
        for u in units:
            u.fut = fut
        with self._lock:
            self._inflight.add(fut)
        fut.add_done_callback(self._retire)
        self._backend.submit_request(fut, units)
        return fut

    def _retire(self, fut: IOFuture) -> None:
        with self._lock:
            self._inflight.discard(fut)

    def _byte_range(self, rec: TensorRecord, tensor: torch.Tensor, start: int) -> tuple[int, int]:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_contiguous():
            raise StoreUsageError(f"{rec.key!r}: the buffer must be a contiguous tensor")
        if tensor.dtype != rec.dtype:
            raise StoreUsageError(f"{rec.key!r} is stored as {rec.dtype}, the buffer is {tensor.dtype}; "
                                  f"use a buffer of the stored dtype (pool.acquire(..., dtype={rec.dtype}))")
        if tensor.device.type not in ("cpu", "cuda"):
            raise StoreUsageError(f"{rec.key!r}: buffers must be CPU or CUDA tensors, got {tensor.device}")
        isz, numel = tensor.element_size(), rec.nbytes // max(tensor.element_size(), 1)
        if start < 0 or start + tensor.numel() > numel:
            raise StoreUsageError(f"{rec.key!r} has {numel} elements; elements [{start}, "
                                  f"{start + tensor.numel()}) are out of range")
        a, b, cb = start * isz, (start + tensor.numel()) * isz, self.checksum_block
        if a % cb or (b % cb and b != rec.nbytes):
            raise StoreUsageError(
                f"{rec.key!r}: chunk [{start}, {start + tensor.numel()}) breaks the alignment rule: start and "
                f"length must be multiples of {cb // isz} elements ({format_size(cb)}, the store's "
                f"checksum_block), except a chunk ending at the tensor's end ({numel})")
        return a, b

    def _gpu(self):
        if not self.config.use_kvikio:
            raise StoreUsageError("CUDA buffers need use_kvikio=True (kvikio); or pass a pinned CPU buffer")
        if self._kvikio is None:
            from fuyou.store.kvikio_backend import KvikioBackend
            self._kvikio = KvikioBackend(self.paths)
        return self._kvikio

    # -- durability ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every request issued so far has finished (errors stay with their futures)."""
        with self._lock:
            pending = list(self._inflight)
        for f in pending:
            f.exception()
        if self._kvikio is not None:
            self._kvikio.flush()

    def sync(self) -> None:
        """:meth:`flush`, fsync every data file, then write the manifest atomically (tmp, fsync, rename,
        fsync dir). After it returns, a crash loses nothing written before the call."""
        self.flush()
        for fd, path in zip(self._fds, self.paths):
            try:
                os.fsync(fd)
            except OSError as exc:
                raise io_error_from_oserror(exc, path, 0, 0, "fsync") from exc
            beat()  # progress, for the engine's deadlines (fuyou.watchdog)
        with self._lock:
            self.generation += 1
            payload = {"format": L.FORMAT_VERSION, "uuid": self.uuid, "checksum_block": self.checksum_block,
                       "checksum": CHECKSUM, "alignment": 4096, "generation": self.generation,
                       "dirs": [str(d) for d in self.dirs], "next_offsets": list(self._next),
                       "tensors": {k: r.to_json() for k, r in self._records.items()}}
        path = self.dirs[0] / L.MANIFEST
        try:
            L.write_json_atomic(path, payload)
        except OSError as exc:
            raise io_error_from_oserror(exc, str(path), 0, 0, "manifest write") from exc

    def close(self, sync: bool = True) -> None:
        """Finish in-flight I/O, :meth:`sync`, stop the I/O threads and close the files. Idempotent.
        ``sync=False`` writes nothing (a caller that failed before using the store: leave it as found)."""
        if self._closed:
            return
        try:
            if sync:
                self.sync()
            else:
                self.flush()
        finally:
            self._closed = True
            self._backend.close()
            self._close_files()
            unlock(self._locks)

    def _close_files(self) -> None:
        if self._kvikio is not None:
            self._kvikio.close()
            self._kvikio = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUsageError(f"the store at {self.dirs[0]} is closed")

    def __enter__(self) -> "TensorStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_backend(config: StoreConfig, unit_bytes: int) -> "ThreadBackend | NativeBackend":
    """The I/O backend ``config.backend`` names; 'auto' is the native one where it builds."""
    if config.backend == "native" or (config.backend == "auto" and native_available()):
        if not native_available():
            raise StoreUsageError("backend='native' needs the compiled store I/O library (fuyou/kernels/"
                                  "storeio.cpp: a C++ compiler and ninja) and a C CRC-32 (isal or libz); "
                                  "see the warning logged above, or use backend='threads'")
        return NativeBackend(config.queue_depth, config.block_size, unit_bytes)
    return ThreadBackend(config.queue_depth, config.block_size, unit_bytes)


def _normalise(dirs: Sequence[str | Path]) -> list[Path]:
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    paths = [Path(d).expanduser().resolve() for d in dirs]
    if not paths:
        raise StoreUsageError("a store needs at least one directory")
    if len(set(paths)) != len(paths):
        raise StoreUsageError(f"directories listed twice: {[str(p) for p in paths]}")
    return paths


def _open_data_file(d: Path, path: str, direct: bool, create: bool) -> tuple[int, bool]:
    """The data file; a new store's is created anew (``O_EXCL``: an existing file, or a symlink planted
    there, is refused, never truncated), and neither open follows a symlink (``O_NOFOLLOW``)."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if create else 0)
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise _open_error(exc, path, create) from exc
            if create:  # Linux makes the file before it refuses O_DIRECT (O_EXCL passed: the file is this call's),
                # and the buffered open's O_EXCL then called it a file the store did not make (a hostile pass on ramfs)
                try:
                    st = os.lstat(path)
                    if stat.S_ISREG(st.st_mode) and st.st_size == 0:  # (a plain empty file, never a link)
                        os.unlink(path)
                except OSError:
                    pass
            warnings.warn(f"{d}: the file system does not support O_DIRECT; using buffered I/O there (the page "
                          f"cache will hold copies of the data and speeds will include it)",
                          DirectIOFallbackWarning, stacklevel=4)
    try:
        return os.open(path, flags, 0o644), False
    except OSError as exc:
        raise _open_error(exc, path, create) from exc


def _open_error(exc: OSError, path: str, create: bool) -> Exception:
    if exc.errno in (errno.EEXIST, errno.ELOOP):
        what = "a symlink" if os.path.islink(path) else "a file"
        return StoreUsageError(f"{path} is {what} the store did not make: a state directory holds only the store's "
                               f"own files. Remove it (or choose another run name) and try again")
    if exc.errno == errno.ENOENT and not create:  # the manifest and the directory's marker were there: damaged
        return StoreCorruptError(None, path, "the store's data file is missing (deleted?) beside the store's other "
                                             "files: the state is incomplete; restore the file, or start a new run")
    return io_error_from_oserror(exc, path, 0, 0, "open")
