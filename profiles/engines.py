"""Engine profiles: the software that runs a plan, beside the hardware it runs on.

Hardware says what the machine can do; an engine says what the software makes of it. A
profile (bundled YAML in ``profiles/engines/`` or the user's own file) states

- framework overheads, per device kind: per hidden layer of a forward step and per expert
  call, and per step (decode and prefill), each with its source;
- whether a layer's routed experts run as one fused kernel per projection
  (``fused_experts``: no kernel launch per expert call, the fused kernel's launches once per
  MoE layer);
- the kernel path per (device kind, format): ``native`` (a fused kernel reads the stored
  bytes), ``unsupported``, ``{unpack_weights_per_s: R}`` (the weights are unpacked to
  fp16 at R weights/s, then an fp16 matmul reads them), or ``{host_s_per_linear: T}`` (a
  native kernel whose every linear call also costs T of host work: launches, device syncs),
  or ``{computes_in: F}`` (a weight-only kernel: it reads the stored bytes and dequantises
  them in registers, but its matmul runs on activations of format F, so at F's peak, not at
  a peak the device states for the stored format: vLLM's W4A16 MXFP4 MoE on GPUs without
  its SM100 FlashInfer path); a format the profile does not list for a device kind is
  unsupported there;
- the share of a device's memory bandwidth and peak its kernels typically reach there
  (``efficiency``, and per chip vendor ``efficiency_by_vendor``: llama.cpp runs Metal on an
  Apple GPU; a hardware profile's own measured efficiency wins, except over a probed one
  (source "probe ...": ``planner engines probe`` timed the engine's own kernels past the
  caches), which a calibrated hardware efficiency wins over again);
- whether its MoE block visits every expert of a layer each step, routed or not
  (``expert_loop: all``, an eager loop over all experts);
- the CPU kernel family (``amx``, ``avx512``, ``avx2``: the widest of them up to this one
  that the CPU has sets its peaks), whether host memory is pinned or pageable (which
  host->device copy rate the links reach), and whether it is NUMA-aware on multi-socket CPUs;
- what it can place (per ``expert``, per ``tensor`` of a layer, per ``layer``), which
  execution sites, cache evictions and prefetch policies it has;
- whether it runs host-held experts on the GPU, after copying them, once a micro-batch of
  the prompt is large enough (``op_offload``: llama.cpp's op offload, :class:`OpOffload`);
- whether it can keep the KV cache in host memory, and where attention then runs
  (``kv_offload``: llama.cpp's ``--no-kv-offload``, :class:`KVOffload`).

Every prediction is for (hardware, engine): :meth:`Engine.apply` returns the hardware as
this engine sees it (devices carry the overheads, unpack rates and formats, CPUs the
family's peaks, links the copy rate), and the shared performance model
(:mod:`profiles.perf`) prices that; the planner, its baselines, the simulator and the
exporters all take the same applied hardware, so one placement has one price.

    engine = load_engine("llama.cpp")        # bundled name or a path
    hw = engine.apply(load_profile("desktop-4090")[1])
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      model_serializer, model_validator)

from .engine_kv import KVCacheSpec
from .engine_memory import RuntimeMemory
from .errors import InputError, from_validation_error
from .formats import get_format
from .hardware import CPU_KERNEL_FAMILIES, Device, Hardware, Link
from .limits import MAX_TEXT_FILE_BYTES
from .units import parse_time
from .yamlio import load_yaml

__all__ = ["EngineProfile", "Engine", "OpOffload", "KVOffload", "WeightOnly", "load_engine", "bundled_engines", "ENGINES_DIR",
           "DEFAULT_ENGINE", "PLACEMENTS", "SITES", "overhead_rows", "engine_hardware"]

ENGINES_DIR = Path(__file__).parent / "engines"
DEFAULT_ENGINE = "bundle"
PLACEMENTS = ("expert", "tensor", "layer")
SITES = ("resident", "fetch", "local", "hybrid", "stream")

_STRICT = ConfigDict(extra="forbid", frozen=True)
Seconds = Annotated[float, BeforeValidator(parse_time)]


def _parse_rate(value: object) -> float:
    """Weights per second: a number, or ``"60G/s"`` style (SI prefix K, M, G, T)."""
    if isinstance(value, str):
        text = value.strip().removesuffix("/s").removesuffix("weights").strip()
        scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(text[-1:], 1.0)
        try:
            number = float(text[:-1] if scale != 1.0 else text) * scale
        except ValueError:
            raise InputError("invalid rate", value=value, expected="weights per second, e.g. 60G/s or 6.0e10") from None
        value = number
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError("invalid rate", value=value, expected="a positive number of weights per second, e.g. 60G/s")
    return float(value)


PerS = Annotated[float, BeforeValidator(_parse_rate)]
Source = Annotated[str, Field(min_length=3)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_.+-]*$")]


def _known_format(fmt: str, key: str) -> None:
    """Refuse a format name no registry knows, naming the key that holds it."""
    try:
        get_format(fmt)
    except InputError as exc:
        raise InputError(exc.message, key=key, value=fmt, expected=exc.expected,
                         fix="use a format `planner formats list` shows, or define it in a formats file") from None


class SourcedSeconds(BaseModel):
    """A time with where it comes from (a public measurement or document, or ``probe``)."""

    model_config = _STRICT
    value: Seconds
    source: Source


class MissHostCpu(BaseModel):
    """Host CPU seconds one expert-cache miss costs the runtime's copy worker (reading the
    expert, making it ready to compute: the bundle builds an ONNX Runtime session per missed
    CPU expert), ``fixed_s + bytes x per_byte_s`` of the expert's stored bytes; its thread
    CPU time, not its wall time (a read past the page cache mostly waits for the drive).
    Where the compute device is that CPU, the time comes out of the compute's cores
    (:func:`profiles.perf.miss_compute_s`)."""

    model_config = _STRICT
    fixed_s: Seconds = Field(ge=0)
    per_byte_s: float = Field(ge=0)
    source: Source


class Unpack(BaseModel):
    """Unpack-then-matmul: the weights are dequantised to fp16 at this rate first."""

    model_config = _STRICT
    unpack_weights_per_s: PerS = Field(gt=0)
    source: Source


class SourcedFraction(BaseModel):
    model_config = _STRICT
    value: float = Field(gt=0, le=1)
    source: Source


class LinearHost(BaseModel):
    """A native kernel whose every linear (matmul) call also costs this much host time: the
    launches and device synchronisations the engine's path for the format adds around it.

    ``experts: false``: only the dense step's linears pay it (the bundle runs each int8/int4
    dense matrix on a CPU as its own ONNX Runtime call, while an expert is one call whose
    fixed cost its ``expert_call_overhead_s`` holds)."""

    model_config = _STRICT
    host_s_per_linear: Seconds = Field(gt=0)
    experts: bool = True
    source: Source

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)  # left out at its default: profiles without it keep their digest
        if isinstance(data, dict) and data.get("experts") is True:
            data.pop("experts")
        return data


class WeightOnly(BaseModel):
    """A weight-only kernel: it reads the stored weights and dequantises them in registers
    (memory priced at the stored bytes, as ``native``), while its matmul runs on activations of
    ``computes_in``, so at that format's peak even where the device states a peak for the
    stored format (an FP4 tensor core the kernel does not use)."""

    model_config = _STRICT
    computes_in: str
    source: Source

    @model_validator(mode="after")
    def _format_known(self) -> "WeightOnly":
        _known_format(self.computes_in, "computes_in")
        return self


def _kernel_kind(value: object) -> str:
    if isinstance(value, LinearHost) or (isinstance(value, dict) and "host_s_per_linear" in value):
        return "host"
    if isinstance(value, WeightOnly) or (isinstance(value, dict) and "computes_in" in value):
        return "weight_only"
    return "unpack" if isinstance(value, (dict, Unpack)) else "path"


# a mapping is an unpack path, a host-cost path or a weight-only path (their own errors name
# their keys), anything else native/unsupported
KernelPath = Annotated[Union[Annotated[Unpack, Tag("unpack")], Annotated[LinearHost, Tag("host")],
                             Annotated[WeightOnly, Tag("weight_only")],
                             Annotated[Literal["native", "unsupported"], Tag("path")]],
                       Discriminator(_kernel_kind)]


class EngineEfficiency(BaseModel):
    """The share of a device's datasheet figures the engine's kernels reach on that kind of
    device (``profiles.hardware.EfficiencySpec``'s fields; the ones left out keep the device's).

    Used where the hardware profile states no efficiency of its own: a probed or calibrated
    profile measured this machine, and that measurement wins over an engine's typical figure.
    """

    model_config = _STRICT
    memory_fraction: float | None = Field(default=None, gt=0, le=1)
    compute_max_fraction: float | None = Field(default=None, gt=0, le=1)
    half_tokens: float | None = Field(default=None, gt=0)
    source: Source


class ExpertLoop(BaseModel):
    """Which experts the engine's MoE block visits each step: ``routed`` (only those some
    token routes to) or ``all`` (an eager loop over every expert of the layer, an unrouted one
    running its linears on an empty batch)."""

    model_config = _STRICT
    value: Literal["routed", "all"]
    source: Source


Vendor = Literal["nvidia", "amd", "apple", "intel"]


class DeviceKindSpec(BaseModel):
    """What the engine does on one kind of device (gpu, cpu or accelerator)."""

    model_config = _STRICT
    layer_overhead_s: SourcedSeconds | None = None  # per hidden layer per forward step
    expert_call_overhead_s: SourcedSeconds | None = None  # per expert call (dispatch, Python)
    # per hidden layer per token of a forward step past the first (layer_overhead_s is one token's)
    token_overhead_s: SourcedSeconds | None = None
    kernels: dict[str, KernelPath] = Field(min_length=1)
    kernel_family: Literal["avx2", "avx512", "amx"] | None = None  # cpu only
    numa: Literal["interleave", "aware"] = "interleave"  # cpu only
    efficiency: EngineEfficiency | None = None
    # on a device of this vendor (the hardware profile's `vendor`) the engine runs another
    # backend whose kernels reach other shares (llama.cpp: Metal on an Apple GPU); replaces
    # `efficiency` there
    efficiency_by_vendor: dict[Vendor, EngineEfficiency] = Field(default_factory=dict)
    # the share its kernels reach for experts it runs from its expert cache on this kind of
    # device, where it runs them otherwise than resident ones (the bundle on a CPU: one
    # single-thread ONNX Runtime session per cached expert, resident ones in the layer's session
    # on every thread); priced where `efficiency` is (profiles.perf.efficiency_of); None: `efficiency`
    cached_efficiency: EngineEfficiency | None = None
    expert_loop: ExpertLoop | None = None  # None: routed experts only
    # share of the device's bf16 (widest float) peak its attention kernels reach over the cached
    # context (profiles.perf.attention_compute_s: attention costs the longer of its KV read and
    # its FLOPs at this share); None: attention priced as its KV read only
    attention_fraction: SourcedFraction | None = None

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # fields left at their defaults are left out, so profiles without them keep their digest
        data = handler(self)
        if isinstance(data, dict):
            for key in ("efficiency_by_vendor", "expert_loop", "token_overhead_s", "attention_fraction",
                        "cached_efficiency"):
                if data.get(key) in (None, {}):
                    data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _formats_known(self) -> "DeviceKindSpec":
        for fmt in self.kernels:
            _known_format(fmt, f"kernels.{fmt}")
        return self


class SourcedFlag(BaseModel):
    """A yes/no property of the engine with where it comes from."""

    model_config = _STRICT
    value: bool
    source: Source


class OpOffload(BaseModel):
    """The engine runs an op whose weights sit in host memory on the GPU when the op's batch
    is large enough, copying the weights over the host->GPU link first (llama.cpp's "op
    offload": the ggml scheduler asks the GPU backend's ``offload_op``, which says yes from
    ``min_batch_tokens`` tokens on; for a MoE layer's MUL_MAT_ID the batch is its tokens).

    The prompt is processed in micro-batches of ``micro_batch_tokens`` tokens (llama.cpp's
    ``-ub``): each is a forward pass of its own, and each copies the weights again.
    ``copies`` says what one copy moves: ``whole-tensor`` every expert of the layer's
    projection, ``used-experts`` only the experts the micro-batch's tokens route to. The copy
    and the GPU's computation run one after the other (no overlap). Without this block the
    engine computes host-held experts where they live, and a prompt is one forward pass.
    """

    model_config = _STRICT
    min_batch_tokens: int = Field(ge=1)
    micro_batch_tokens: int = Field(ge=1)
    copies: Literal["whole-tensor", "used-experts"]
    source: Source

    @model_validator(mode="after")
    def _reachable(self) -> "OpOffload":
        if self.min_batch_tokens > self.micro_batch_tokens:
            raise InputError("no micro-batch reaches the op offload threshold", key="op_offload.min_batch_tokens",
                             value=self.min_batch_tokens, expected=f"at most micro_batch_tokens "
                             f"({self.micro_batch_tokens})", fix="lower min_batch_tokens, or drop the op_offload "
                             "block for an engine that never offloads")
        return self


class KVOffload(BaseModel):
    """The engine can keep the whole KV cache in host memory (a plan's ``kv_cache: host``):
    ``attention`` says where attention then runs, ``host`` (the host CPU reads the cache
    where it lives, the step's query, keys and values cross the link and the output comes
    back: llama.cpp's ``--no-kv-offload``, whose KV buffers are not weights, so op offload
    never moves them) or ``device`` (the cache crosses the link to the compute device each
    forward pass); ``flag`` is the command-line switch the exporter writes. Without this
    block the KV cache stays on the compute device."""

    model_config = _STRICT
    attention: Literal["host", "device"]
    flag: str = Field(min_length=1)
    source: Source


class StepOverheads(BaseModel):
    model_config = _STRICT
    decode: SourcedSeconds
    prefill: SourcedSeconds


class EngineProfile(BaseModel):
    """The YAML document of an engine profile (``planner engines schema`` prints its schema)."""

    model_config = _STRICT

    name: Name
    description: str = ""
    sources: tuple[str, ...] = Field(min_length=1)
    gpu: DeviceKindSpec | None = None
    cpu: DeviceKindSpec
    accelerator: DeviceKindSpec | None = None
    step_overhead_s: StepOverheads
    host_memory: Literal["pinned", "pageable"]
    # the format the engine stores when a plan asks for another one (llama.cpp stores int4 as
    # Q4_K, int8 as Q8_0): the planner sizes and prices the stored one
    format_aliases: dict[str, str] = Field(default_factory=dict)
    # whether a layer's routed experts run as one fused kernel per projection (llama.cpp's
    # MUL_MAT_ID, vLLM/SGLang fused_moe, kTransformers' CPU MoE op): then an expert call pays
    # no kernel launch of its own, and each MoE layer pays the fused kernel's launches once
    # (profiles.perf); false: one launch per expert call (an eager per-expert loop)
    fused_experts: SourcedFlag | None = None
    # share of a drive's sequential read rate the engine's expert reads reach (memory-mapped
    # page faults read in small pieces; direct reads of whole experts reach the drive's rate)
    disk_read_fraction: SourcedFraction | None = None
    # host-held experts run on the GPU after a copy when a micro-batch is large enough
    # (llama.cpp's op offload); None: they run where they live, a prompt is one forward pass
    op_offload: OpOffload | None = None
    # the KV cache may live in host memory (llama.cpp --no-kv-offload); None: on the compute device
    kv_offload: KVOffload | None = None
    # fixed seconds of each expert read from a drive, on top of its bytes at that fraction of
    # the rate (opening and reading it, making it ready to compute: the bundle builds an ONNX
    # Runtime session per missed CPU expert); priced as latency on the drive's links
    disk_read_overhead_s: SourcedSeconds | None = None
    # host CPU seconds of each miss on the runtime's copy worker (MissHostCpu); None: none priced
    miss_host_cpu_s: MissHostCpu | None = None
    # what the runtime holds besides the placed weights (staged experts, scratch, its own
    # memory: profiles.engine_memory); None: nothing counted past the device reserve
    runtime_memory: RuntimeMemory | None = None
    # how it holds the KV cache: paged blocks or per-request slots, and its preemption
    # (profiles.engine_kv); None: token-granular blocks, recompute, newest first
    kv_cache: KVCacheSpec | None = None
    # runs expert-parallel plans (a layer's experts sharded over GPUs, all-to-all between them);
    # None: it does not
    expert_parallel: SourcedFlag | None = None
    # runs nested (bit-plane) int8 experts (profiles.nested): both planes, the high plane with
    # the low plane fetched at every use, or the high plane alone; None: it does not
    nested: SourcedFlag | None = None
    # runs planned low-bit copies (profiles.miss_copy): a low-gate miss of a fetch expert loads
    # its int4/int2 copy, which later hits run; None: it does not
    miss_copy: SourcedFlag | None = None
    # gives ranks unequal work (profiles.engines: uneven_ranks): a data-parallel attention share
    # and a number of expert slots set per rank; None: every rank the same, as SGLang and vLLM
    uneven_ranks: SourcedFlag | None = None
    placement: Literal["expert", "tensor", "layer"]
    sites: tuple[Literal["resident", "fetch", "local", "hybrid", "stream"], ...] = Field(min_length=1)
    eviction: tuple[Literal["lru", "lfu", "score", "static", "belady"], ...] = ()  # empty: no expert cache
    prefetch: tuple[Literal["none", "next-layer", "transition", "oracle"], ...] = ("none",)

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # a profile without a kv_cache block or expert_parallel keeps the digest it had before
        data = handler(self)
        if isinstance(data, dict):
            for key in ("kv_cache", "expert_parallel", "kv_offload", "nested", "miss_copy", "uneven_ranks"):
                if data.get(key) is None:
                    data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "EngineProfile":
        if "resident" not in self.sites:
            raise InputError("every engine runs resident experts", key="sites", value=list(self.sites),
                             fix="add resident to sites")
        if ("fetch" in self.sites or "hybrid" in self.sites) and not self.eviction:
            raise InputError("fetch and hybrid sites go through an expert cache, which needs an eviction policy",
                             key="eviction", value=[], fix="add e.g. `eviction: [lru]`, or drop fetch/hybrid from sites")
        if "none" not in self.prefetch:
            raise InputError("every engine can run without prefetch", key="prefetch", value=list(self.prefetch),
                             fix="add none to prefetch")
        for asked, stored in self.format_aliases.items():
            for fmt in (asked, stored):
                _known_format(fmt, f"format_aliases.{asked}")
        if self.cpu.kernel_family is None:
            raise InputError("the cpu section needs the kernel family its kernels use", key="cpu.kernel_family",
                             expected="one of " + ", ".join(CPU_KERNEL_FAMILIES),
                             fix="add e.g. `kernel_family: avx512`")
        for kind in ("gpu", "accelerator"):
            spec = getattr(self, kind)
            if spec is not None and spec.kernel_family is not None:
                raise InputError("kernel_family only applies to the cpu section", key=f"{kind}.kernel_family",
                                 fix="remove it")
        return self


@dataclass(frozen=True)
class Engine:
    """A validated engine profile, ready to apply to hardware."""

    profile: EngineProfile
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.profile.name

    def kind_spec(self, kind: str) -> DeviceKindSpec | None:
        return getattr(self.profile, kind, None) if kind in ("gpu", "cpu", "accelerator") else None

    def supports(self, kind: str, fmt: str) -> bool:
        """Whether the engine runs weights stored as ``fmt`` on a ``kind`` device."""
        spec = self.kind_spec(kind)
        return spec is not None and spec.kernels.get(fmt, "unsupported") != "unsupported"

    def stored(self, fmt: str) -> str:
        """The format the engine stores when asked for ``fmt``."""
        return self.profile.format_aliases.get(fmt, fmt)

    def runs_on(self, kind: str) -> bool:
        return self.kind_spec(kind) is not None

    @property
    def modes(self) -> tuple[str, ...]:
        """The planner's per-layer modes this engine can run (planner.costs.MODES)."""
        sites = set(self.profile.sites)
        return tuple(m for m in ("fetch", "local", "hybrid", "stream") if m in sites)

    @property
    def op_offload(self) -> OpOffload | None:
        return self.profile.op_offload

    @property
    def kv_offload(self) -> KVOffload | None:
        """How it keeps the KV cache in host memory (None: it cannot)."""
        return self.profile.kv_offload

    @property
    def runs_expert_parallel(self) -> bool:
        """Whether it runs expert-parallel plans (its profile's ``expert_parallel``)."""
        return bool(self.profile.expert_parallel and self.profile.expert_parallel.value)

    @property
    def runs_uneven_ranks(self) -> bool:
        """Whether it gives EP ranks unequal attention shares and slot counts (``uneven_ranks``)."""
        return bool(self.profile.uneven_ranks and self.profile.uneven_ranks.value)

    @property
    def has_cache(self) -> bool:
        return bool(self.profile.eviction) and ("fetch" in self.profile.sites or "hybrid" in self.profile.sites)

    def apply(self, hw: Hardware) -> Hardware:
        """``hw`` as this engine sees it: overheads, kernel paths, CPU family peaks, copy rates.

        Idempotent: hardware this engine was applied to comes back unchanged; hardware seen
        through another engine is refused (its bare figures are gone).
        """
        applied = {d.engine for d in hw.devices.values() if d.engine}
        if applied == {self.name}:
            return hw
        if applied:
            raise ValueError(f"hardware {hw.name} is already seen through engine {applied.pop()!r}")
        devices = {did: self._device(d) for did, d in hw.devices.items()}
        links = tuple(self._link(link, hw) for link in hw.links)
        return dataclasses.replace(hw, devices=devices, links=links)

    def _device(self, d: Device) -> Device:
        if d.kind == "nvme" and self.profile.disk_read_fraction is not None:
            return dataclasses.replace(d, engine=self.name,
                                       memory_bytes_per_s=d.memory_bytes_per_s * self.profile.disk_read_fraction.value)
        spec = self.kind_spec(d.kind)
        if not d.is_compute or spec is None:
            return dataclasses.replace(d, engine=self.name)
        unpack = {fm: k.unpack_weights_per_s for fm, k in spec.kernels.items() if isinstance(k, Unpack)}
        host = {fm: k.host_s_per_linear for fm, k in spec.kernels.items() if isinstance(k, LinearHost) and k.experts}
        dense_host = {fm: k.host_s_per_linear for fm, k in spec.kernels.items()
                      if isinstance(k, LinearHost) and not k.experts}
        formats = tuple(fm for fm, k in spec.kernels.items() if k != "unsupported")
        steps = self.profile.step_overhead_s
        changes = dict(
            layer_overhead_s=d.layer_overhead_s + (spec.layer_overhead_s.value if spec.layer_overhead_s else 0.0),
            expert_call_overhead_s=spec.expert_call_overhead_s.value if spec.expert_call_overhead_s else 0.0,
            token_overhead_s=spec.token_overhead_s.value if spec.token_overhead_s else 0.0,
            step_overhead_s=steps.decode.value, prefill_step_overhead_s=steps.prefill.value,
            unpack_weights_per_s=unpack, formats=formats, engine=self.name,
            fused_experts=bool(self.profile.fused_experts and self.profile.fused_experts.value),
            linear_host_s=host, dense_linear_host_s=dense_host,
            visits_every_expert=bool(spec.expert_loop and spec.expert_loop.value == "all"),
            attention_fraction=spec.attention_fraction.value if spec.attention_fraction else None,
        )
        eff, whose = spec.efficiency, f"engine {self.name}"
        if d.vendor is not None and d.vendor in spec.efficiency_by_vendor:
            eff, whose = spec.efficiency_by_vendor[d.vendor], f"engine {self.name} on {d.vendor}"
        if eff is not None and d.efficiency is not None and (not d.efficiency_stated or _probed_over(eff, d)):
            given = {k: v for k, v in eff.model_dump(exclude={"source"}).items() if v is not None}
            if d.efficiency_stated:  # the hardware's measured curve is of another kernel than the engine's
                given["points"] = None
            changes["efficiency"] = d.efficiency.model_copy(update=given | {"source": f"{whose}: {eff.source}"})
            cached = spec.cached_efficiency  # relative to the same figures as `efficiency`: applied with it
            if cached is not None:
                given = {k: v for k, v in cached.model_dump(exclude={"source"}).items() if v is not None}
                changes["cached_efficiency"] = changes["efficiency"].model_copy(
                    update=given | {"source": f"engine {self.name}, cached experts: {cached.source}"})
        if d.kind == "cpu":
            cpu = self.profile.miss_host_cpu_s  # the copy worker runs on the host CPU's cores
            if cpu is not None:
                changes["miss_host_cpu_s"] = (cpu.fixed_s, cpu.per_byte_s)
            family = _family(d, spec.kernel_family)
            if family is not None:
                changes["peak_ops_per_s"] = dict(d.peak_ops_per_s) | dict(d.peak_ops_per_s_by_kernel[family])
            if d.sockets > 1 and spec.numa == "interleave" and d.cross_socket_bytes_per_s:
                # interleaved pages: (S-1)/S of every read crosses the socket link
                share = (d.sockets - 1) / d.sockets
                changes["memory_bytes_per_s"] = min(d.memory_bytes_per_s, d.cross_socket_bytes_per_s / share)
        weight_only = {fm: k.computes_in for fm, k in spec.kernels.items() if isinstance(k, WeightOnly)}
        if weight_only:
            # the stored format computes at its activations' peak (perf.compute_format reads the peaks)
            peaks = dict(changes.get("peak_ops_per_s", d.peak_ops_per_s))
            for fm, act in weight_only.items():
                peaks.pop(fm, None)
                if act in peaks:
                    peaks[fm] = peaks[act]
            changes["peak_ops_per_s"] = peaks
        return dataclasses.replace(d, **changes)

    def _link(self, link: Link, hw: Hardware) -> Link:
        ends = [hw.devices.get(link.a), hw.devices.get(link.b)]
        read = self.profile.disk_read_overhead_s
        if read is not None and any(e is not None and e.kind == "nvme" for e in ends):
            link = dataclasses.replace(link, latency_s=link.latency_s + read.value)
        if self.profile.host_memory != "pageable" or link.pageable_bytes_per_s is None:
            return link
        if not any(e is not None and e.kind == "cpu" for e in ends):
            return link
        return dataclasses.replace(link, bytes_per_s=min(link.bytes_per_s, link.pageable_bytes_per_s))


def _probed_over(eff: EngineEfficiency, d: Device) -> bool:
    """Whether an engine efficiency replaces the one a hardware profile states: where the
    engine's was probed (``planner engines probe`` timed the engine's own kernels past the
    caches: a "probe" source) and the hardware's was not calibrated (``planner calibrate``
    fits it to the engine's own runs, which then says more than either probe)."""
    return eff.source.startswith("probe") and not (d.efficiency is not None
                                                   and d.efficiency.source.startswith("calibrated"))


def _family(cpu: Device, wanted: str | None) -> str | None:
    """The widest kernel family up to ``wanted`` that the CPU has and states peaks for."""
    if wanted is None or not cpu.peak_ops_per_s_by_kernel:
        return None
    have = set(cpu.isa) if cpu.isa else set(cpu.peak_ops_per_s_by_kernel)
    order = CPU_KERNEL_FAMILIES[: CPU_KERNEL_FAMILIES.index(wanted) + 1]
    for family in reversed(order):
        if family in have and family in cpu.peak_ops_per_s_by_kernel:
            return family
    return None


def engine_hardware(hw: Hardware, engine: str | Path | None) -> Hardware:
    """``hw`` seen through the engine ``engine`` (a bundled name or a path; None: the default)."""
    return load_engine(engine).apply(hw)


def bundled_engines() -> dict[str, Path]:
    """Bundled engine names (the ``name:`` of each file) and their paths."""
    out = {}
    for path in sorted(ENGINES_DIR.glob("*.yaml")):
        out[path.stem] = path
    return out


def load_engine(name_or_path: str | Path | None = None) -> Engine:
    """Load an engine profile from a bundled name (default: the bundle runtime) or a YAML path.

    Raises:
        InputError: unknown name, unreadable file, schema error (one line with file:line and key).
    """
    text = DEFAULT_ENGINE if name_or_path is None else str(name_or_path)
    path = Path(text)
    bundled = bundled_engines()
    if text in bundled and not path.is_file():
        path = bundled[text]
    elif not path.exists():
        if path.suffix in (".yaml", ".yml") or "/" in text:
            raise InputError("file not found", file=text, fix="check the path, or use a bundled engine name "
                             "(planner engines list)")
        raise InputError("unknown engine", value=text, expected="a YAML file or one of: " + ", ".join(bundled),
                         fix="run `planner engines list`")
    key = _file_key(path)
    if key is not None and key in _LOADED:  # the simulator and exporters ask again and again
        return _LOADED[key]
    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError("the file is empty" if data is None else "an engine profile must be a YAML mapping",
                         file=path, value=InputError._UNSET if data is None else type(data).__name__,
                         fix="start the file with `name: ...`; `planner engines show bundle --yaml` prints an example")
    try:
        profile = EngineProfile.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc, file=path, lines=lines) from None
    engine = Engine(profile=profile, path=path)
    if key is not None:
        _LOADED[key] = engine
    return engine


# validated profiles by (file, content digest): an edited file is read again
_LOADED: dict[tuple[str, str], Engine] = {}


def _file_key(path: Path) -> tuple[str, str] | None:
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_TEXT_FILE_BYTES:
            return None  # load_yaml says what is wrong with it
        return str(path.resolve()), hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def overhead_rows(engine: Engine) -> list[tuple[str, str, float, str]]:
    """``(device kind, what, seconds, source)`` for every overhead the profile states."""
    rows = []
    for kind in ("gpu", "cpu", "accelerator"):
        spec = engine.kind_spec(kind)
        if spec is None:
            continue
        for what in ("layer_overhead_s", "token_overhead_s", "expert_call_overhead_s"):
            v = getattr(spec, what)
            if v is not None:
                rows.append((kind, what, v.value, v.source))
    for phase in ("decode", "prefill"):
        v = getattr(engine.profile.step_overhead_s, phase)
        rows.append(("step", phase, v.value, v.source))
    read = engine.profile.disk_read_overhead_s
    if read is not None:
        rows.append(("disk", "disk_read_overhead_s", read.value, read.source))
    return [r for r in rows if math.isfinite(r[2])]
