"""SSD <-> GPU transfers of CUDA tensors through kvikio, behind the store's interface.

When ``read_into`` / ``write_from`` get a CUDA tensor, the store hands it here. kvikio moves the bytes
with GPUDirect Storage (cuFile) where the system supports it, and otherwise in its compatibility mode
(POSIX I/O through its own pinned bounce buffers and thread pool) -- no CPU-side staging of ours.
kvikio is imported lazily, on the first CUDA request, so CPU-only installs never need it.

Costs and limits (documented, not hidden):

* Checksums are not computed on the GPU path: blocks written from GPU memory are recorded as
  *unchecked* (checksum ``None``) and GPU reads do not verify. Use pinned CPU buffers where
  integrity checks matter more than the saved PCIe hop.
* The store's alignment rule still applies (chunk starts at checksum-block multiples); kvikio
  handles the tensor's last partial 4 KiB itself.
* kvikio opens each data file a second time (it keeps an O_DIRECT and a buffered descriptor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fuyou.store.errors import StoreIOError, StoreUsageError

if TYPE_CHECKING:
    from fuyou.store.layout import TensorRecord

__all__ = ["KvikioBackend", "KvikioFuture", "kvikio_available"]


def kvikio_available() -> bool:
    """True when kvikio imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import kvikio  # noqa: F401
    except ImportError:
        return False
    return True


class KvikioFuture:
    """Aggregate of kvikio futures (one per stripe piece), with the store's future interface."""

    def __init__(self, parts: Sequence[tuple[Any, str, int, int]], nbytes: int, keepalive: torch.Tensor,
                 key: str, write: bool):
        self._parts, self.nbytes, self._keepalive, self._key, self._write = list(parts), nbytes, keepalive, key, write
        self._exc: BaseException | None = None

    def done(self) -> bool:
        return all(f.done() for f, *_ in self._parts)  # settled futures have no parts left

    def result(self, timeout: float | None = None) -> int:  # kvikio futures have no timeout
        """Wait for every piece; return the bytes moved or raise :class:`StoreIOError` naming the piece."""
        op = "write" if self._write else "read"
        for f, path, offset, length in self._parts:
            try:
                got = f.get()
            except Exception as exc:  # kvikio raises RuntimeError carrying the cuFile / POSIX message
                if self._exc is None:
                    self._exc = StoreIOError(path, offset, length, None, op, self._key)
                    self._exc.__cause__ = exc
                continue
            if got != length and self._exc is None:
                self._exc = StoreIOError(path, offset, length, None, op, self._key)
        self._parts, self._keepalive = [], None  # settled: a second call returns the same outcome
        if self._exc is not None:
            raise self._exc
        return self.nbytes

    get = result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except BaseException as exc:  # noqa: BLE001
            return exc
        return None


class KvikioBackend:
    """One ``kvikio.CuFile`` per data file; splits a request at stripe boundaries."""

    def __init__(self, paths: Sequence[str]):
        try:
            import kvikio
        except ImportError as exc:
            raise StoreUsageError("a CUDA tensor was passed but kvikio is not installed; install the 'gpu' "
                                  "extra (pip install 'fuyou[gpu]') or pass a pinned CPU buffer") from exc
        self._paths = list(paths)
        self._files = [kvikio.CuFile(p, "r+") for p in self._paths]
        self._pending: list[KvikioFuture] = []

    def submit(self, rec: "TensorRecord", tensor: torch.Tensor, a: int, b: int, write: bool) -> KvikioFuture:
        flat = tensor.reshape(-1).view(torch.uint8)
        parts, cur = [], a
        while cur < b:
            ext, foff, left = rec.locate(cur)
            n = min(b - cur, left)
            f = self._files[ext.dir_index]
            view = flat[cur - a:cur - a + n]
            fut = f.pwrite(view, n, foff) if write else f.pread(view, n, foff)
            parts.append((fut, self._paths[ext.dir_index], foff, n))
            cur += n
        if write:  # no GPU-side checksum: these blocks become unchecked
            cb = rec.checksum_block
            for i in range(a // cb, -(-b // cb)):
                rec.checksums[i] = None
        out = KvikioFuture(parts, b - a, tensor, rec.key, write)
        self._pending = [p for p in self._pending if not p.done()] + [out]
        return out

    def flush(self) -> None:
        for p in self._pending:
            p.exception()
        self._pending = []

    def close(self) -> None:
        self.flush()
        for f in self._files:
            f.close()
        self._files = []
