"""What a probe measured: one :class:`Figure` per quantity, grouped per device, and the
helpers that put a figure into words for its ``method``."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .settings import MiB


@dataclass(frozen=True)
class Figure:
    """One measured (or read) quantity, SI units, and how it was obtained."""

    value: float
    method: str


@dataclass(frozen=True)
class EfficiencyFit:
    """A measured efficiency curve in the profile's representation.

    Attributes:
        format: the format the curve was measured in (its peak is the reference).
        points: ``((tokens, fraction of peak), ...)`` as written to ``efficiency.points``.
        compute_max_fraction, half_tokens: least-squares fit of ``a * n / (n + h)``.
        memory_fraction: share of the DRAM/HBM read bandwidth an expert call streams at.
        peak_ops_per_s: the reference peak the fractions are relative to.
        launch_overhead_s: the fixed cost per call taken off before the fit.
        call_s: measured seconds per call, by format then token count.
        method: how, in one line.
        stream_bytes_per_s: the fastest weight streaming of a one-token call, any format.
    """

    format: str
    points: tuple[tuple[int, float], ...]
    compute_max_fraction: float
    half_tokens: float
    memory_fraction: float
    peak_ops_per_s: float
    launch_overhead_s: float
    call_s: dict[str, dict[int, float]]
    method: str
    stream_bytes_per_s: float = 0.0


@dataclass(frozen=True)
class CpuFigures:
    """The host CPU and its DRAM. Peaks are ops/s per format; ``skipped``: format -> why not.

    ``isa``: the kernel families its instruction set has (:data:`profiles.hardware.CPU_KERNEL_FAMILIES`),
    read as ``isa_method`` says; empty ``isa_method``: not read (not Linux).
    """

    model: str
    cores: Figure
    memory_bytes: Figure
    last_level_cache_bytes: Figure
    dram_read_bytes_per_s: Figure
    dram_copy_bytes_per_s: Figure
    peak_ops_per_s: dict[str, Figure]
    skipped: dict[str, str]
    launch_overhead_s: Figure | None
    efficiency: EfficiencyFit | None
    kernel_bytes_factor: dict[str, Figure] = field(default_factory=dict)  # format -> held / stored bytes
    isa: tuple[str, ...] = ()
    isa_method: str = ""


@dataclass(frozen=True)
class DiskFigures:
    """The filesystem holding the probed directory, and the block device under it (best effort)."""

    path: str
    device: str
    model: str
    filesystem: str
    capacity_bytes: Figure
    read_bytes_per_s: Figure
    pcie_gen: int | None = None
    pcie_lanes: int | None = None


@dataclass(frozen=True)
class GpuFigures:
    """One GPU model; ``indices`` are the CUDA devices of that model (measured on the first)."""

    indices: tuple[int, ...]
    model: str
    memory_bytes: Figure
    memory_bytes_per_s: Figure
    copy_bytes_per_s: Figure
    h2d_pinned_bytes_per_s: Figure
    h2d_pageable_bytes_per_s: Figure
    h2d_latency_s: Figure
    peak_ops_per_s: dict[str, Figure]
    skipped: dict[str, str]
    launch_overhead_s: Figure
    kernel_launch_s: Figure
    efficiency: EfficiencyFit | None


@dataclass(frozen=True)
class ProbeResult:
    """Everything one probe measured. ``to_dict()`` is the ``--json`` output."""

    mode: str
    host: str
    started_utc: str
    duration_s: float
    steps_s: dict[str, float]
    versions: dict[str, str]
    cpu: CpuFigures
    disk: DiskFigures | None
    gpus: tuple[GpuFigures, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    budget_s: float = 0.0  # the mode's time budget the measurements were sized to

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


Progress = Callable[[str, float], None]  # (step description, fraction done)
Source = Callable[[str, "Figure | str"], None]  # records (profile key, how it was measured)


def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


def _num(value: float, unit: str = "") -> str:
    """3 significant digits with an SI prefix and no space: ``25.3GB/s``, ``321GFLOPS``."""
    from ..units import format_bandwidth, format_throughput, format_time

    if unit == "B/s":
        return format_bandwidth(value).replace(" ", "")
    if unit in ("FLOPS", "OPS"):
        return format_throughput(value, unit).replace(" ", "")
    if unit == "s":
        return format_time(value).replace(" ", "")
    return f"{value:.4g}"


def _ops_unit(fmt: str) -> str:
    return "OPS" if fmt.startswith("int") else "FLOPS"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:160] + "...") if len(text) > 160 else text or type(exc).__name__
