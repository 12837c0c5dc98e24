"""The Plan: a frozen, versioned, JSON-serialisable decision record.

It is the contract between the planner, the simulator and the exporters; they read it,
never the planner's internals. ``plan.json`` is deterministic: the same inputs give the
same bytes (sorted keys, fixed float formatting, no timestamps).

Per MoE layer it stores a :class:`~planner.plan_layer.LayerPlan` (per-expert home, format,
execution site, replicas, owner, nested planes; the layer's caches and low-bit copies; see
:mod:`planner.plan_layer`).

``layer_devices`` (multi-GPU pipeline plans, planner.multi_gpu): per MoE layer the compute
device that runs its dense part, resident and cached experts and its fetches (over that
device's own link); absent (None) means ``compute_device`` runs every layer, so plans made
before it existed load, and write, the same bytes. ``compute_device`` then runs the
embedding and the head.

``prefill_offload`` (planner.prefill_sites): per MoE layer, whether a prompt's pass copies the
layer's host-held ``local`` experts it uses to the compute device and runs them there (decode
runs them where they live); absent (None): prefill runs at the decode sites.
``prefill_copies``: per MoE layer the ``local`` experts (ids) the pass copies, where the planner
copies only the most used and lets the host CPU run the rest meanwhile; absent (None): every
host-held ``local`` expert of a ``prefill_offload`` layer, as plans made before it existed.

``kv_cache`` (planner.kv_offload): ``host`` keeps the whole KV cache in host memory (its
bytes in the host DRAM's ``memory`` entry), read where the engine reads it there (llama.cpp:
attention on the host CPU, ``--no-kv-offload``); absent (``device``) keeps it on the compute
device, so plans made before it existed load, and write, the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from profiles.errors import InputError, from_validation_error

from .plan_layer import FROZEN, LayerPlan

__all__ = ["layer_ranges", "Plan", "MemoryUse", "SolverInfo", "Inputs", "PLAN_FORMAT_VERSION", "load_plan"]

PLAN_FORMAT_VERSION = 1


class MemoryUse(BaseModel):
    """Bytes planned in one memory pool, by purpose."""

    model_config = FROZEN

    capacity_bytes: float
    expert_bytes: float = 0.0
    cache_bytes: float = 0.0
    dense_bytes: float = 0.0
    kv_bytes: float = 0.0
    workspace_bytes: float = 0.0

    @property
    def used_bytes(self) -> float:
        return self.expert_bytes + self.cache_bytes + self.dense_bytes + self.kv_bytes + self.workspace_bytes


class BatchSearch(BaseModel):
    """How the batch size was chosen under SLOs (planner.batch_search): the batches solved, the
    chosen one, and a certified bound on the tokens/s of any batch up to ``max_batch``."""

    model_config = FROZEN

    slo_tpot_s: float | None = None
    slo_ttft_s: float | None = None
    max_batch: int = Field(ge=1)
    solved: tuple[int, ...]  # the batch sizes solved
    solves: int = Field(ge=1)  # ILP solves (a batch solved again to gap 0 counts twice)
    batch: int = Field(ge=1)
    tokens_per_s: float
    tokens_per_s_bound: float
    gap: float = Field(ge=0)
    status: Literal["optimal", "open gap"]


class SolverInfo(BaseModel):
    """How the plan was found: solver, status, objective, bound and gap."""

    model_config = FROZEN

    method: str  # "ilp" or a baseline's name
    solver: str | None = None
    status: str = "n/a"
    objective: float | None = None
    bound: float | None = None
    gap: float | None = None
    time_limit_s: float | None = None
    variables: int | None = None
    constraints: int | None = None
    batch_search: BatchSearch | None = None  # the batch size was a decision (--slo-tpot / --slo-ttft)


class Inputs(BaseModel):
    """What the plan was made from, with digests so a stale plan can be recognised."""

    model_config = FROZEN

    hardware: str
    hardware_digest: str
    model: str
    model_digest: str
    workload: str
    workload_digest: str
    engine: str = "bundle"  # the engine profile the plan is priced for (profiles/engines/)
    engine_digest: str = ""
    quality_digest: str | None = None  # the --quality file's sha256 (16 hex digits); None: the constants
    # priced with host DRAM as one port shared by CPU expert reads and copies (--dram-contention,
    # planner.dram): simulate and export price the plan the same way
    dram_contention: bool = False


class Plan(BaseModel):
    """A deployment plan. Build with the planner; read with :func:`load_plan`."""

    model_config = FROZEN

    format_version: int = PLAN_FORMAT_VERSION
    inputs: Inputs
    objective: Literal["latency", "throughput", "cost", "energy"]
    batch_size: int = Field(ge=1)
    context_tokens: int = Field(ge=1)
    compute_device: str
    host_device: str
    dense_format: str = "bf16"  # attention, shared experts and dense layers
    # every policy the simulator has (simulator/policies.py; a test holds the two lists equal)
    prefetch: Literal["none", "next-layer", "transition", "oracle"] = "none"
    eviction: Literal["lru", "lfu", "score", "static", "belady"] = "lru"
    quality_budget: float | None = None
    quality_error: float = 0.0
    layers: tuple[LayerPlan, ...]
    layer_devices: tuple[str, ...] | None = None  # per MoE layer its compute device; None: compute_device
    kv_cache: Literal["device", "host"] = "device"  # where the KV cache lives (planner.kv_offload)
    prefill_offload: tuple[bool, ...] | None = None  # per MoE layer: prefill sites (planner.prefill_sites)
    prefill_copies: tuple[tuple[int, ...], ...] | None = None  # ... and the experts copied (None: all local)
    memory: dict[str, MemoryUse]
    predicted: dict[str, float]
    solver: SolverInfo
    notes: tuple[str, ...] = ()
    # per MoE layer the experts the plan drops (planner.task, --drop-below): the router picks its
    # top-k among the others; empty (and absent from plan.json): every expert is kept
    dropped_experts: tuple[tuple[int, ...], ...] = ()
    # expert-parallel plans on GPUs of different speeds (planner.cluster.attention): per GPU its
    # share of a step's sequences for data-parallel attention (0: the GPU runs experts only);
    # None (absent from plan.json): equal shares, what SGLang / vLLM DP attention does
    attention_shares: dict[str, float] | None = None

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys, floats rounded to 12 significant digits)."""
        data = self.model_dump(mode="json")
        for layer in data["layers"]:  # plans without EP offload read as before
            for key in ("owner", "gpu_caches", "planes", "miss_copy"):
                if not layer[key]:
                    del layer[key]
        if data["inputs"].get("quality_digest") is None:
            del data["inputs"]["quality_digest"]  # plans made without --quality read as before
        if not data["inputs"].get("dram_contention"):
            data["inputs"].pop("dram_contention", None)  # plans made without contention read as before
        if data.get("layer_devices") is None:
            data.pop("layer_devices", None)  # single-device plans read as before
        if data.get("kv_cache") == "device":
            data.pop("kv_cache", None)  # plans with the cache on the device read as before
        if data.get("prefill_offload") is None:
            data.pop("prefill_offload", None)  # plans whose prefill runs at the decode sites read as before
        if data.get("prefill_copies") is None:
            data.pop("prefill_copies", None)  # plans whose prefill copies every local expert read as before
        if not data.get("dropped_experts"):
            data.pop("dropped_experts", None)  # plans that keep every expert read as before
        if data.get("attention_shares") is None:
            data.pop("attention_shares", None)  # plans with equal attention shares read as before
        return json.dumps(_round(data), sort_keys=True, indent=1) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @model_validator(mode="after")
    def _kv_on_one_host(self) -> "Plan":
        if self.kv_cache == "host" and self.layer_devices is not None:
            raise InputError("a pipeline plan keeps its KV cache on its GPUs", key="kv_cache", value="host",
                             expected="device", fix="drop kv_cache, or regenerate the plan with planner optimize")
        if self.prefill_offload is not None:
            if self.layer_devices is not None or len(self.prefill_offload) != len(self.layers):
                raise InputError("prefill_offload lists one flag per MoE layer of a one-device plan",
                                 key="prefill_offload", value=len(self.prefill_offload),
                                 expected=f"{len(self.layers)} flags and no layer_devices",
                                 fix="drop prefill_offload, or regenerate the plan with planner optimize")
            bare = [l for l, on in enumerate(self.prefill_offload) if on and "local" not in self.layers[l].site]
            if bare:
                raise InputError("a layer whose experts none run where they live has no prefill site to move",
                                 key=f"prefill_offload[{bare[0]}]", value=True, expected="false",
                                 fix="regenerate the plan with planner optimize")
        if self.prefill_copies is not None:
            if self.prefill_offload is None or len(self.prefill_copies) != len(self.layers):
                raise InputError("prefill_copies lists one set of experts per MoE layer of a plan with "
                                 "prefill_offload", key="prefill_copies", value=len(self.prefill_copies),
                                 expected=f"{len(self.layers)} lists beside prefill_offload",
                                 fix="drop prefill_copies, or regenerate the plan with planner optimize")
            for l, (on, ids) in enumerate(zip(self.prefill_offload, self.prefill_copies)):
                site = self.layers[l].site
                wrong = [e for e in ids if not (0 <= e < len(site) and site[e] == "local")]
                if wrong or bool(ids) != on or len(set(ids)) != len(ids):
                    raise InputError("a layer copies at prefill some of its own CPU-run (local) experts, each "
                                     "once, exactly where prefill_offload is true", key=f"prefill_copies[{l}]",
                                     value=list(ids), expected="distinct ids of local experts, non-empty where "
                                     "prefill_offload is true, else []",
                                     fix="regenerate the plan with planner optimize")
        return self

    @model_validator(mode="after")
    def _dropped_in_range(self) -> "Plan":
        if self.dropped_experts and len(self.dropped_experts) != len(self.layers):
            raise InputError("dropped_experts needs one entry per MoE layer", key="dropped_experts",
                             value=len(self.dropped_experts), expected=str(len(self.layers)),
                             fix="list each layer's dropped experts ([] for none), or regenerate the plan")
        for lp, dropped in zip(self.layers, self.dropped_experts):
            bad = [e for e in dropped if not 0 <= e < len(lp.home)]
            if bad or len(set(dropped)) == len(lp.home):
                raise InputError("a dropped expert is out of range, or a layer drops every expert",
                                 key=f"dropped_experts[{lp.moe_layer}]", value=bad or list(dropped),
                                 expected=f"ids in 0..{len(lp.home) - 1}, at least one kept",
                                 fix="regenerate the plan with planner optimize --drop-below")
        return self

    @model_validator(mode="after")
    def _shares_sum_to_one(self) -> "Plan":
        shares = self.attention_shares
        if shares is not None:
            bad = [g for g, v in shares.items() if g not in self.memory or not v >= 0.0]
            if bad or not shares or abs(sum(shares.values()) - 1.0) > 1e-6:
                raise InputError("attention_shares gives each planned GPU a share >= 0, the shares summing to 1",
                                 key="attention_shares" + (f".{bad[0]}" if bad else ""),
                                 value=shares[bad[0]] if bad else round(sum(shares.values()), 6),
                                 expected="GPUs of the plan's memory, shares >= 0 summing to 1",
                                 fix="drop attention_shares (equal shares), or regenerate the plan")
        return self

    def attention_counts(self, tokens: int, gpus: list[str] | tuple[str, ...]) -> list[int]:
        """Tokens of a ``tokens``-token step each of ``gpus`` runs attention for: the plan's
        ``attention_shares`` apportioned (:func:`apportion`), or equal shares without them."""
        shares = [1.0] * len(gpus) if self.attention_shares is None else \
            [self.attention_shares.get(g, 0.0) for g in gpus]
        return apportion(tokens, shares)

    def device_of(self, moe_layer: int) -> str:
        """The compute device that runs MoE layer ``moe_layer``."""
        return self.layer_devices[moe_layer] if self.layer_devices else self.compute_device

    def counts(self) -> dict[str, dict[str, int]]:
        """Experts per (home tier-less memory id) and per format, over all layers."""
        by_home: dict[str, int] = {}
        by_format: dict[str, int] = {}
        by_site: dict[str, int] = {}
        for layer in self.layers:
            for h, f, s in zip(layer.home, layer.format, layer.site):
                by_home[h] = by_home.get(h, 0) + 1
                by_format[f] = by_format.get(f, 0) + 1
                by_site[s] = by_site.get(s, 0) + 1
        return {"home": by_home, "format": by_format, "site": by_site}


