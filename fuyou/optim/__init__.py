"""The CPU AdamW: a fused in-memory kernel (C++ in ``fuyou.kernels``) and, later, its out-of-core
driver that streams a layer's state from the SSD store."""

from fuyou.optim.adamw import BACKENDS, AdamWConfig, adamw_backend, fused_adamw_

__all__ = ["AdamWConfig", "BACKENDS", "adamw_backend", "fused_adamw_"]
