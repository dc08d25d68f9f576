"""C++ kernels, compiled on first use (see ``build.py``), each with a pure-torch fallback.

- ``adamw.cpp``: the fused AdamW step (AVX-512 / AVX2 / scalar, chosen at run time), used by
  :func:`fuyou.optim.fused_adamw_`.
"""

from fuyou.kernels.build import ext_disabled, load_adamw_lib

__all__ = ["ext_disabled", "load_adamw_lib"]