def apportion(total: int, weights: list[float] | tuple[float, ...]) -> list[int]:
    """``total`` split in integers proportional to ``weights`` (largest remainder; ties to the
    lower index): they sum to ``total``, and a zero weight gets 0 while any weight is positive."""
    w = [max(float(x), 0.0) for x in weights]
    s = sum(w)
    if s <= 0:
        raise ValueError("apportion needs a positive weight")
    raw = [total * x / s for x in w]
    out = [int(r) for r in raw]
    rest = sorted((i for i in range(len(w)) if w[i] > 0), key=lambda i: (-(raw[i] - out[i]), i))
    for i in rest[:total - sum(out)]:
        out[i] += 1
    return out


def layer_ranges(devices: tuple[str, ...]) -> str:
    """``node/gpu0: layers 0-15, node/gpu1: layers 16-31``: a plan's ``layer_devices`` as runs
    of equal devices (the optimize summary, the plan's note and the bundle's README print it)."""
    runs: list[list] = []
    for l, d in enumerate(devices):
        if runs and runs[-1][0] == d and runs[-1][2] == l - 1:
            runs[-1][2] = l
        else:
            runs.append([d, l, l])
    return ", ".join(f"{d}: layer{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}" for d, a, b in runs)


def _round(obj):
    if isinstance(obj, float):
        return float(f"{obj:.12g}")
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


def load_plan(path: str | Path) -> Plan:
    """Read and validate a ``plan.json``; errors are one line naming the key."""
    from profiles.yamlio import load_json

    data = load_json(path)
    if not isinstance(data, dict):
        raise InputError("a plan must be a JSON object", file=path, fix="pass a plan.json written by planner optimize")
    version = data.get("format_version")
    if version != PLAN_FORMAT_VERSION:
        raise InputError("unsupported plan format version", file=path, key="format_version", value=version,
                         expected=str(PLAN_FORMAT_VERSION), fix="re-run planner optimize with this version")
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc, file=path) from None
