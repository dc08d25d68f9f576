"""The planner: hardware profiles and (later) the cost model of a pipelined step."""

from fuyou.planner.config import HardwareConfig

__all__ = ["HardwareConfig"]
