"""The three-tier engine (SSD, CPU, GPU) and its offload configuration."""

from fuyou.engine.config import OffloadConfig

__all__ = ["OffloadConfig"]
