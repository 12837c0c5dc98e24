"""plan.json as the runtime reads it: plain JSON, checked for what the runtime uses.

The planner's ``Plan`` (planner/plan.py) is the authority on the format; this module reads
the same file without importing it (bundles run without the planner). Per MoE layer the
plan lists, indexed by expert id, ``home`` (memory pool id), ``format`` and ``site``, plus
``cache_slots`` on ``cache_device``; plan-wide ``compute_device``, ``host_device``,
``prefetch``, ``eviction`` and ``dense_format`` (the weights that are not routed experts;
see dense.py). A multi-GPU pipeline plan adds ``layer_devices``: per MoE layer the compute
device that runs its dense part, its resident and cached experts and its fetches (absent:
``compute_device`` runs every layer; it runs the embedding and the head in either case).

The runtime sorts every memory pool into one of three tiers by its role:

- ``device``: the memory of the layer's compute device (``layer_devices``, else
  ``compute_device``);
- ``host``: the host CPU's DRAM (``host_device``), pinned when CUDA is present;
- ``disk``: any other home; a single-node plan's only other home is the node's NVMe
  (planner.optimize.make_setup), read on demand from the checkpoint (tensorfile.py).

Pass ``memory_tiers`` to override the guess for particular memory ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RuntimeInputError
from .formats import UNPACK_FORMATS

__all__ = [
    "FLOAT_FORMATS",
    "PLAN_FORMAT_VERSION",
    "QUANT_FORMATS",
    "RUNNABLE_FORMATS",
    "STORED_FORMATS",
    "SITES",
    "TIERS",
    "LayerSpec",
    "RuntimePlan",
    "parse_plan",
    "read_plan",
]

PLAN_FORMAT_VERSION = 1
SITES = ("resident", "fetch", "local", "hybrid", "stream")
TIERS = ("device", "host", "disk")
PLANES = ("both", "fetch-low", "high")
NESTED_FORMATS = ("int8", "int4")  # profiles/nested.py NESTED: int8 as 4 + 4, int4 as 2 + 2
COPY_FORMATS = ("int4", "int2")  # profiles/miss_copy.py COPY_FORMATS  # profiles/nested.py PLANES (the runtime imports nothing of the planner)
PREFETCH = ("none", "next-layer", "oracle")
EVICTION = ("lru", "lfu", "static", "belady")
# Float formats keep the checkpoint's own dtype (no rounding: "bf16" on an fp32 checkpoint
# stays fp32); quantised ones are group-wise weight-only (kernels.QUANT_CONFIG).
FLOAT_FORMATS = ("fp32", "bf16", "fp16")
QUANT_FORMATS = ("int8", "int4")
# formats whose quantised tensors the kernels file holds: int8/int4 in ONNX Runtime's layout,
# the others packed and unpacked before the matmul (formats.py)
STORED_FORMATS = QUANT_FORMATS + UNPACK_FORMATS
RUNNABLE_FORMATS = FLOAT_FORMATS + STORED_FORMATS  # profiles/engines/bundle.yaml lists the same
_FIX = "re-plan with `planner optimize --engine bundle` and formats it lists (`planner engines show bundle`)"


@dataclass(frozen=True)
class LayerSpec:
    """One MoE layer's plan. Tuples are indexed by expert id (E entries)."""

    moe_layer: int
    hidden_layer: int
    home: tuple[str, ...]
    format: tuple[str, ...]
    site: tuple[str, ...]
    tier: tuple[str, ...]  # device | host | disk, from home
    cache_slots: int
    dropped: tuple[int, ...] = ()  # experts the router never picks (a task-specific plan's dropped_experts)
    # a prompt's pass copies the host-held local experts it uses to the device and runs them
    # there (plan.json prefill_offload, planner.prefill_sites); decode runs them on the CPU
    prefill_offload: bool = False
    prefill_copies: tuple[int, ...] = ()  # ... only these (plan.json prefill_copies); empty: every one
    # nested formats (plan.json planes, runtime nested.py): per expert the bit-planes a resident
    # int8 (4 + 4) or int4 (2 + 2) expert holds on the device: both, fetch-low (the low plane
    # fetched at every use) or high (its half-width copy alone); "" for one not nested; empty: none
    planes: tuple[str, ...] = ()
    # planned low-bit copies (plan.json miss_copy, runtime miss_copy.py): (format, gate_below): a
    # fetch miss whose gate weight is below gate_below loads the expert's copy; None: none
    miss_copy: tuple[str, float] | None = None

    def planes_of(self, e: int) -> str:
        return self.planes[e] if self.planes else ""

    @property
    def num_experts(self) -> int:
        return len(self.home)

    def experts_at(self, *sites: str) -> list[int]:
        return [e for e, s in enumerate(self.site) if s in sites]

    @property
    def cached(self) -> list[int]:
        """Experts whose accesses go through the layer's cache (fetch and hybrid)."""
        return self.experts_at("fetch", "hybrid")

    @property
    def on_cpu(self) -> list[int]:
        """Experts the CPU may compute through ONNX Runtime (local always, hybrid on a miss)."""
        return self.experts_at("local", "hybrid")


