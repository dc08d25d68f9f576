"""Byte sizes as users write them ("4GiB", "512MB", "1.5 GiB", 4096)."""

from __future__ import annotations

import math
import re

from fuyou.errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_LARGEST = 1024**6  # 1 EiB
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Return a size in bytes. Decimal units (GB) are powers of 1000, binary units (GiB) of 1024."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a size such as '4GiB' or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"a size cannot be negative, got {value}")
        n, number, unit = value, value, 1
    else:
        m = _SIZE.match(str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"cannot read {value!r} as a size; write a number of bytes or a number with a unit "
                f"such as 512MiB, 4GiB, 2GB (binary units: KiB MiB GiB TiB; decimal: KB MB GB TB)"
            )
        unit = _UNITS[m.group(2).lower()]
        n, number = float(m.group(1)) * unit, m.group(1)
    if not math.isfinite(n):
        raise ConfigError(f"{value!r} is too large to be a size" if n == math.inf else f"{value!r} is no size")
    if n > _LARGEST:  # ("--cpu-mem 1e99" planned an 88-digit TiB budget: a pass)
        raise ConfigError(f"{value!r} is more than an exbibyte, more memory or disk than any machine has; give the "
                          f"size you mean")
    if n != int(n) and unit == 1:  # ("--cpu-mem=0.5" was 0 bytes, in silence)
        raise ConfigError(f"{value!r} is a fraction of a byte (a size without a unit is bytes); give a unit, such as "
                          f"'{number}GiB'")
    return int(n)


def format_decimal(n: float) -> str:
    """Bytes in the drives' own decimal units, as their endurance is rated: 2.4e11 -> '240 GB' (an hour of
    writes in TB only read '0.000238 TB')."""
    units = ("B", "kB", "MB", "GB", "TB", "PB")
    for k, unit in enumerate(units):
        v = float(f"{n / 1000 ** k:.3g}")  # rounded before the unit is chosen (999,600 read "1e+03 kB": a review)
        if abs(v) < 1000 or unit == units[-1]:
            return f"{v:g} {unit}" if abs(v) < 1e6 else f"{v:.3g} {unit}"
    raise AssertionError("unreachable")


def unitless_hint(budget: int, spelled: object = None) -> str:
    """A hint for a memory budget of a few bytes: a number of GiB given without its unit ("--cpu-mem 12").
    ``spelled``: the budget as the user wrote it, where it is known ("0.5KiB" was asked whether it meant 512GiB)."""
    # (where the spelling is not known: below 1000 bytes no unit was given, or B; "2KB" was asked whether it meant
    # 2000GiB: a pass)
    m = _SIZE.match(str(spelled)) if spelled is not None else None
    if m and m.group(2):
        return ""
    return f" (a size without a unit is bytes: did you mean {budget}GiB?)" if 0 < budget < 1000 else ""


def format_size(n: int | float, up: bool = False) -> str:
    """Human-readable binary size: 1536 -> '1.50 KiB'. ``up``: rounded up, not to the nearest (a minimum:
    given back as a budget, the figure shown must be enough; 188.856 MiB shown as 188.86 was, 188.855 was not)."""
    whole = math.ceil(n) if up else None  # (up: in integers, exact)
    n = float(n)
    for k, unit in enumerate(("B", "KiB", "MiB", "GiB", "TiB")):
        if abs(n) < 1024 or unit == "TiB":
            if up:
                n = whole if unit == "B" else -(-whole * 100 // 1024**k) / 100
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|sec|secs|m|min|mins|h|hr|hours?)\s*$", re.IGNORECASE)
_SECONDS = {"s": 1, "sec": 1, "secs": 1, "m": 60, "min": 60, "mins": 60, "h": 3600, "hr": 3600, "hour": 3600,
            "hours": 3600}


def parse_duration(value: str) -> float:
    """Seconds from '30s', '10min', '1.5h' (units s, m/min, h)."""
    m = _DURATION.match(str(value))
    if not m:
        raise ConfigError(f"cannot read {value!r} as a duration; write a number with a unit: 30s, 10min, 1h")
    return float(m.group(1)) * _SECONDS[m.group(2).lower()]
