"""Baselines a multi-GPU user runs today (issue 19 item 7), for ``--compare`` on a node with
several GPUs: each layer's option *and its GPU*, priced by the same formula as the
planner's pipeline plans (:mod:`planner.pipeline_costs`) on the tool's own engine.

Legend: L = MoE layers, E = routed experts per layer, G = the node's GPUs
(:func:`planner.pipeline_costs.node_gpus`, the compute device first; none of these engines
runs a layer on an accelerator card), n = decoder layers.

- ``llama.cpp-split``: ``llama-server -ngl 999 --n-cpu-moe N`` with the default
  ``--split-mode layer`` and no ``--tensor-split``: llama.cpp splits the n decoder layers
  and the output layer (n + 1 slots) over the GPUs in proportion to their free memory
  (``src/llama-model.cpp``: layer il goes to the first GPU whose cumulative share exceeds
  il / (n + 1)); ``--n-cpu-moe N`` keeps the experts of decoder layers 0..N-1 in host
  memory, where the CPU computes them. N is the smallest that fits every GPU. The split
  does not follow N, so the first GPU's room freed by N is left idle: what users get until
  they hand-tune ``--tensor-split``.
- ``accelerate-auto``: ``from_pretrained(device_map="auto", max_memory=...)``: transformers'
  ``get_balanced_memory`` caps every GPU but the last at model / G + 1.25 decoder layers
  when the model fits the GPUs, then accelerate's ``infer_auto_device_map`` fills GPU 0
  (keeping room for one offloaded layer), GPU 1, ..., then host memory, then disk, in
  module order. Offloaded layers execute on GPU 0 (accelerate's main device), their experts
  streamed over its link at every forward.

GPU g's memory is counted as :func:`planner.multi_gpu.feasible` counts it: its layers'
expert bytes, (dense + KV) x (its layers / L), and the workspace. Registry:
``PIPELINE_BASELINES[name] = function(setup, quality_budget) -> list[Baseline] | None``,
``PIPELINE_ENGINES[name]`` the engine it runs on; adding one is one function and one line.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from .baselines import FETCH, LOCAL, STREAM, Baseline, _best, _dense, _fi, _homes_for
from .costs import Setup, capacity, fixed_costs
from .pipeline_costs import dense_on, head_bytes, node_gpus

__all__ = ["PIPELINE_BASELINES", "PIPELINE_ENGINES", "llamacpp_split_devices", "compare_pipeline"]

PIPELINE_BASELINES: dict[str, Callable[[Setup, float | None], list[Baseline] | None]] = {}
PIPELINE_ENGINES: dict[str, str] = {}


def register(name: str, engine: str):
    def deco(fn):
        if name in PIPELINE_BASELINES:
            raise ValueError(f"pipeline baseline {name!r} is already registered")
        PIPELINE_BASELINES[name] = fn
        PIPELINE_ENGINES[name] = engine
        return fn
    return deco


def _gpu_room(s: Setup, gpus: list[str], fm: str) -> tuple[list[float], list[float]]:
    """Per GPU: usable bytes less the workspace (and, on GPU 0, the embedding and head), and
    one layer's share of the other dense + KV bytes (:func:`planner.pipeline_costs.dense_on`)."""
    L = s.stats.num_layers
    head = head_bytes(s, _dense(s, fm))
    room, share = [], []
    for k, g in enumerate(gpus):
        sg = dataclasses.replace(s, compute=s.hardware.devices[g])
        fc = fixed_costs(sg, _dense(s, fm))
        room.append(capacity(sg, s.hardware.memory_of(g).id) - fc.workspace_bytes - (head if k == 0 else 0.0))
        share.append(dense_on(fc, head, 1, L, first=False))
    return room, share


def llamacpp_split(weights: list[float], num_hidden_layers: int) -> list[int]:
    """``[n]`` llama.cpp's ``--split-mode layer`` GPU of each decoder layer for ``--tensor-split``
    ``weights`` (its default: each GPU's free memory): layer il goes to the first GPU g with
    cum(weights)[g] / sum(weights) > il / (n + 1), the n + 1-th slot being the output layer."""
    w = np.asarray(weights, dtype=np.float64)
    w = w if w.sum() > 0 else np.ones_like(w)  # no free memory anywhere: llama.cpp's split is then moot
    cum = np.cumsum(w) / w.sum()  # [G]
    n = num_hidden_layers
    return [min(int(np.searchsorted(cum, il / (n + 1), side="right")), len(weights) - 1) for il in range(n)]


def llamacpp_split_devices(s: Setup) -> tuple[int, ...]:
    """``[L]`` the GPU (index into node_gpus) of each MoE layer under llama.cpp's default split."""
    gpus = node_gpus(s, accelerators=False)
    free = [capacity(dataclasses.replace(s, compute=s.hardware.devices[g]), s.hardware.memory_of(g).id) for g in gpus]
    by_hidden = llamacpp_split(free, s.model.num_hidden_layers)
    return tuple(by_hidden[h] for h in s.model.moe_layer_indices)


