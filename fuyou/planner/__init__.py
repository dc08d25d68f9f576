"""The planner: hardware profiles, the cost model of a pipelined step, the policy search, the probe.

``fuyou plan`` = ``hardware.resolve`` (presets, numbers or a probe's profile) -> ``cost`` (per-stage
FLOPs and bytes) -> ``search`` (policy, cache and prefetch depth; memory from the engine's own plan)
-> ``simulate`` (tasks on resources, the engine's trace names) -> ``report``.
"""

from fuyou.planner.config import HardwareConfig
from fuyou.policy import ActivationPolicy, BlockPolicy, parse_act_policy

__all__ = ["ActivationPolicy", "BlockPolicy", "HardwareConfig", "parse_act_policy"]
