"""A :class:`~planner.plan.Plan` from an expert-parallel layout (``phy2log``): every expert's
home and replicas, formats, each GPU's memory, and the attention shares the plan decided.

Shape legend: L = MoE layers, E = routed experts, R = physical experts per layer, G = GPUs
(EP ranks), S = R / G slots per GPU.
"""

from __future__ import annotations

import numpy as np

from profiles.hardware import Hardware
from profiles.models import ModelSpec

from ..plan import Inputs, MemoryUse, Plan, SolverInfo
from ..plan_layer import LayerPlan
from .attention import AttentionShares
from .quality import FormatChoice
from .topology import Topology

__all__ = ["plan_from_placement"]


def plan_from_placement(phy2log: np.ndarray, *, hw: Hardware, topo: Topology, model: ModelSpec, inputs: Inputs,
                        expert_format: str, memory_need: dict[str, float], batch_size: int, context_tokens: int,
                        predicted: dict[str, float], solver: SolverInfo, notes: tuple[str, ...] = (),
                        choice: FormatChoice | None = None, critical: tuple[tuple[int, ...], ...] = (),
                        attention: AttentionShares | None = None) -> Plan:
    """A :class:`Plan` from ``phy2log [L, R]``: every expert's ``home`` is the GPU of its
    lowest physical slot, ``replicas`` the GPUs of its other copies, site ``resident``.

    ``choice`` (:func:`.quality.choose_formats`) gives the dense format, the critical experts'
    full-precision format and the quality budget and error the plan records; with ``critical``
    experts, each GPU's expert bytes are those of its own slots. ``attention`` (:mod:`.attention`):
    sequences per GPU for data-parallel attention, recorded (with each GPU's KV cache for its own)
    unless equal."""
    L, R = phy2log.shape
    E = model.num_experts
    S = R // topo.num_gpus
    full = choice.full_format if choice is not None else expert_format
    fmt_of = np.full((L, E), expert_format, dtype=object)  # [L, E]
    for l, experts in enumerate(critical):
        fmt_of[l, list(experts)] = full
    layers = []
    for l in range(L):
        gpus_of: list[list[str]] = [[] for _ in range(E)]
        for s, e in enumerate(phy2log[l].tolist()):
            if e >= 0:  # -1: an empty slot (.slots)
                gpus_of[e].append(topo.gpus[s // S])
        layers.append(LayerPlan(moe_layer=l, hidden_layer=model.moe_layer_indices[l],
                                home=tuple(g[0] for g in gpus_of), format=tuple(fmt_of[l].tolist()),
                                site=("resident",) * E, replicas=tuple(tuple(g[1:]) for g in gpus_of)))
    per_gpu = {g: dict(memory_need) for g in topo.gpus}
    if (phy2log < 0).any():  # empty slots (.slots): each GPU's expert bytes are its used slots'
        for r, g in enumerate(topo.gpus):
            used = int((phy2log[:, r * S:(r + 1) * S] >= 0).sum())
            per_gpu[g]["expert_bytes"] = memory_need["expert_bytes"] * used / (L * S)
    if any(critical):  # the bytes of each GPU's own slots: [L, R] -> per rank
        slot_bytes = np.vectorize(model.expert_bytes, otypes=[float])(fmt_of[np.arange(L)[:, None], phy2log])
        for r, g in enumerate(topo.gpus):
            per_gpu[g]["expert_bytes"] = float(slot_bytes[:, r * S:(r + 1) * S].sum())
    shares = None
    if attention is not None and not attention.equal:
        shares = attention.shares
        kv1 = float(model.kv_cache_bytes(context_tokens, batch_size=1))
        for g, n in zip(topo.gpus, attention.counts.tolist()):
            per_gpu[g]["kv_bytes"] = n * kv1
    memory = {g: MemoryUse(capacity_bytes=hw.memories[g].capacity_bytes, **per_gpu[g]) for g in topo.gpus}
    host = next(d for d in hw.devices_of_kind("cpu") if d.node == hw.devices[topo.gpus[0]].node)
    quality = {} if choice is None else {"dense_format": choice.dense_format, "quality_budget": choice.quality_budget,
                                         "quality_error": choice.quality_error}
    return Plan(inputs=inputs, objective="throughput", batch_size=batch_size, context_tokens=context_tokens,
                compute_device=topo.gpus[0], host_device=hw.memory_of(host.id).id, eviction="static",
                layers=tuple(layers), memory=memory, predicted=predicted, solver=solver, notes=notes,
                attention_shares=shares, **quality)
