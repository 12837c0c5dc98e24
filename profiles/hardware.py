"""Hardware profiles: the YAML schema users write and the resolved cluster the tool uses.

A profile is a cluster of nodes; a node holds devices (``gpu``, ``cpu``, ``nvme``,
``accelerator`` and ``switch``), and each device lists its links (``pcie``, ``nvlink``,
``nic``, ``unified``). Values take units (``24GiB``, ``1008GB/s``, ``165TFLOPS``, ``5us``)
or plain SI numbers; every field name carries its unit.

``count: N`` on a node or device expands it into N copies named ``name0 .. name{N-1}``
(``index_from`` shifts the first index). A link's ``to`` names a device of the same node
(after expansion) or a cluster-level switch.

    profile = load_profile("desktop-4090")   # bundled name or a path
    hw = profile.resolve()                    # -> Hardware (frozen), with the topology graph
    hw.route("node/nvme0", "node/gpu0")       # -> Route(links, bottleneck, latency)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

import networkx as nx
import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_serializer, model_validator

from .errors import InputError, from_validation_error
from .formats import ACCELERATOR_COMPUTE_FORMATS, GENERAL_COMPUTE_FORMATS, GPU_COMPUTE_FORMATS
from .limits import MAX_CLUSTER_DEVICES, MAX_DEVICE_COUNT, MAX_NODE_COUNT
from .units import parse_bandwidth, parse_power, parse_size, parse_throughput, parse_time
from .yamlio import load_yaml

__all__ = [
    "EfficiencySpec", "LinkSpec", "DeviceSpec", "NodeSpec", "HardwareProfile",
    "Device", "Link", "Memory", "Route", "Hardware",
    "load_profile", "bundled_profiles", "BUNDLED_DIR", "PCIE_EFFECTIVE_X16_BYTES_PER_S", "PAGEABLE_FRACTION",
    "CPU_KERNEL_FAMILIES",
]

BUNDLED_DIR = Path(__file__).parent / "hardware"

Bytes = Annotated[float, BeforeValidator(parse_size)]
BytesPerS = Annotated[float, BeforeValidator(parse_bandwidth)]
OpsPerS = Annotated[float, BeforeValidator(parse_throughput)]
Seconds = Annotated[float, BeforeValidator(parse_time)]
Watts = Annotated[float, BeforeValidator(parse_power)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$")]

# Effective pinned host-to-device bandwidth of a PCIe x16 link, per generation
# (REFERENCE.md: Gen3 ~12, Gen4 ~24-25, Gen5 ~50 GB/s); scaled linearly by lanes.
PCIE_EFFECTIVE_X16_BYTES_PER_S = {1: 3.0e9, 2: 6.0e9, 3: 12.0e9, 4: 25.0e9, 5: 50.0e9, 6: 100.0e9}

# Pageable host memory reaches a fraction of the pinned copy rate (the driver stages it
# through a pinned bounce buffer; NVIDIA's bandwidthTest and public measurements show
# 50-70% on PCIe 3/4), used when a link states no measured `pageable_bytes_per_s`.
PAGEABLE_FRACTION = 0.6

# CPU kernel families, narrowest first: an engine that uses family f runs on the widest
# family <= f that the CPU has (`isa`).
CPU_KERNEL_FAMILIES = ("avx2", "avx512", "amx")

# Latency of one transfer on a link, by kind, when the profile gives none.
DEFAULT_LINK_LATENCY_S = {"pcie": 10e-6, "nvlink": 3e-6, "nic": 5e-6, "unified": 0.0}

# Efficiency defaults by device kind. CPU expert kernels reach about 25-40% of DRAM peak
# (REFERENCE.md); GPUs stream large weight matrices at ~80% of HBM peak; a compute-bound
# expert GEMM reaches ~70% of tensor-core peak once enough tokens share the call.
#
# half_tokens is the call's fixed compute in token-equivalents (compute time of n tokens is
# that of n + half_tokens tokens at the full rate), so it must stay well below the roofline
# knee of quantised weights (~8 tokens for 4-bit weights on an M2 Max, ~40 on an RTX 4090),
# or batch-1 decode is priced compute-bound when it is memory-bound. Small-batch kernels
# are built to be memory-bound there:
# - GPU, 8: llama.cpp's CUDA backend runs mat-vec kernels (MMVQ, one pass over the quantised
#   blocks) for up to 8 tokens per matrix (ggml-cuda/mmvq.cuh, MMVQ_MAX_BATCH_SIZE) and the
#   smallest tensor-core tile is 8 tokens wide (mma.m16n8k16); Marlin's int4 kernel keeps a
#   near-ideal memory-bound speedup up to batch 16-32 on an A10 (Frantar et al. 2024,
#   arXiv:2408.11743, Fig. 1), which the curve meets only if half_tokens <~ 16.
#   (64 made a 1-token call cost 65 tokens at 70% of peak: 2.4 ms per Mixtral q4 expert on an
#   M2 Max against 0.3 ms to read it.)
# - CPU, 1: a CPU GEMV runs on the same SIMD FMA units as its GEMM, with no tile padding
#   (llama.cpp ggml_vec_dot_* per weight row); what a call does once, whatever n, is unpack
#   each quantised weight (shift, mask, scale: about one token's multiply-add per weight).
# A probe's measured `points` replace the curve.
DEFAULT_EFFICIENCY = {
    "gpu": dict(compute_max_fraction=0.7, half_tokens=8.0, memory_fraction=0.8),
    "cpu": dict(compute_max_fraction=0.5, half_tokens=1.0, memory_fraction=0.35),
    "accelerator": dict(compute_max_fraction=0.6, half_tokens=16.0, memory_fraction=0.7),
}
DEFAULT_LAUNCH_OVERHEAD_S = {"gpu": 20e-6, "cpu": 50e-6, "accelerator": 30e-6}

_STRICT = ConfigDict(extra="forbid", frozen=True)


class EfficiencySpec(BaseModel):
    """Fraction of peak an expert call reaches, as a function of tokens per call.

    ``fraction(n) = compute_max_fraction * n / (n + half_tokens)`` unless measured
    ``points`` (``[[tokens, fraction], ...]``) are given, which are then interpolated
    piecewise-linearly in log2(tokens). ``memory_fraction`` is the share of the memory
    bandwidth reached while streaming expert weights.
    """

    model_config = _STRICT

    compute_max_fraction: float = Field(gt=0, le=1)
    half_tokens: float = Field(gt=0)
    memory_fraction: float = Field(gt=0, le=1)
    points: tuple[tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0, le=1)]], ...] | None = None
    source: str = "defaults (REFERENCE.md)"

    @model_validator(mode="after")
    def _points_sorted(self) -> "EfficiencySpec":
        if self.points is not None:
            tokens = [p[0] for p in self.points]
            if len(tokens) < 2 or tokens != sorted(set(tokens)):
                raise InputError("efficiency points must be at least two, sorted by distinct token counts",
                                 key="points", value=list(self.points),
                                 fix="write [[1, 0.02], [16, 0.3], [256, 0.7]] style pairs in increasing tokens")
        return self

    def compute_fraction(self, tokens: float) -> float:
        """Fraction of peak compute reached with ``tokens`` tokens in one expert call."""
        n = max(float(tokens), 1e-9)
        if self.points is None:
            return self.compute_max_fraction * n / (n + self.half_tokens)
        return float(self.compute_fractions(np.array([n]))[0])

    def compute_fractions(self, tokens: np.ndarray) -> np.ndarray:
        """:meth:`compute_fraction` for an array of token counts."""
        n = np.maximum(np.asarray(tokens, dtype=float), 1e-9)
        if self.points is None:
            return self.compute_max_fraction * n / (n + self.half_tokens)
        xs = np.log2([p[0] for p in self.points])
        ys = np.array([p[1] for p in self.points])
        x = np.log2(n)
        i = np.clip(np.searchsorted(xs, x, side="left"), 1, len(xs) - 1)  # first point at or past x
        y = ys[i - 1] + (x - xs[i - 1]) / (xs[i] - xs[i - 1]) * (ys[i] - ys[i - 1])
        return np.where(x <= xs[0], ys[0], np.where(x >= xs[-1], ys[-1], y))


class LinkSpec(BaseModel):
    """A link from the device that lists it to ``to``. Links are full duplex."""

    model_config = _STRICT

    to: Name
    kind: Literal["pcie", "nvlink", "nic", "unified"]
    gen: int | None = Field(default=None, ge=1, le=6)
    lanes: Literal[1, 2, 4, 8, 16] | None = None
    bytes_per_s: BytesPerS | None = Field(default=None, gt=0)
    # host->device rate from ordinary (pageable) host memory: the driver bounces it through a
    # pinned buffer, so it reaches a fraction of the pinned rate (probe measures both)
    pageable_bytes_per_s: BytesPerS | None = Field(default=None, gt=0)
    latency_s: Seconds | None = None

    @model_validator(mode="after")
    def _bandwidth_known(self) -> "LinkSpec":
        if self.bytes_per_s is None and self.kind != "unified":
            if self.kind == "pcie" and (self.gen is None or self.lanes is None):
                raise InputError("a pcie link needs gen and lanes, or bytes_per_s", key="bytes_per_s",
                                 fix="add e.g. `gen: 4` and `lanes: 16`, or `bytes_per_s: 25GB/s`")
            if self.kind != "pcie":
                raise InputError(f"a {self.kind} link needs bytes_per_s", key="bytes_per_s",
                                 fix="add e.g. `bytes_per_s: 450GB/s` (per direction)")
        if self.kind != "pcie" and (self.gen is not None or self.lanes is not None):
            raise InputError(f"gen/lanes only apply to pcie links, not {self.kind}", key="gen",
                             fix="remove gen and lanes, or set kind: pcie")
        return self

    @property
    def effective_bytes_per_s(self) -> float:
        """Bandwidth per direction: given, or the PCIe effective figure for gen x lanes."""
        if self.bytes_per_s is not None:
            return self.bytes_per_s
        if self.kind == "pcie":
            return PCIE_EFFECTIVE_X16_BYTES_PER_S[self.gen] * self.lanes / 16
        return math.inf  # unified memory: no copy at all

    @property
    def effective_pageable_bytes_per_s(self) -> float:
        """Bandwidth from pageable host memory: given, or ``PAGEABLE_FRACTION`` of the pinned rate."""
        if self.pageable_bytes_per_s is not None:
            return min(self.pageable_bytes_per_s, self.effective_bytes_per_s)
        return self.effective_bytes_per_s * PAGEABLE_FRACTION if self.kind == "pcie" else self.effective_bytes_per_s


class DeviceSpec(BaseModel):
    """One device (or ``count`` identical ones) inside a node."""

    model_config = _STRICT

    name: Name
    kind: Literal["gpu", "cpu", "nvme", "accelerator", "switch"]
    model: str = ""
    count: int = Field(default=1, ge=1, le=MAX_DEVICE_COUNT, strict=True)
    index_from: int = Field(default=0, ge=0, le=1 << 20)
    memory_bytes: Bytes = 0.0
    memory_bytes_per_s: BytesPerS = 0.0
    peak_ops_per_s: dict[str, OpsPerS] = Field(default_factory=dict)
    launch_overhead_s: Seconds | None = None
    # fixed framework work per hidden layer per forward step (attention and router dispatch,
    # bookkeeping): not on any datasheet; planner calibrate fits it to measured runs
    layer_overhead_s: Seconds = 0.0
    # bytes a CPU's expert kernels hold per stored byte, per format: ONNX Runtime keeps its own
    # pre-packed copy of the int8/int4 experts it runs (planner profile probe measures it)
    kernel_bytes_factor: dict[str, Annotated[float, Field(gt=0, le=16)]] = Field(default_factory=dict)
    efficiency: EfficiencySpec | None = None
    cores: int | None = Field(default=None, ge=1)
    # cpu only: the kernel families its instruction set has, and the peak per family and
    # format (AMX, AVX-512 and AVX2 kernels differ by up to an order of magnitude); an engine
    # profile picks the family its CPU kernels use, `peak_ops_per_s` is the default
    isa: tuple[Literal["avx2", "avx512", "amx"], ...] = ()
    peak_ops_per_s_by_kernel: dict[Literal["avx2", "avx512", "amx"], dict[str, OpsPerS]] = Field(default_factory=dict)
    # cpu only: sockets, each with its own DRAM (memory_bytes_per_s is the sum over them),
    # joined by a link of this bandwidth (UPI / Infinity Fabric, per direction)
    sockets: int = Field(default=1, ge=1, le=8)
    cross_socket_bytes_per_s: BytesPerS | None = Field(default=None, gt=0)
    # who makes the chip: an engine profile can state what its kernels reach per vendor
    # (llama.cpp runs its Metal backend on an Apple GPU, not its CUDA one); None: not stated
    vendor: Literal["nvidia", "amd", "apple", "intel"] | None = None
    power_w: Watts | None = None  # active (board / TDP) power: what a busy second draws
    idle_power_w: Watts | None = None  # drawn while idle (profiles.energy); None: 0 W
    price_per_hour_usd: float | None = Field(default=None, ge=0)
    links: tuple[LinkSpec, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _fill_efficiency(cls, data: object) -> object:
        # a partial `efficiency:` block is completed from the per-kind defaults
        if isinstance(data, dict) and isinstance(data.get("efficiency"), dict):
            defaults = DEFAULT_EFFICIENCY.get(data.get("kind"), {})
            data = dict(data, efficiency={**defaults, **data["efficiency"]})
        return data

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # an unstated vendor is left out, so profiles without one keep their digest
        data = handler(self)
        if isinstance(data, dict):
            for key in ("vendor", "idle_power_w"):  # unstated: left out, profiles keep their digest
                if data.get(key) is None:
                    data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _kind_rules(self) -> "DeviceSpec":
        compute = self.kind in ("gpu", "cpu", "accelerator")
        if self.idle_power_w is not None and (self.power_w is None or not 0 <= self.idle_power_w <= self.power_w):
            raise InputError("idle_power_w must lie between 0 and the device's power_w", key="idle_power_w",
                             value=self.idle_power_w, expected=f"0 .. {self.power_w} W (power_w)",
                             fix="state power_w (the active power) and an idle power no larger")
        if self.kind != "switch":
            if self.memory_bytes <= 0:
                raise InputError(f"a {self.kind} device needs memory_bytes > 0", key="memory_bytes",
                                 value=self.memory_bytes, fix="state its capacity, e.g. `memory_bytes: 24GiB`")
            if self.memory_bytes_per_s <= 0:
                raise InputError(f"a {self.kind} device needs memory_bytes_per_s > 0", key="memory_bytes_per_s",
                                 value=self.memory_bytes_per_s,
                                 fix="state its (read) bandwidth, e.g. `memory_bytes_per_s: 1008GB/s`")
        elif self.memory_bytes or self.peak_ops_per_s:
            raise InputError("a switch holds no memory and computes nothing", key="memory_bytes",
                             fix="remove memory_bytes and peak_ops_per_s from the switch")
        if compute and not self.peak_ops_per_s:
            raise InputError(f"a {self.kind} device needs peak_ops_per_s for at least one format",
                             key="peak_ops_per_s", fix="add e.g. `peak_ops_per_s: {bf16: 165TFLOPS}`")
        stated = [k for k in ("peak_ops_per_s", "efficiency", "launch_overhead_s", "layer_overhead_s",
                              "kernel_bytes_factor", "vendor") if getattr(self, k) not in (None, {}, 0.0)]
        if not compute and stated:
            raise InputError(f"a {self.kind} device does not compute", key=stated[0],
                             fix="remove peak_ops_per_s, efficiency, launch_overhead_s, layer_overhead_s, "
                                 "kernel_bytes_factor and vendor")
        allowed = {"accelerator": ACCELERATOR_COMPUTE_FORMATS, "gpu": GPU_COMPUTE_FORMATS}.get(
            self.kind, GENERAL_COMPUTE_FORMATS)
        for fmt in self.peak_ops_per_s:
            if fmt not in allowed:
                extra = (" (minifloat, low-bit and ternary formats are for accelerators)"
                         if fmt in ACCELERATOR_COMPUTE_FORMATS else "")
                raise InputError(f"format {fmt!r} is not allowed on a {self.kind}{extra}",
                                 key=f"peak_ops_per_s.{fmt}", expected="one of " + ", ".join(allowed),
                                 fix="remove it or use one of the allowed formats")
        if self.kind == "cpu" and self.cores is None:
            raise InputError("a cpu device needs cores", key="cores", fix="add e.g. `cores: 16`")
        cpu_only = [k for k in ("isa", "peak_ops_per_s_by_kernel", "cross_socket_bytes_per_s")
                    if getattr(self, k) not in (None, (), {})] + (["sockets"] if self.sockets != 1 else [])
        if self.kind != "cpu" and cpu_only:
            raise InputError(f"{cpu_only[0]} only applies to a cpu device", key=cpu_only[0],
                             fix=f"remove {cpu_only[0]} from this {self.kind}")
        for family, peaks in self.peak_ops_per_s_by_kernel.items():
            if self.isa and family not in self.isa:
                raise InputError(f"a peak for kernel family {family!r} that the cpu's isa does not list",
                                 key=f"peak_ops_per_s_by_kernel.{family}", value=list(self.isa),
                                 fix=f"add {family} to isa, or remove its peaks")
            for fmt in peaks:
                if fmt not in GENERAL_COMPUTE_FORMATS:
                    raise InputError(f"format {fmt!r} is not allowed on a cpu", key=f"peak_ops_per_s_by_kernel.{family}.{fmt}",
                                     expected="one of " + ", ".join(GENERAL_COMPUTE_FORMATS),
                                     fix="remove it or use one of the allowed formats")
        if self.sockets > 1 and self.cross_socket_bytes_per_s is None:
            raise InputError("a multi-socket cpu needs cross_socket_bytes_per_s", key="cross_socket_bytes_per_s",
                             fix="add the socket link's bandwidth, e.g. `cross_socket_bytes_per_s: 62GB/s` (3 UPI links)")
        for fmt in self.kernel_bytes_factor:
            if fmt not in GENERAL_COMPUTE_FORMATS:
                raise InputError(f"unknown format {fmt!r}", key=f"kernel_bytes_factor.{fmt}",
                                 expected="one of " + ", ".join(GENERAL_COMPUTE_FORMATS),
                                 fix="key the factors by the expert's storage format, e.g. `{int8: 1.4}`")
        return self

    def instance_names(self) -> list[str]:
        if self.count == 1 and self.index_from == 0:
            return [self.name]
        return [f"{self.name}{self.index_from + i}" for i in range(self.count)]


class NodeSpec(BaseModel):
    """A machine: devices and their links. ``count`` makes identical copies."""

    model_config = _STRICT

    name: Name
    count: int = Field(default=1, ge=1, le=MAX_NODE_COUNT, strict=True)
    devices: tuple[DeviceSpec, ...] = Field(min_length=1)
    price_per_hour_usd: float | None = Field(default=None, ge=0)

    def instance_names(self) -> list[str]:
        return [self.name] if self.count == 1 else [f"{self.name}{i}" for i in range(self.count)]


class HardwareProfile(BaseModel):
    """The YAML document: a named cluster of nodes plus cluster-level switches."""

    model_config = _STRICT

    name: Name
    description: str = ""
    sources: tuple[str, ...] = ()
    nodes: tuple[NodeSpec, ...] = Field(min_length=1)
    switches: tuple[DeviceSpec, ...] = ()

    def resolve(self, file: str | Path | None = None, lines: dict[tuple, int] | None = None) -> "Hardware":
        """Expand counts, check links, build the topology. Errors name ``file`` and the key."""
        devices = sum(s.count for s in self.switches) + sum(n.count * sum(d.count for d in n.devices)
                                                             for n in self.nodes)
        if devices > MAX_CLUSTER_DEVICES:
            raise InputError("the cluster expands to too many devices", file=file, key="nodes", value=devices,
                             expected=f"at most {MAX_CLUSTER_DEVICES} after count expansion",
                             fix="lower the node or device counts")
        return _resolve(self, file, lines or {})


# --------------------------------------------------------------------------- resolved form


@dataclass(frozen=True)
class Device:
    """One physical device. ``id`` is ``node/name``, e.g. ``node3/gpu5``."""

    id: str
    node: str
    name: str
    kind: str
    model: str
    memory_bytes: float
    memory_bytes_per_s: float
    peak_ops_per_s: dict[str, float]
    launch_overhead_s: float
    efficiency: EfficiencySpec | None
    cores: int | None
    power_w: float | None
    price_per_hour_usd: float | None
    idle_power_w: float | None = None  # see DeviceSpec (profiles.energy)
    layer_overhead_s: float = 0.0  # per hidden layer per forward step (see DeviceSpec)
    kernel_bytes_factor: dict[str, float] = field(default_factory=dict)  # see DeviceSpec
    isa: tuple[str, ...] = ()  # cpu kernel families (see DeviceSpec)
    peak_ops_per_s_by_kernel: dict[str, dict[str, float]] = field(default_factory=dict)
    sockets: int = 1
    cross_socket_bytes_per_s: float | None = None
    # the profile states this device's efficiency (a probe or calibrate measured it): an engine
    # profile's typical efficiency (profiles.engines) does not replace it
    efficiency_stated: bool = False
    vendor: str | None = None  # see DeviceSpec
    # set by an engine profile (profiles.engines.Engine.apply), zero/empty on bare hardware:
    expert_call_overhead_s: float = 0.0  # framework seconds per expert call (dispatch, Python)
    # the efficiency of the experts the engine runs from its expert cache on this device where it
    # runs them otherwise than resident ones (the bundle on a CPU: one single-thread ONNX Runtime
    # session per cached expert; profiles.engines DeviceKindSpec.cached_efficiency); None: `efficiency`
    cached_efficiency: EfficiencySpec | None = None
    # framework seconds per hidden layer for each token of a forward step past the first (routing,
    # indexing and eager ops whose work grows with the step's tokens; layer_overhead_s is one token's)
    token_overhead_s: float = 0.0
    fused_experts: bool = False  # one kernel per projection runs all of a layer's routed experts (no launch per call)
    step_overhead_s: float = 0.0  # framework seconds per decode step (sampling, scheduling)
    prefill_step_overhead_s: float = 0.0  # ... per prefill step
    unpack_weights_per_s: dict[str, float] = field(default_factory=dict)  # formats unpacked before the matmul
    # host seconds per linear (matmul) call of weights in this format, on top of its kernel:
    # launches and device syncs the engine's path for that format adds (transformers' fp8)
    linear_host_s: dict[str, float] = field(default_factory=dict)
    # ... of the dense step's linears only (expert calls do not pay it: profiles.engines.LinearHost.experts)
    dense_linear_host_s: dict[str, float] = field(default_factory=dict)
    # the engine's MoE block visits every expert of a layer each step, routed or not (an
    # eager loop over all experts): an unrouted one costs its call overhead and host work
    visits_every_expert: bool = False
    # share of the bf16 peak the engine's attention kernels reach over the cached context
    # (profiles.perf.attention_compute_s); None: attention priced as its KV read only
    attention_fraction: float | None = None
    # (fixed s, s per stored byte): host CPU time of one expert-cache miss on the engine's copy
    # worker, on this CPU (profiles.engines.MissHostCpu; profiles.perf.miss_compute_s)
    miss_host_cpu_s: tuple[float, float] = (0.0, 0.0)
    formats: tuple[str, ...] | None = None  # formats the engine runs here (None: any)
    engine: str = ""  # the engine profile applied to this device ("" on bare hardware)

    @property
    def is_compute(self) -> bool:
        return self.kind in ("gpu", "cpu", "accelerator")


@dataclass(frozen=True)
class Link:
    """A full-duplex link between two devices. ``id`` is stable and unique in the cluster."""

    id: str
    a: str
    b: str
    kind: str
    bytes_per_s: float
    latency_s: float
    pageable_bytes_per_s: float | None = None  # host->device rate from pageable memory (pcie to a cpu)


@dataclass(frozen=True)
class Memory:
    """A memory pool: one device's memory, several devices joined by unified links, or a node's
    NVMe drives striped together (``striped``: each expert is spread over every drive, so the
    drives read in parallel, each over its own link)."""

    id: str
    tier: str  # "hbm" (GPU), "dram" (CPU), "nvme", "accel"
    devices: tuple[str, ...]
    capacity_bytes: float
    bytes_per_s: float
    striped: bool = False


@dataclass(frozen=True)
class Route:
    """The path a transfer takes between two memories."""

    src: str
    dst: str
    links: tuple[Link, ...]
    bottleneck_bytes_per_s: float
    latency_s: float

    def transfer_s(self, n_bytes: float) -> float:
        """Seconds to move ``n_bytes`` alone on this route (no contention)."""
        if not self.links or n_bytes <= 0:
            return 0.0
        return n_bytes / self.bottleneck_bytes_per_s + self.latency_s


_TIER = {"gpu": "hbm", "cpu": "dram", "nvme": "nvme", "accelerator": "accel"}


@dataclass(frozen=True)
class Hardware:
    """A resolved cluster: devices by id, links, memory pools and the topology graph."""

    name: str
    description: str
    nodes: tuple[str, ...]
    devices: dict[str, Device]
    links: tuple[Link, ...]
    node_price_per_hour_usd: dict[str, float | None] = field(default_factory=dict)

    @cached_property
    def graph(self) -> nx.Graph:
        """Undirected graph: devices and switches as nodes, one edge per link (``link`` attr)."""
        g = nx.Graph()
        for dev in self.devices.values():
            g.add_node(dev.id, kind=dev.kind)
        for link in self.links:
            g.add_edge(link.a, link.b, link=link, weight=(1.0 / link.bytes_per_s if link.bytes_per_s < math.inf else 0.0))
        return g

    @cached_property
    def memories(self) -> dict[str, Memory]:
        """Memory pools by id. Devices joined by a ``unified`` link share one pool."""
        unified = nx.Graph()
        for dev in self.devices.values():
            if dev.kind != "switch":
                unified.add_node(dev.id)
        for link in self.links:
            if link.kind == "unified":
                unified.add_edge(link.a, link.b)
        pools: dict[str, Memory] = {}
        for comp in nx.connected_components(unified):
            members = sorted(comp, key=lambda d: (["gpu", "accelerator", "cpu", "nvme"].index(self.devices[d].kind), d))
            head = self.devices[members[0]]
            pools[head.id] = Memory(
                id=head.id, tier=_TIER[head.kind], devices=tuple(members),
                capacity_bytes=head.memory_bytes, bytes_per_s=head.memory_bytes_per_s,
            )
        # a node's NVMe drives hold experts striped over all of them (RAID-0 style), so a second
        # drive adds capacity and read bandwidth
        by_node: dict[str, list[Memory]] = {}
        for mem in pools.values():
            if mem.tier == "nvme" and len(mem.devices) == 1:
                by_node.setdefault(self.devices[mem.id].node, []).append(mem)
        for drives in by_node.values():
            if len(drives) > 1:
                for d in drives:
                    del pools[d.id]
                head = drives[0]
                pools[head.id] = Memory(id=head.id, tier="nvme", devices=tuple(d.id for d in drives),
                                        capacity_bytes=sum(d.capacity_bytes for d in drives),
                                        bytes_per_s=sum(d.bytes_per_s for d in drives), striped=True)
        return dict(sorted(pools.items()))

    def memory_of(self, device_id: str) -> Memory:
        """The pool that holds ``device_id``'s memory."""
        for mem in self.memories.values():
            if device_id in mem.devices:
                return mem
        raise KeyError(device_id)

    def devices_of_kind(self, kind: str) -> list[Device]:
        return [d for d in self.devices.values() if d.kind == kind]

    def route(self, src_memory: str, dst_memory: str) -> Route:
        """Route between two memories (device or pool ids): links and bottleneck bandwidth.

        The path minimises the sum of 1/bandwidth over its links (so fast links win); the
        bottleneck is the slowest of its links and of the two memories' own bandwidths.
        Memories in one unified pool need no transfer: the route is empty.
        """
        src_pool, dst_pool = self.memory_of(src_memory), self.memory_of(dst_memory)
        if src_pool.id == dst_pool.id:
            return Route(src_pool.id, dst_pool.id, (), math.inf, 0.0)
        # any member of the source pool may send, any member of the destination may receive
        best: tuple[float, list[str]] | None = None
        for s in src_pool.devices:
            for d in dst_pool.devices:
                try:
                    cost, path = nx.single_source_dijkstra(self.graph, s, d, weight="weight")
                except nx.NetworkXNoPath:
                    continue
                if best is None or (cost, len(path)) < (best[0], len(best[1])):
                    best = (cost, path)
        if best is None:
            raise InputError(f"no route from {src_memory} to {dst_memory}", file=None,
                             fix="add a link connecting them")
        path = best[1]
        links = tuple(self.graph.edges[u, v]["link"] for u, v in zip(path, path[1:]))
        bottleneck = min([l.bytes_per_s for l in links] + [src_pool.bytes_per_s, dst_pool.bytes_per_s])
        if src_pool.striped and links:
            # every drive sends its stripe over its own first link; the rest of the path is shared
            own = 0.0
            for drive in src_pool.devices:
                first = next(iter(self.graph.edges(drive, data="link")), None)
                own += min(self.devices[drive].memory_bytes_per_s, first[2].bytes_per_s if first else math.inf)
            bottleneck = min([own, dst_pool.bytes_per_s] + [l.bytes_per_s for l in links[1:]])
        return Route(src_pool.id, dst_pool.id, links, bottleneck, sum(l.latency_s for l in links))

    @property
    def price_per_hour_usd(self) -> float | None:
        """Cluster price per hour: node prices where given, else the sum of device prices."""
        total, known = 0.0, False
        for node in self.nodes:
            price = self.node_price_per_hour_usd.get(node)
            if price is None:
                prices = [d.price_per_hour_usd for d in self.devices.values()
                          if d.node == node and d.price_per_hour_usd is not None]
                price = sum(prices) if prices else None
            if price is not None:
                total, known = total + price, True
        return total if known else None

    @property
    def power_w(self) -> float | None:
        powers = [d.power_w for d in self.devices.values() if d.power_w is not None]
        return sum(powers) if powers else None


