import math

import pytest
from hypothesis import given, strategies as st

from profiles.errors import InputError
from profiles.units import (format_bandwidth, format_size, format_time, parse_bandwidth, parse_power,
                            parse_size, parse_throughput, parse_time)


@pytest.mark.parametrize("text, expected", [
    ("80GiB", 80 * 2**30), ("80GB", 80e9), ("80 GB", 80e9), ("512MiB", 512 * 2**20), ("1.5TB", 1.5e12),
    ("2TiB", 2 * 2**40), ("100B", 100), (4096, 4096), (1.5e9, 1.5e9), ("1e3GiB", 1000 * 2**30), ("3kB", 3000),
])
def test_sizes_keep_gib_and_gb_apart(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("900GB/s", 900e9), ("25.6 GB/s", 25.6e9), ("400Gb/s", 50e9), ("100Gbps", 12.5e9), ("16GiB/s", 16 * 2**30),
    ("3.35TB/s", 3.35e12), (7e9, 7e9), ("1.2 Tbit/s", 150e9),
])
def test_bandwidths_bits_are_divided_by_eight(text, expected):
    assert parse_bandwidth(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text, expected", [
    ("989TFLOPS", 989e12), ("1979TOPS", 1979e12), ("2.5 TFLOP/s", 2.5e12), ("660.6TOPS", 660.6e12), (1e12, 1e12),
])
def test_throughput(text, expected):
    assert parse_throughput(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text, expected", [("5us", 5e-6), ("5µs", 5e-6), ("1.5ms", 1.5e-3), ("2s", 2.0),
                                            ("10ns", 1e-8), ("2min", 120.0), (0.25, 0.25)])
def test_times(text, expected):
    assert parse_time(text) == expected


def test_power():
    assert parse_power("450W") == 450 and parse_power("1.2kW") == 1200


@pytest.mark.parametrize("parser, text, needle", [
    (parse_size, "80 gb", "case-sensitive"),
    (parse_size, "12 parsecs", "unknown size unit 'parsecs'"),
    (parse_size, "512", "a size needs its unit"),
    (parse_size, "-3GB", "must not be negative"),
    (parse_size, "lots", "invalid size"),
    (parse_size, True, "invalid size"),
    (parse_size, "inf GB", "invalid size"),
    (parse_bandwidth, "900GB", "per-second unit"),
    (parse_throughput, "1TB/s", "unknown throughput unit"),
    (parse_time, "5 fortnights", "unknown time unit"),
])
def test_bad_units_say_what_was_given_and_what_is_accepted(parser, text, needle):
    with pytest.raises(InputError) as err:
        parser(text)
    msg = str(err.value)
    assert needle in msg and "expected" in msg and "\n" not in msg
    if isinstance(text, str):
        assert repr(text) in msg


@given(st.floats(min_value=1, max_value=1e15, allow_nan=False))
def test_size_format_round_trips_within_display_precision(n):
    text = format_size(n).replace(" ", "")
    assert parse_size(text) == pytest.approx(n, rel=5e-3)
    assert parse_size(format_size(n, binary=False).replace(" ", "")) == pytest.approx(n, rel=5e-3)


def test_formatters():
    assert format_size(24 * 2**30) == "24 GiB"
    assert format_size(2e12, binary=False) == "2 TB"
    assert format_bandwidth(25e9) == "25 GB/s"
    assert format_time(1.5e-3) == "1.5 ms"
    assert math.isclose(parse_bandwidth(format_bandwidth(3.35e12).replace(" ", "")), 3.35e12)
