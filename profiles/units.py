"""One parser and formatter for the units users write.

Internally every quantity is an SI number (bytes, bytes/s, ops/s, seconds, watts) and every
field name carries its unit (``memory_bytes``, ``link_bytes_per_s``). Users may write either
a plain number (taken as SI) or a string with a unit:

>>> parse_size("80GiB") == 80 * 2**30
True
>>> parse_size("80GB") == 80 * 10**9
True
>>> parse_bandwidth("400Gb/s")  # bits: divided by 8
50000000000.0
>>> parse_bandwidth("25.6 GB/s")
25600000000.0
>>> parse_throughput("989TFLOPS")
989000000000000.0
>>> parse_time("5us")
5e-06
>>> format_size(24 * 2**30)
'24 GiB'
"""

from __future__ import annotations

import math
import re
from typing import Callable

from .errors import InputError

__all__ = [
    "parse_size", "parse_bandwidth", "parse_throughput", "parse_time", "parse_power",
    "format_size", "format_bandwidth", "format_throughput", "format_time",
]

_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"

_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_BIN = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}

_SIZE_UNITS = {f"{p}B": m for p, m in _SI.items() if p != "K"} | {f"{p}B": m for p, m in _BIN.items()}
_SIZE_UNITS["KB"] = 1e3
_BIT_UNITS = {f"{p}b": m / 8 for p, m in _SI.items() if p != "K"} | {"Kb": 1e3 / 8}
_BIT_UNITS |= {f"{p}bit": m / 8 for p, m in _SI.items() if p not in ("", "K")}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "min": 60.0, "h": 3600.0}
_THROUGHPUT_UNITS = {}
for _p, _m in _SI.items():
    if _p == "K":
        continue
    _THROUGHPUT_UNITS[f"{_p}FLOPS"] = _m
    _THROUGHPUT_UNITS[f"{_p}FLOP/s"] = _m
    _THROUGHPUT_UNITS[f"{_p}OPS"] = _m
    _THROUGHPUT_UNITS[f"{_p}OP/s"] = _m
_POWER_UNITS = {"W": 1.0, "kW": 1e3, "mW": 1e-3}

SIZE_HELP = "a number of bytes or a size like 80GiB, 80GB, 512MiB (GB = 10^9 bytes, GiB = 2^30)"
BANDWIDTH_HELP = ("a bandwidth like 900GB/s, 25.6 GB/s, 400Gb/s (bits), 16GiB/s, "
                  "or a plain number of bytes/s")
THROUGHPUT_HELP = "a throughput like 989TFLOPS, 1979TOPS, 2.5 TFLOP/s, or a plain number of ops/s"
TIME_HELP = "a time like 5us, 1.5ms, 2s, 10ns, or a plain number of seconds"
POWER_HELP = "a power like 450W, 1.2kW, or a plain number of watts"


def _parse(value: object, units: dict[str, float], what: str, help_text: str,
           allow_negative: bool = False) -> float:
    if isinstance(value, bool):
        raise InputError(f"invalid {what}", value=value, expected=help_text)
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise InputError(f"{what} too large", value=value, expected=help_text) from None
    elif isinstance(value, str):
        m = re.fullmatch(_NUMBER + r"\s*([A-Za-zµ/]*)", value.strip())
        if not m:
            raise InputError(f"invalid {what}", value=value, expected=help_text)
        unit = m.group(2)
        if unit not in units:
            if not unit:  # '0', '512': a string of a number alone is ambiguous (bytes? GB?)
                raise InputError(f"a {what} needs its unit", value=value, expected=help_text)
            hint = ""
            if unit.lower() in {u.lower() for u in units}:
                hint = " (units are case-sensitive: B is bytes, b is bits)"
            raise InputError(f"unknown {what} unit {unit!r}{hint}", value=value, expected=help_text)
        # round away binary noise from the multiply (5 * 1e-6 -> 5e-06, not 4.999...e-06)
        number = float(f"{float(m.group(1)) * units[unit]:.15g}")
    else:
        raise InputError(f"invalid {what}", value=value, expected=help_text)
    if not math.isfinite(number):
        raise InputError(f"{what} must be finite", value=value, expected=help_text)
    if number < 0 and not allow_negative:
        raise InputError(f"{what} must not be negative", value=value, expected=help_text)
    return number


def parse_size(value: object) -> float:
    """Parse a size to bytes. ``"80GiB"`` = 80·2^30, ``"80GB"`` = 80·10^9, numbers are bytes."""
    return _parse(value, _SIZE_UNITS, "size", SIZE_HELP)


def parse_bandwidth(value: object) -> float:
    """Parse a bandwidth to bytes/s. ``"900GB/s"``, ``"400Gb/s"`` (bits), ``"16GiB/s"``."""
    if isinstance(value, str):
        text = value.strip()
        for suffix in ("/s", "ps"):
            if text.endswith(suffix):
                return _parse(text[: -len(suffix)], _SIZE_UNITS | _BIT_UNITS, "bandwidth", BANDWIDTH_HELP)
        if text and not re.fullmatch(_NUMBER, text):
            raise InputError("bandwidth needs a per-second unit", value=value, expected=BANDWIDTH_HELP)
    return _parse(value, {"": 1.0}, "bandwidth", BANDWIDTH_HELP)


def parse_throughput(value: object) -> float:
    """Parse a compute throughput to operations/s: ``"989TFLOPS"``, ``"1979TOPS"``."""
    return _parse(value, _THROUGHPUT_UNITS, "throughput", THROUGHPUT_HELP)


def parse_time(value: object) -> float:
    """Parse a duration to seconds: ``"5us"``, ``"1.5ms"``, ``"2s"``."""
    return _parse(value, _TIME_UNITS, "time", TIME_HELP)


def parse_power(value: object) -> float:
    """Parse a power to watts: ``"450W"``, ``"1.2kW"``."""
    return _parse(value, _POWER_UNITS, "power", POWER_HELP)


def _format(value: float, steps: list[tuple[float, str]], suffix: str = "") -> str:
    for factor, name in steps:
        if abs(value) >= factor:
            scaled = value / factor
            text = f"{scaled:.3g}" if abs(scaled) < 1000 else f"{scaled:.0f}"
            return f"{text} {name}{suffix}"
    return f"{value:.3g} {steps[-1][1]}{suffix}"


def format_size(n_bytes: float, binary: bool = True) -> str:
    """Format bytes: binary prefixes (GiB) by default, SI (GB) with ``binary=False``."""
    if binary:
        steps = [(2.0**50, "PiB"), (2.0**40, "TiB"), (2.0**30, "GiB"), (2.0**20, "MiB"), (2.0**10, "KiB"), (1, "B")]
    else:
        steps = [(1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B")]
    return _format(n_bytes, steps)


def format_bandwidth(bytes_per_s: float) -> str:
    """Format bytes/s with SI prefixes, the way datasheets state bandwidth: ``25 GB/s``."""
    return _format(bytes_per_s, [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B")], "/s")


def format_throughput(ops_per_s: float, unit: str = "FLOPS") -> str:
    """Format ops/s: ``989 TFLOPS``."""
    return _format(ops_per_s, [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1, "")], unit)


def format_time(seconds: float) -> str:
    """Format seconds: ``1.5 ms``, ``12 us``."""
    return _format(seconds, [(1.0, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")])


PARSERS: dict[str, Callable[[object], float]] = {
    "bytes": parse_size,
    "bytes_per_s": parse_bandwidth,
    "ops_per_s": parse_throughput,
    "s": parse_time,
    "w": parse_power,
}