def _resolve(profile: HardwareProfile, file: str | Path | None, lines: dict[tuple, int]) -> Hardware:
    def fail(message: str, loc: tuple, **kw) -> InputError:
        line = None
        probe = loc
        while probe and line is None:
            line = lines.get(probe)
            probe = probe[:-1]
        from .errors import format_key
        return InputError(message, file=file, key=format_key(loc), line=line, **kw)

    switch_names = {s.name for s in profile.switches}
    devices: dict[str, Device] = {}
    links: list[Link] = []
    node_prices: dict[str, float | None] = {}
    node_names: list[str] = []
    seen_links: set[frozenset] = set()

    def make_device(node: str, name: str, spec: DeviceSpec) -> Device:
        eff = spec.efficiency
        if eff is None and spec.kind in DEFAULT_EFFICIENCY:
            eff = EfficiencySpec(**DEFAULT_EFFICIENCY[spec.kind])
        overhead = spec.launch_overhead_s
        if overhead is None:
            overhead = DEFAULT_LAUNCH_OVERHEAD_S.get(spec.kind, 0.0)
        return Device(
            id=f"{node}/{name}" if node else name, node=node, name=name, kind=spec.kind, model=spec.model,
            memory_bytes=spec.memory_bytes, memory_bytes_per_s=spec.memory_bytes_per_s,
            peak_ops_per_s=dict(spec.peak_ops_per_s), launch_overhead_s=overhead,
            layer_overhead_s=spec.layer_overhead_s, kernel_bytes_factor=dict(spec.kernel_bytes_factor),
            efficiency=eff, efficiency_stated=spec.efficiency is not None,
            cores=spec.cores, power_w=spec.power_w, idle_power_w=spec.idle_power_w, price_per_hour_usd=spec.price_per_hour_usd,
            isa=tuple(spec.isa), peak_ops_per_s_by_kernel={k: dict(v) for k, v in spec.peak_ops_per_s_by_kernel.items()},
            sockets=spec.sockets, cross_socket_bytes_per_s=spec.cross_socket_bytes_per_s, vendor=spec.vendor,
        )

    for si, sw in enumerate(profile.switches):
        if sw.kind != "switch":
            raise fail("cluster-level entries must be switches", ("switches", si, "kind"), value=sw.kind,
                       fix="move this device into a node, or set kind: switch")
        for name in sw.instance_names():
            devices[name] = make_device("", name, sw)

    for ni, node in enumerate(profile.nodes):
        for node_name in node.instance_names():
            if node_name in node_names:
                raise fail("duplicate node name", ("nodes", ni, "name"), value=node_name,
                           fix="give every node a unique name")
            node_names.append(node_name)
            node_prices[node_name] = node.price_per_hour_usd
            local: dict[str, tuple[int, DeviceSpec]] = {}
            for di, dev in enumerate(node.devices):
                for name in dev.instance_names():
                    if name in local:
                        raise fail("duplicate device name in node", ("nodes", ni, "devices", di, "name"),
                                   value=name, fix="give every device in a node a unique name (count: N expands "
                                   "`gpu` to gpu0..gpuN-1)")
                    local[name] = (di, dev)
                    devices[f"{node_name}/{name}"] = make_device(node_name, name, dev)
            if not any(d.kind == "cpu" for _, d in local.values()):
                raise fail("a node needs a cpu device (the host)", ("nodes", ni, "devices"),
                           fix="add a device with kind: cpu, memory_bytes, memory_bytes_per_s, cores and peak_ops_per_s")
            for name, (di, dev) in local.items():
                for li, link in enumerate(dev.links):
                    loc = ("nodes", ni, "devices", di, "links", li, "to")
                    if link.to in local:
                        target = f"{node_name}/{link.to}"
                    elif link.to in switch_names:
                        target = link.to
                    else:
                        known = sorted(set(local) | switch_names)
                        raise fail("link to an unknown device", loc, value=link.to,
                                   expected="one of " + ", ".join(known),
                                   fix="name a device of the same node (after count expansion) or a cluster switch")
                    src = f"{node_name}/{name}"
                    if target == src:
                        raise fail("a device cannot link to itself", loc, value=link.to, fix="link it to another device")
                    if link.kind == "unified":
                        other = devices[target]
                        if other.memory_bytes != dev.memory_bytes:
                            raise fail("devices joined by a unified link share one memory and must state the same "
                                       "memory_bytes", loc, value=link.to,
                                       fix=f"set memory_bytes equal on {name} and {link.to}")
                    pair = frozenset((src, target))
                    if pair in seen_links:
                        raise fail("duplicate link", loc, value=link.to, fix="state each link once, on one side")
                    seen_links.add(pair)
                    latency = link.latency_s if link.latency_s is not None else DEFAULT_LINK_LATENCY_S[link.kind]
                    links.append(Link(id=f"{src}->{target}", a=src, b=target, kind=link.kind,
                                      bytes_per_s=link.effective_bytes_per_s, latency_s=latency,
                                      pageable_bytes_per_s=link.effective_pageable_bytes_per_s))

    hw = Hardware(name=profile.name, description=profile.description, nodes=tuple(node_names),
                  devices=devices, links=tuple(links), node_price_per_hour_usd=node_prices)

    # every device must reach its node's host; nodes must reach each other
    g = hw.graph
    for ni, node in enumerate(profile.nodes):
        for node_name in node.instance_names():
            hosts = [d.id for d in hw.devices.values() if d.node == node_name and d.kind == "cpu"]
            for di, dev in enumerate(node.devices):
                if dev.kind in ("cpu", "switch"):
                    continue
                for name in dev.instance_names():
                    did = f"{node_name}/{name}"
                    if not any(nx.has_path(g, did, h) for h in hosts):
                        raise fail(f"{dev.kind} {name!r} has no link to the host cpu of its node",
                                   ("nodes", ni, "devices", di), value=name,
                                   fix=f"add `links: [{{kind: pcie, to: {hosts[0].split('/')[1]}, gen: 4, lanes: 16}}]` "
                                   f"to {name}")
    if len(node_names) > 1:
        hosts = [d.id for d in hw.devices.values() if d.kind == "cpu"]
        comp = nx.node_connected_component(g, hosts[0])
        for ni, node in enumerate(profile.nodes):
            for node_name in node.instance_names():
                if not any(d.id in comp for d in hw.devices.values() if d.node == node_name):
                    raise fail(f"node {node_name!r} is not connected to the rest of the cluster", ("nodes", ni),
                               value=node_name, fix="give a device of it a nic link to a cluster switch")
    return hw


