"""The figures people read: sizes, decimal bytes and the progress line's counts round before their unit is
chosen, so a value just under a unit's boundary never prints as "1e+03" of the smaller one."""

from fuyou.train.metrics import si
from fuyou.units import format_decimal, format_size


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