@register("llama.cpp-split", engine="llama.cpp")
def llamacpp_layer_split(s: Setup, quality_budget: float | None, *, fits: bool = True,
                         n_cpu_moe: int | None = None) -> list[Baseline] | None:
    """llama.cpp's layer split over the node's GPUs with ``--n-cpu-moe N`` (module docstring)."""
    gpus = node_gpus(s, accelerators=False)
    E = s.stats.num_experts
    if len(gpus) < 2 or s.unified or not s.homes or not s.engine_can("local"):
        return None
    devices = llamacpp_split_devices(s)  # [L]
    hidden = list(s.model.moe_layer_indices)

    def build(fm: str) -> Baseline | None:
        room, share = _gpu_room(s, gpus, fm)
        layer_bytes = E * s.expert_bytes(fm)

        def fit(n: int) -> bool:  # experts of decoder layers < n on the CPU
            used = [0.0] * len(gpus)
            for l, g in enumerate(devices):
                used[g] += share[g] + (layer_bytes if hidden[l] >= n else 0.0)
            return all(u <= r * (1 + 1e-12) for u, r in zip(used, room))

        # N only matters at MoE layer boundaries: 0, then one past each MoE layer's index
        steps = [0] + [h + 1 for h in hidden]
        n = n_cpu_moe if n_cpu_moe is not None else next((k for k in steps if fit(k)), None)
        if n is None:
            return None
        on_cpu = sum(1 for h in hidden if h < n)
        if fits and on_cpu * layer_bytes > capacity(s, s.homes[0]):
            return None  # llama.cpp's CPU experts must sit in RAM to run at speed
        specs = [(0, 0, _fi(s, fm), 0, _fi(s, fm), 0, LOCAL) if h < n else (E, E, _fi(s, fm), 0, _fi(s, fm), 0, FETCH)
                 for h in hidden]
        counts = [devices.count(g) for g in range(len(gpus))]
        return Baseline("llama.cpp-split", np.array(specs), _dense(s, fm), devices=devices,
                        note=f"{fm}, --split-mode layer ({'/'.join(map(str, counts))} MoE layers), --n-cpu-moe {n}")
    return _best(s, quality_budget, build, "both")


@register("accelerate-auto", engine="accelerate")
def accelerate_auto(s: Setup, quality_budget: float | None, *, fits: bool = True) -> list[Baseline] | None:
    """transformers/accelerate ``device_map="auto"`` over the node's GPUs (module docstring)."""
    gpus = node_gpus(s, accelerators=False)
    L, E, G = s.stats.num_layers, s.stats.num_experts, len(gpus)
    if G < 2 or s.unified or not s.engine_can("stream"):
        return None

    def build(fm: str) -> Baseline | None:
        room, share = _gpu_room(s, gpus, fm)
        layer_bytes = E * s.expert_bytes(fm)
        block = layer_bytes + share[0]  # one decoder layer with its share of dense + KV
        # get_balanced_memory: when the model fits the GPUs, all but the last hold model / G + 1.25 blocks
        model_bytes = L * block
        fits_gpus = model_bytes <= sum(room)
        cap = [min(r, model_bytes / G + 1.25 * block) if fits_gpus and g < G - 1 else r for g, r in enumerate(room)]
        # infer_auto_device_map: in module order GPU 0 (one block of room kept when something is
        # offloaded), GPU 1, ...; the layers left stream on GPU 0, their dense share held there
        streamed = 0
        while True:
            counts, left = [], L
            for g in range(G):
                free = cap[g] - (streamed * share[0] + (layer_bytes if not fits_gpus else 0.0) if g == 0 else 0.0)
                k = int(max(0, min(left, free // (layer_bytes + share[g])))) if layer_bytes + share[g] > 0 else left
                counts.append(k)
                left -= k
            if left == streamed:
                break
            streamed = left
        homes = _homes_for(s, [layer_bytes] * streamed)
        if fits and homes is None:
            return None
        devices = tuple(g for g in range(G) for _ in range(counts[g])) + (0,) * streamed
        specs = [(E, E, _fi(s, fm), 0, _fi(s, fm), 0, FETCH)] * (L - streamed)
        specs += [(0, E, _fi(s, fm), 0, _fi(s, fm), h, STREAM) for h in homes or [0] * streamed]
        return Baseline("accelerate-auto", np.array(specs), _dense(s, fm), devices=devices,
                        note=f"{fm}, {'/'.join(map(str, counts))} MoE layers on the GPUs, {streamed} streamed")
    return _best(s, quality_budget, build)


def compare_pipeline(setup_for, budget: float | None, req, inputs) -> dict:
    """name -> the Plan of every pipeline baseline that fits, on its own engine.

    Args:
        setup_for: engine name -> the request's Setup seen through that engine (or ``None``
            when the engine runs none of the formats there).
        budget: the quality budget; req, inputs: the OptimizeRequest and the plan's Inputs.
    """
    from profiles.engines import load_engine

    from .multi_gpu import pipeline_baseline_plan
    from .options import keeps_critical
    from .plan_digest import digest

    out = {}
    for name, fn in PIPELINE_BASELINES.items():
        s = setup_for(PIPELINE_ENGINES[name])
        if s is None or len(node_gpus(s, accelerators=False)) < 2:
            continue
        candidates = [b for b in fn(s, budget) or [] if keeps_critical(s, b.specs)]
        engine = load_engine(PIPELINE_ENGINES[name])
        own = inputs.model_copy(update=dict(engine=engine.name,
                                            engine_digest=digest(engine.profile.model_dump(mode="json"))))
        plan = pipeline_baseline_plan(s, candidates, req, own, budget, name) if candidates else None
        if plan is not None:
            out[name] = plan
    return out