@dataclass(frozen=True)
class RuntimePlan:
    """What the runtime needs from plan.json."""

    compute_device: str
    host_device: str
    prefetch: str
    eviction: str
    layers: tuple[LayerSpec, ...]
    source: str = "plan.json"
    dense_format: str = "fp32"  # float: the checkpoint's dtype (see FLOAT_FORMATS)
    layer_devices: tuple[str, ...] | None = None  # per MoE layer (plan order) its compute device

    def device_of(self, index: int) -> str:
        """The compute device (plan id) that runs the MoE layer at plan position ``index``."""
        return self.layer_devices[index] if self.layer_devices else self.compute_device

    @property
    def devices(self) -> tuple[str, ...]:
        """Every compute device of the plan, ``compute_device`` first, then in layer order."""
        return tuple(dict.fromkeys((self.compute_device, *(self.layer_devices or ()))))

    @property
    def formats(self) -> list[str]:
        """Every format the plan runs, its low-bit copies' included (miss_copy.py)."""
        return sorted({f for layer in self.layers for f in layer.format}
                      | {layer.miss_copy[0] for layer in self.layers if layer.miss_copy})

    def layer_by_hidden(self) -> dict[int, LayerSpec]:
        return {layer.hidden_layer: layer for layer in self.layers}


def read_plan(path: str | Path, memory_tiers: Mapping[str, str] | None = None) -> RuntimePlan:
    """Read and check ``plan.json``; errors are one line naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise RuntimeInputError("plan file not found", file=path, expected="a plan.json written by planner optimize",
                                fix="pass --plan PLAN.json or --bundle DIR")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RuntimeInputError(f"not valid JSON ({exc})", file=path, fix="regenerate it with planner optimize") from None
    return parse_plan(data, source=str(path), memory_tiers=memory_tiers)


def parse_plan(data: Any, *, source: str = "plan.json", memory_tiers: Mapping[str, str] | None = None) -> RuntimePlan:
    """Check a plan's JSON object (as loaded) and turn it into a :class:`RuntimePlan`."""

    def bad(message: str, key: str, value: Any, expected: str, fix: str = "regenerate it with planner optimize"):
        return RuntimeInputError(message, file=source, key=key, value=value, expected=expected, fix=fix)

    if not isinstance(data, dict):
        raise bad("a plan must be a JSON object", "", type(data).__name__, "an object")
    if data.get("format_version") != PLAN_FORMAT_VERSION:
        raise bad("unsupported plan format version", "format_version", data.get("format_version"),
                  str(PLAN_FORMAT_VERSION))
    for key in ("compute_device", "host_device"):
        if not isinstance(data.get(key), str):
            raise bad("missing or not a string", key, data.get(key), "a device id like node/gpu0")
    prefetch, eviction = data.get("prefetch", "none"), data.get("eviction", "lru")
    if prefetch not in PREFETCH:
        raise bad("unknown prefetch policy", "prefetch", prefetch, " | ".join(PREFETCH))
    if eviction not in EVICTION:
        raise bad("unknown eviction policy", "eviction", eviction, " | ".join(EVICTION))
    dense_format = data.get("dense_format", "fp32")
    if dense_format not in RUNNABLE_FORMATS:
        raise bad("number format not executed by this runtime", "dense_format", dense_format,
                  " | ".join(RUNNABLE_FORMATS), fix=_FIX)
    raw_layers = data.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise bad("a plan needs at least one MoE layer", "layers", raw_layers, "a non-empty list")
    tiers = dict(memory_tiers or {})
    for memory_id, tier in tiers.items():
        if tier not in TIERS:
            raise bad("unknown memory tier", f"memory_tiers[{memory_id!r}]", tier, " | ".join(TIERS),
                      fix="map each memory id to device, host or disk")
    compute_mem, host_mem = data["compute_device"], data["host_device"]
    layer_devices = data.get("layer_devices")
    if layer_devices is not None and not (isinstance(layer_devices, list) and len(layer_devices) == len(raw_layers)
                                          and all(isinstance(d, str) and d for d in layer_devices)):
        raise bad("not one compute device per MoE layer", "layer_devices", layer_devices,
                  f"a list of {len(raw_layers)} device ids like node/gpu1")
    devices = set(layer_devices or ()) | {compute_mem}
    dropped = data.get("dropped_experts") or [[] for _ in raw_layers]  # a task-specific plan (--drop-below)
    if not (isinstance(dropped, list) and len(dropped) == len(raw_layers) and all(
            isinstance(d, list) and all(isinstance(e, int) and 0 <= e < len(raw.get("home") or ()) for e in d)
            and len(d) < len(raw.get("home") or ()) for d, raw in zip(dropped, raw_layers) if isinstance(raw, dict))):
        raise bad("not one list of expert ids per MoE layer, each keeping one expert", "dropped_experts", dropped,
                  f"{len(raw_layers)} lists of expert ids like [3, 7]")
    prefill = data.get("prefill_offload") or [False] * len(raw_layers)  # per-phase sites (planner.prefill_sites)
    if not (isinstance(prefill, list) and len(prefill) == len(raw_layers)
            and all(isinstance(f, bool) for f in prefill)):
        raise bad("not one true/false per MoE layer", "prefill_offload", prefill, f"{len(raw_layers)} booleans")
    copies = data.get("prefill_copies") or [[] for _ in raw_layers]  # the experts each layer's prefill copies
    if not (isinstance(copies, list) and len(copies) == len(raw_layers) and all(
            isinstance(c, list) and all(isinstance(e, int) and not isinstance(e, bool) for e in c)
            and bool(c) <= bool(f) for c, f in zip(copies, prefill))):
        raise bad("not one list of expert ids per MoE layer, empty where prefill_offload is false", "prefill_copies",
                  copies, f"{len(raw_layers)} lists of expert ids like [3, 7]")
    layers = []
    seen_hidden: set[int] = set()
    for i, raw in enumerate(raw_layers):
        at = f"layers[{i}]"
        if not isinstance(raw, dict):
            raise bad("not an object", at, raw, "an object")
        home, fmt, site = raw.get("home"), raw.get("format"), raw.get("site")
        if not (isinstance(home, list) and isinstance(fmt, list) and isinstance(site, list) and home
                and len(home) == len(fmt) == len(site)):
            raise bad("home, format and site must list every expert once", at,
                      [len(x) if isinstance(x, list) else x for x in (home, fmt, site)], "three lists of length E")
        for e, (h, f, s) in enumerate(zip(home, fmt, site)):
            if s not in SITES:
                raise bad("unknown site", f"{at}.site[{e}]", s, " | ".join(SITES))
            if f not in RUNNABLE_FORMATS:
                raise bad("number format not executed by this runtime", f"{at}.format[{e}]", f,
                          " | ".join(RUNNABLE_FORMATS), fix=_FIX)
            if not isinstance(h, str):
                raise bad("not a memory id", f"{at}.home[{e}]", h, "a memory id like node/cpu0")
        if any(raw.get("replicas") or ()):
            raise bad("replicas (cluster plans) are not executed by this runtime", f"{at}.replicas",
                      "replicas", "a single-node plan", fix="plan for one node, or use the SGLang/vLLM engine configs")
        hidden, moe = raw.get("hidden_layer"), raw.get("moe_layer", i)
        if not isinstance(hidden, int) or hidden < 0 or hidden in seen_hidden:
            raise bad("missing, negative or repeated hidden layer index", f"{at}.hidden_layer", hidden,
                      "the decoder layer index of this MoE layer")
        seen_hidden.add(hidden)
        slots = raw.get("cache_slots", 0)
        if not isinstance(slots, int) or slots < 0:
            raise bad("not a slot count", f"{at}.cache_slots", slots, "an integer >= 0")
        mine = layer_devices[i] if layer_devices else compute_mem
        layer_tiers = tuple(_tier(h, s, mine, host_mem, tiers) for h, s in zip(home, site))
        for e, (s, t) in enumerate(zip(site, layer_tiers)):
            if (s == "resident") != (t == "device"):
                raise bad("a resident expert must live on its layer's compute device, and only a resident one",
                          f"{at}.home[{e}]", home[e], mine if s == "resident" else "the host DRAM or a disk")
            if home[e] in devices - {mine} and home[e] not in tiers:
                raise bad("an expert homed on another compute device's memory is not executed by this runtime",
                          f"{at}.home[{e}]", home[e], f"{mine}, the host DRAM or a disk")
        planes = raw.get("planes") or []
        if not (isinstance(planes, list) and len(planes) in (0, len(home))):
            raise bad("planes must list every expert once", f"{at}.planes", planes, f"a list of {len(home)} strings")
        for e, pl in enumerate(planes):
            if pl and (pl not in PLANES or fmt[e] not in NESTED_FORMATS or site[e] != "resident"):
                raise bad("planes name both, fetch-low or high of a resident int8 or int4 expert", f"{at}.planes[{e}]",
                          pl, "\"\", or both | fetch-low | high where format is int8 or int4 and site resident")
        layers.append(LayerSpec(moe_layer=int(moe), hidden_layer=hidden, home=tuple(home), format=tuple(fmt),
                                site=tuple(site), tier=layer_tiers, cache_slots=slots, dropped=tuple(dropped[i]),
                                prefill_offload=prefill[i], prefill_copies=tuple(copies[i]), planes=tuple(planes),
                                miss_copy=_miss_copy(raw.get("miss_copy"), site, fmt, f"{at}.miss_copy", bad)))
    return RuntimePlan(compute_device=compute_mem, host_device=host_mem, prefetch=prefetch, eviction=eviction,
                       layers=tuple(layers), source=source, dense_format=dense_format,
                       layer_devices=tuple(layer_devices) if layer_devices else None)


