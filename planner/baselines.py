"""Heuristic baselines: what people run today, each as one option per layer.

Every baseline returns :class:`Baseline` specs that the ILP's cost model scores the same
way as its own plans (its options are added to the ILP's option tables, so the ILP can
never do worse). Each uses one number format for the whole model, as these tools do, and
tries every format the quality budget allows, keeping the fastest that fits.

Registry: ``BASELINES[name] = function(setup, quality_budget) -> list[Baseline] | None``:
its candidate settings (one per format or cache size; the planner scores them and keeps
the fastest that fits), or ``None`` when it cannot run on this hardware. Adding one is one
function and one line.

Given configurations (:mod:`planner.given`) call them with ``fits=False`` (return the
placement even when it does not fit, so its shortfall can be named) and the tool's own
parameter (``gpu_bytes``, ``n_cpu_moe``, ``slots``); the fixed formats of ``setup.fixes``
choose the expert and dense formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .costs import MODES, Setup, capacity, fixed_costs

__all__ = ["Baseline", "BASELINES", "register"]

FETCH, LOCAL, HYBRID, STREAM = (MODES.index(m) for m in ("fetch", "local", "hybrid", "stream"))


@dataclass(frozen=True)
class Baseline:
    name: str
    specs: np.ndarray  # [L, 7] one option per layer (costs.SPEC_COLUMNS)
    dense_format: str
    prefetch: bool = False
    note: str = ""
    # per layer its GPU, an index into planner.pipeline_costs.node_gpus (multi-GPU baselines,
    # planner.baselines_multi); None: every layer on the compute device
    devices: tuple[int, ...] | None = None


BASELINES: dict[str, Callable[[Setup, float | None], list[Baseline] | None]] = {}
# the engine profile each baseline runs on (profiles/engines/): `--compare` prices it there
BASELINE_ENGINES: dict[str, str] = {}


def register(name: str, engine: str):
    def deco(fn):
        if name in BASELINES:
            raise ValueError(f"baseline {name!r} is already registered")
        BASELINES[name] = fn
        BASELINE_ENGINES[name] = engine
        return fn
    return deco


def _formats(s: Setup, quality_budget: float | None, where: str = "compute") -> list[str]:
    """Formats the quality budget allows and the engine runs where the baseline computes
    (``compute``: the compute device, ``host``: the host CPU, ``both``), widest first."""
    devices = {"compute": [s.compute], "host": [s.host], "both": [s.compute, s.host]}[where]
    ok = [fm for fm in s.formats if (quality_budget is None or s.uniform_error(fm) <= quality_budget + 1e-12)
          and all(s.runs(d, fm) for d in devices) and (s.fixes is None or s.fixes.expert_format in (None, fm))]
    return sorted(ok, key=s.expert_bytes, reverse=True)


def _dense(s: Setup, fm: str) -> str:
    """The dense weights' format next to experts at ``fm``: the same (one format for the whole
    model, as these tools run), unless ``--fix-dense-format`` says otherwise."""
    return s.fixes.dense_format if s.fixes is not None and s.fixes.dense_format else fm


def _device_budget(s: Setup, fm: str) -> float:
    fc = fixed_costs(s, _dense(s, fm))
    mem = s.hardware.memory_of(s.compute.id).id
    return capacity(s, mem) - fc.dense_bytes - fc.kv_bytes - fc.workspace_bytes


def _homes_for(s: Setup, bytes_needed: list[float]) -> list[int] | None:
    """First-fit of per-layer offloaded bytes into the homes in order (DRAM, then NVMe)."""
    free = [capacity(s, h) for h in s.homes]
    out = []
    for need in bytes_needed:
        for hi in range(len(free)):
            if need <= free[hi]:
                free[hi] -= need
                out.append(hi)
                break
        else:
            return None
    return out


def _best(s: Setup, quality_budget: float | None, build: Callable[[str], Baseline | None],
          where: str = "compute") -> list[Baseline] | None:
    """One candidate per format the quality budget allows (the planner keeps the fastest)."""
    candidates = [b for fm in _formats(s, quality_budget, where) if (b := build(fm)) is not None]
    return candidates or None


def _fi(s: Setup, fm: str) -> int:
    return s.formats.index(fm)


@register("all-gpu", engine="vllm")
def all_gpu(s: Setup, quality_budget: float | None, *, fits: bool = True) -> list[Baseline] | None:
    """Everything on the GPU, when it fits."""
    L, E = s.stats.num_layers, s.stats.num_experts

    def build(fm: str) -> Baseline | None:
        if fits and L * E * s.expert_bytes(fm) > _device_budget(s, fm):
            return None
        return Baseline("all-gpu", np.array([(E, E, _fi(s, fm), 0, _fi(s, fm), 0, FETCH)] * L), _dense(s, fm), note=fm)
    return _best(s, quality_budget, build)


@register("accelerate", engine="accelerate")
def accelerate(s: Setup, quality_budget: float | None, *, fits: bool = True,
               gpu_bytes: float | None = None) -> list[Baseline] | None:
    """HF accelerate's sequential fill: whole layers on the GPU in order while they fit (one layer
    of room kept for the streamed ones), the rest offloaded (DRAM, then disk) and streamed to
    the GPU at every forward. ``gpu_bytes``: its ``max_memory`` for the GPU, the weights it
    places there (dense weights, then whole MoE layers); default: what the device has left."""
    L, E = s.stats.num_layers, s.stats.num_experts
    if s.unified or not s.engine_can("stream"):
        return None

    def build(fm: str) -> Baseline | None:
        free = _device_budget(s, fm) if gpu_bytes is None else gpu_bytes - fixed_costs(s, _dense(s, fm)).dense_bytes
        layer_bytes = E * s.expert_bytes(fm)
        # infer_auto_device_map keeps room for the largest block it streams in, unless all fit
        on_gpu = L if L * layer_bytes <= free else int(max(0, min(L, (free - layer_bytes) // layer_bytes)))
        homes = _homes_for(s, [layer_bytes] * (L - on_gpu))
        if fits and (homes is None or free < 0):
            return None
        specs = [(E, E, _fi(s, fm), 0, _fi(s, fm), 0, FETCH)] * on_gpu
        specs += [(0, E, _fi(s, fm), 0, _fi(s, fm), h, STREAM) for h in homes or [0] * (L - on_gpu)]
        return Baseline("accelerate", np.array(specs), _dense(s, fm), note=f"{fm}, {on_gpu}/{L} MoE layers on the GPU")
    return _best(s, quality_budget, build)


@register("llama.cpp", engine="llama.cpp")
def llama_cpp(s: Setup, quality_budget: float | None, *, fits: bool = True,
              n_cpu_moe: int | None = None) -> list[Baseline] | None:
    """llama.cpp ``--n-cpu-moe N``: the experts of the first N MoE layers run on the CPU from
    host memory, the rest on the GPU; the smallest N that fits (the fastest), or ``n_cpu_moe``."""
    L, E = s.stats.num_layers, s.stats.num_experts
    if s.unified or not s.homes or not s.engine_can("local"):
        return None

    def build(fm: str) -> Baseline | None:
        free = _device_budget(s, fm)
        layer_bytes = E * s.expert_bytes(fm)
        if fits and free < 0:
            return None
        n_cpu = L - int(max(0, min(L, free // layer_bytes))) if n_cpu_moe is None else n_cpu_moe
        on_gpu = L - n_cpu
        if fits and n_cpu * layer_bytes > capacity(s, s.homes[0]):
            return None  # llama.cpp's CPU experts must sit in RAM to run at speed
        specs = ([(0, 0, _fi(s, fm), 0, _fi(s, fm), 0, LOCAL)] * n_cpu
                 + [(E, E, _fi(s, fm), 0, _fi(s, fm), 0, FETCH)] * on_gpu)
        return Baseline("llama.cpp", np.array(specs), _dense(s, fm), note=f"{fm}, --n-cpu-moe {n_cpu}")
    return _best(s, quality_budget, build, "both")


@register("lru-offload", engine="hqq-offload")
def lru_offload(s: Setup, quality_budget: float | None, *, fits: bool = True,
                slots: int | None = None) -> list[Baseline] | None:
    """Mixtral-offloading: every expert offloaded, an LRU cache of k slots per layer on the GPU,
    speculative next-layer prefetch; every cache size that fits is tried, or k = ``slots``."""
    L, E = s.stats.num_layers, s.stats.num_experts
    if s.unified:
        return None
    out = []
    if not s.engine_can("fetch"):
        return None
    for fm in _formats(s, quality_budget):
        free = _device_budget(s, fm)
        homes = _homes_for(s, [E * s.expert_bytes(fm)] * L)
        if homes is None and fits:
            continue
        # Mixtral-offloading runs 2-4 slots per layer
        for k in sorted({1, 2} | set(s.cache_sizes())) if slots is None else [slots]:
            if slots is not None or (0 < k < E and (not fits or L * k * s.expert_bytes(fm) <= free)):
                specs = [(0, E, _fi(s, fm), k, _fi(s, fm), h, FETCH) for h in homes or [0] * L]
                out.append(Baseline("lru-offload", np.array(specs), _dense(s, fm), prefetch=s.engine_can("next-layer"),
                                    note=f"{fm}, {k} slots/layer"))
    return out or None


@register("cpu-experts", engine="ktransformers")
def cpu_experts(s: Setup, quality_budget: float | None, *, fits: bool = True) -> list[Baseline] | None:
    """kTransformers / Fiddler style: attention and dense weights on the GPU, every routed expert
    computed by the CPU from host memory."""
    L, E = s.stats.num_layers, s.stats.num_experts
    if s.unified or not s.homes or not s.engine_can("local"):
        return None

    def build(fm: str) -> Baseline | None:
        if fits and (_device_budget(s, fm) < 0 or L * E * s.expert_bytes(fm) > capacity(s, s.homes[0])):
            return None
        return Baseline("cpu-experts", np.array([(0, 0, _fi(s, fm), 0, _fi(s, fm), 0, LOCAL)] * L), _dense(s, fm),
                        note=fm)
    return _best(s, quality_budget, build, "both")


@register("popularity", engine="bundle")
def popularity(s: Setup, quality_budget: float | None, *, fits: bool = True) -> list[Baseline] | None:
    """Fiddler's static placement: the most popular experts of the whole model on the GPU while
    they fit, every other expert computed by the CPU."""
    L, E = s.stats.num_layers, s.stats.num_experts
    if s.unified or not s.homes or not s.engine_can("local"):
        return None
    freq = np.take_along_axis(s.stats.frequency, s.stats.order, axis=1)  # [L, E] descending per layer

    def build(fm: str) -> Baseline | None:
        free = _device_budget(s, fm)
        if fits and free < 0:
            return None
        slots = int(max(0, min(L * E, free // s.expert_bytes(fm))))
        # the global top `slots` experts: per layer, a prefix of its frequency order
        top = np.argsort(-freq.ravel(), kind="stable")[:slots]
        p = np.bincount(top // E, minlength=L)
        if fits and ((E - p) * s.expert_bytes(fm)).sum() > capacity(s, s.homes[0]):
            return None
        specs = [(int(p[l]), int(p[l]), _fi(s, fm), 0, _fi(s, fm), 0, LOCAL if p[l] < E else FETCH) for l in range(L)]
        return Baseline("popularity", np.array(specs), _dense(s, fm), note=f"{fm}, {slots} experts on the GPU")
    return _best(s, quality_budget, build, "both")