def bundled_profiles() -> dict[str, Path]:
    """Bundled profile names (file stems) and their paths."""
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob("*.yaml"))}


def load_profile(name_or_path: str | Path) -> tuple[HardwareProfile, Hardware]:
    """Load and resolve a hardware profile from a bundled name or a YAML path.

    Returns:
        ``(profile, hardware)``: the validated document and its resolved cluster.

    Raises:
        InputError: unknown name, unreadable file, schema or topology error (one line).
    """
    text = str(name_or_path)
    path = Path(text)
    bundled = bundled_profiles()
    if not path.exists():
        if text in bundled:
            path = bundled[text]
        elif path.suffix in (".yaml", ".yml") or "/" in text:
            raise InputError("file not found", file=text, fix="check the path, or use a bundled profile name "
                             "(planner profiles list)")
        else:
            raise InputError("unknown hardware profile", value=text,
                             expected="a YAML file or one of: " + ", ".join(bundled),
                             fix="run `planner profiles list`")
    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError("the file is empty" if data is None else "a hardware profile must be a YAML mapping",
                         file=path, value=InputError._UNSET if data is None else type(data).__name__,
                         fix="start the file with `name: ...` and `nodes: [...]`")
    try:
        profile = HardwareProfile.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc, file=path, lines=lines) from None
    return profile, profile.resolve(file=path, lines=lines)