def _miss_copy(raw: Any, site: list[str], fmt: list[str], at: str, bad) -> tuple[str, float] | None:
    """A layer's ``miss_copy`` as ``(format, gate_below)``: a copy format this runtime stores
    (miss_copy.py), a gate threshold in (0, 1], a layer with fetch experts wider than the copy."""
    if raw is None:
        return None
    keys = {"format", "gate_below"}
    if not (isinstance(raw, dict) and set(raw) == keys and raw["format"] in COPY_FORMATS
            and isinstance(raw["gate_below"], (int, float)) and 0 < raw["gate_below"] <= 1):
        raise bad("miss_copy names a copy format and a gate threshold", at, raw,
                  f"{{format: {' | '.join(COPY_FORMATS)}, gate_below: a number in (0, 1]}}")
    wider = FLOAT_FORMATS + ("int8",) + (("int4",) if raw["format"] == "int2" else ())
    if "fetch" not in site or any(f not in wider for f, s in zip(fmt, site) if s == "fetch"):
        raise bad("low-bit copies belong to a layer's fetch experts, each wider than its copy", at, raw,
                  f"a layer whose site lists fetch, its fetch experts at {' | '.join(wider)}")
    return str(raw["format"]), float(raw["gate_below"])


def _tier(memory_id: str, site: str, compute: str, host: str, overrides: Mapping[str, str]) -> str:
    if memory_id in overrides:
        return overrides[memory_id]
    if memory_id == compute:
        # unified memory (Jetson, Apple): the host's DRAM is the compute device's pool, so an
        # offloaded expert homed there is a host expert
        return "device" if site == "resident" else "host"
    if memory_id == host:
        return "host"
    return "disk"
