"""The figures people read: sizes, decimal bytes and the progress line's counts round before their unit is
chosen, so a value just under a unit's boundary never prints as "1e+03" of the smaller one."""

import pytest

from fuyou.errors import ConfigError
from fuyou.train.metrics import si
from fuyou.units import format_decimal, format_size, parse_size


def test_counts_round_before_their_unit_is_chosen():
    assert si(15320) == "15.3k"
    assert si(999.4) == "999"
    assert si(999_600) == "1M"          # it read "1e+03k"
    assert si(999_600_000) == "1G"
    assert si(175e9) == "175G"
    assert si(1.5e12) == "1.5T"
    assert si(0.5) == "0.5"
    assert si(-2500) == "-2.5k"


def test_decimal_bytes_round_before_their_unit_is_chosen():
    assert format_decimal(2.4e11) == "240 GB"
    assert format_decimal(999_600) == "1 MB"
    assert format_decimal(238e6) == "238 MB"
    assert format_decimal(512) == "512 B"
    assert format_decimal(3e18) == "3000 PB"


def test_a_minimum_shown_as_a_size_is_rounded_up():
    n = int(188.851 * 1024 ** 2)
    assert (format_size(n), format_size(n, up=True)) == ("188.85 MiB", "188.86 MiB")  # up: enough as a budget
    assert float(format_size(n, up=True).split()[0]) * 1024 ** 2 >= n
    assert format_size(1536) == "1.50 KiB"
    assert format_size(100) == "100 B"


def test_a_size_beyond_any_machine_is_refused():
    import pytest
    from fuyou.errors import ConfigError
    from fuyou.units import parse_size
    assert parse_size("1024TiB") == 1024**5
    for absurd in ("1e99", 1e30, "2000000TiB"):  # "--cpu-mem 1e99" planned an 88-digit TiB budget
        with pytest.raises(ConfigError, match="more than an exbibyte"):
            parse_size(absurd)


def test_the_unitless_hint_is_for_sizes_given_without_a_unit():
    from fuyou.units import unitless_hint
    assert "did you mean 12GiB?" in unitless_hint(12)
    assert "did you mean 12GiB?" in unitless_hint(12, "12")
    assert unitless_hint(512, "0.5KiB") == ""  # it asked whether 0.5KiB meant 512GiB
    assert unitless_hint(2 * 1024**3, "2GiB") == ""


def test_every_size_unit_is_its_power_of_1000_or_1024():
    """A mutation audit: decimal units (KB..TB) are powers of 1000 and binary ones (KiB..TiB) of 1024, every spelling
    of each, in either case (a terabyte read as a tebibyte was 10% too large)."""
    from fuyou.units import parse_size

    for k, (dec, binary) in enumerate((("k", "ki"), ("m", "mi"), ("g", "gi"), ("t", "ti")), start=1):
        for spelled in (dec, dec + "b", dec.upper() + "B"):
            assert parse_size(f"2{spelled}") == 2 * 1000**k, spelled
        for spelled in (binary, binary + "b", binary[0].upper() + "iB"):
            assert parse_size(f"2{spelled}") == 2 * 1024**k, spelled
    assert parse_size("2") == parse_size("2b") == parse_size("2 B") == 2


def test_every_hour_spelling_is_3600_seconds():
    """A mutation audit: each unit of a duration counts its own seconds (an hour read as a minute made a 1h
    interval 60 s)."""
    from fuyou.units import parse_duration

    for spelled in ("h", "hr", "hour", "hours", "H"):
        assert parse_duration(f"1{spelled}") == 3600, spelled
    assert parse_duration("1.5h") == 5400 and parse_duration("2 min") == parse_duration("2m") == 120
    assert parse_duration("30s") == parse_duration("30sec") == parse_duration("30secs") == 30


@pytest.mark.parametrize("value", [-1, -0.5, -(2**40)])
def test_a_negative_number_of_bytes_is_no_size(value):
    """A mutation audit: -1 bytes passed a check moved by one."""
    with pytest.raises(ConfigError, match="cannot be negative"):
        parse_size(value)
    assert parse_size(0) == 0 and parse_size(1) == 1


def test_a_resumed_runs_eta_counts_only_the_steps_this_process_ran(monkeypatch):
    """A mutation audit: the ETA of a run resumed at step 6 divided this process's time by all 8 steps done,
    four times too soon."""
    import io

    from fuyou.train import metrics

    clock = iter([100.0, 160.0])  # the progress made at 100 s; steps 7 and 8 done 60 s later
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    progress = metrics.Progress(total=10, log_every=1, stream=out)
    progress.done = 6
    progress.update(7, {"loss": "1.0"})
    assert "step 8/10" in out.getvalue() and "eta 1:00" in out.getvalue()  # 30 s a step, 2 steps to go
