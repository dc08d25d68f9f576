"""Reading a TOML file (a config, a run's config.toml) with one error for everything wrong with it.

A config saved in Latin-1 (an accented comment) was a ``UnicodeDecodeError`` traceback, wherever a file was
read (``train --config``, ``--resume``, ``export``, ``plan --model RUN``: a pass), and a file saved with a
byte-order mark was "invalid statement at line 1". Both are read or refused here, by name.
"""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from fuyou.errors import ConfigError, encoding_advice


def read_toml(path: str | Path) -> dict:
    """The file's table. ``ConfigError`` when it is not UTF-8 or not TOML (a UTF-8 byte-order mark is skipped);
    ``OSError`` when it cannot be read."""
    p = Path(path)
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{p} is not UTF-8 text (line {line} has the byte {data[e.start:e.start + 1]!r}): TOML "
                          f"files are UTF-8; {encoding_advice(data)}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p} is not valid TOML: {e}") from None
