"""C++ kernels, compiled on first use (see ``build.py``), each with a pure-torch fallback.

- ``adamw.cpp``: the fused AdamW step (AVX-512 / AVX2 / scalar, chosen at run time), used by
  :func:`fuyou.optim.fused_adamw_`.
- ``storeio.cpp``: the SSD store's native I/O engine (threads doing CRC-32 + pread/pwrite per unit),
  used by :mod:`fuyou.store.native`; the fallback is the Python-thread engine.
"""

from fuyou.kernels.build import ext_disabled, load_adamw_lib, load_storeio_lib

__all__ = ["ext_disabled", "load_adamw_lib", "load_storeio_lib"]
