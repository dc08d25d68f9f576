"""The planner: hardware profiles, the cost model of a pipelined step, the policy search, the probe.

``fuyou plan`` = ``hardware.resolve`` (presets, numbers or a probe's profile) -> ``cost`` (per-stage
FLOPs and bytes) -> ``search`` (policy, cache and prefetch depth; memory from the engine's own plan)
-> ``simulate`` (tasks on resources, the engine's trace names) -> ``report``.
"""

__all__ = ["ActivationPolicy", "BlockPolicy", "HardwareConfig", "parse_act_policy"]


def __getattr__(name: str):
    """The names above, imported when first used: ``fuyou.cli`` builds its parser from ``fuyou.planner.cli``
    on every command, and ``fuyou.policy`` imports torch (a second, for `fuyou --help`)."""
    if name == "HardwareConfig":
        from fuyou.planner.config import HardwareConfig

        return HardwareConfig
    if name in ("ActivationPolicy", "BlockPolicy", "parse_act_policy"):
        import fuyou.policy

        return getattr(fuyou.policy, name)
    raise AttributeError(f"module 'fuyou.planner' has no attribute {name!r}")
