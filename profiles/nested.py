"""Nested formats: what holding an expert's bit-planes costs, priced once for planner and simulator.

A nested format stores a b-bit integer expert as two planes of b/2 bits (D²MoE's bit-nested
weights; the runtime's :mod:`exporters.runtime.nested`): ``q = 2^(b/2) hi + lo`` exactly, and
the high plane alone, with the same group scales, is a valid b/2-bit copy. ``int8`` nests
``int4`` (4 + 4 bits); ``int4`` nests ``int2`` (2 + 2 bits). A plan names the nested format
of an expert by its ``format`` (int8 or int4) and which planes it holds by ``planes``.

The high plane alone is priced and judged as its half format (the kernel and error of
:data:`NESTED`'s value). For int8 it is a 16-level quantiser in int4's groups, error
plain int4's; for int4 it is a 4-level quantiser in the int4 groups of 128 with int4's scale
and zero point (``W = (4 hi + 1.5 - zp) s``; the runtime's plain int2 has groups of 64 and a
clip search, so the high plane is the same bits per weight but its own layout and, without
the clip search, a larger error). The quality price of a high plane is its half format's
error times :data:`HIGH_ERROR`, the ratio measured in :mod:`exporters.runtime.nested`'s tests
(tests/test_nested_formats.py holds the measurement to it).

The group scales (and zero points) travel with the high plane, so of an expert's bytes at format b (its
:meth:`ModelSpec.expert_bytes`) the low plane holds ``params * b/2 / 8`` and the high plane
the rest. A plan says per resident expert which planes the compute device holds
(``LayerPlan.planes``):

==========  ================  ==================================  =====================
planes      device holds      each use                            runs at (quality)
==========  ================  ==================================  =====================
both        high + low        nothing moves                       b (the format's)
fetch-low   high              the low plane crosses from host     b (the format's)
                              DRAM, the codes are assembled
high        high              nothing moves                       b/2 (the high plane's)
==========  ================  ==================================  =====================

A ``fetch-low`` expert's low plane lives in the host's DRAM; a ``high`` expert keeps no low
plane in memory (the bundle's file has it). :func:`nested_use` is the one price of each
choice: the planner's options (:mod:`planner.nested_options`) and the simulator
(:mod:`simulator.pricing`) both read it, so a nested expert has one price.
"""

from __future__ import annotations

from dataclasses import dataclass

from .formats import get_format
from .hardware import Device
from .models import ModelSpec
from .perf import expert_calls_s

__all__ = ["HIGH_ERROR", "NESTED", "PLANES", "NestedUse", "nested_call_s", "nested_use", "plane_bytes", "plane_format", "plane_of"]

# a nestable format -> the format its high plane alone is a copy in (its quality and kernel)
NESTED = {"int8": "int4", "int4": "int2"}
PLANES = ("both", "fetch-low", "high")
# a nestable format -> its high plane's error over its half format's plain error, measured on
# gaussian weights (tests/test_nested_formats.py): int8's high plane 0.104 vs onnxruntime int4
# 0.101; int4's 0.404 vs the runtime's clip-searched int2 0.357
HIGH_ERROR = {"int8": 1.03, "int4": 1.13}


@dataclass(frozen=True)
class NestedUse:
    """What one nested expert costs under one planes choice.

    Attributes:
        run_format: the format whose kernel and quality a call has (b, or b/2 on the high plane alone).
        run_bytes: weight bytes a call reads on the device (both planes, or the high plane).
        fetch_bytes: bytes crossing the link from host DRAM at every use (the low plane, or 0).
        device_bytes: bytes held on the compute device.
        host_bytes: bytes held in host DRAM (the low plane of a ``fetch-low`` expert).
    """

    run_format: str
    run_bytes: float
    fetch_bytes: float
    device_bytes: float
    host_bytes: float


def plane_bytes(model: ModelSpec, fmt: str) -> tuple[float, float]:
    """``(high, low)`` bytes of one expert of ``model`` stored nested at ``fmt`` (scales in the high)."""
    if fmt not in NESTED:
        raise ValueError(f"{fmt} is not a nested format (nested: {', '.join(NESTED)})")
    low = model.params_per_expert * get_format(fmt).payload_bits / 2 / 8
    return model.expert_bytes(fmt) - low, low


def nested_use(model: ModelSpec, fmt: str, planes: str) -> NestedUse:
    """The price of holding an expert of ``model`` nested at ``fmt`` with ``planes`` (:data:`PLANES`)."""
    high, low = plane_bytes(model, fmt)
    if planes == "both":
        return NestedUse(fmt, high + low, 0.0, high + low, 0.0)
    if planes == "fetch-low":
        return NestedUse(fmt, high + low, low, high, low)
    if planes == "high":
        return NestedUse(NESTED[fmt], high, 0.0, high, 0.0)
    raise ValueError(f"unknown planes {planes!r} (one of {', '.join(PLANES)})")


def nested_call_s(device: Device, model: ModelSpec, fmt: str, planes: str, tokens):
    """Seconds of one call of a nested expert per token count (``tokens``: array or scalar) on
    ``device``: the run format's kernel over the planes it reads (:func:`nested_use`)."""
    use = nested_use(model, fmt, planes)
    return expert_calls_s(device, use.run_format, use.run_bytes, model.expert_flops_per_token, tokens)


_SUFFIX = {"fetch-low": "lo", "high": "hi"}


def plane_format(fmt: str, planes: str) -> str:
    """The name the simulator gives a nested expert's work: ``fmt`` for both planes (plain
    ``fmt``), ``fmt/lo`` for a fetch-low expert (a copy moves its low plane, a call runs at
    ``fmt``), ``fmt/hi`` for one on its high plane alone (:func:`plane_of` reads it back)."""
    return fmt if planes == "both" else f"{fmt}/{_SUFFIX[planes]}"


def plane_of(name: str) -> tuple[str, str] | None:
    """``(fmt, planes)`` of a :func:`plane_format` name; None for a plain format name."""
    fmt, _, suffix = name.partition("/")
    planes = next((p for p, x in _SUFFIX.items() if x == suffix), None)
    return (fmt, planes) if planes is not None and fmt in NESTED else None
