"""The SSD tier: an aligned, asynchronous tensor store (see DESIGN.md, "Where the bytes live").

* :class:`TensorStore` -- named tensors in preallocated, striped extents; ``read_into`` /
  ``write_from`` return futures; manifest with per-block CRC32s. Alignment rule: ``store.py``.
* :class:`PinnedPool` / :func:`aligned_empty` -- 4 KiB-aligned (page-locked with CUDA) buffers, the
  fast path of every transfer, bounded by the CPU memory budget.
* :class:`StoreConfig` -- block size, queue depth, striping, checksums, O_DIRECT.
* errors -- :class:`StoreIOError` and friends, all :class:`fuyou.errors.StoreError`.
"""

from fuyou.store.aligned import aligned_empty, byte_view, is_aligned
from fuyou.store.config import ALIGNMENT, StoreConfig
from fuyou.store.io import IOFuture
from fuyou.store.errors import (PoolBudgetError, StoreCorruptError, StoreFullError, StoreIOError,
                                StoreNotFoundError, StorePermissionError, StoreSpaceError, StoreUsageError)
from fuyou.store.layout import SUPPORTED_DTYPES, Extent, TensorMeta, TensorRecord
from fuyou.store.pool import PinnedBuffer, PinnedPool
from fuyou.store.store import DirectIOFallbackWarning, TensorStore

__all__ = [
    "ALIGNMENT", "SUPPORTED_DTYPES", "DirectIOFallbackWarning", "Extent", "IOFuture", "PinnedBuffer", "PinnedPool",
    "PoolBudgetError", "StoreConfig", "StoreCorruptError", "StoreFullError", "StoreIOError", "StoreNotFoundError",
    "StorePermissionError", "StoreSpaceError", "StoreUsageError", "TensorMeta", "TensorRecord", "TensorStore",
    "aligned_empty", "byte_view", "is_aligned",
]
