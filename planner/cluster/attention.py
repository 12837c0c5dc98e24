"""Data-parallel attention shares on GPUs of different speeds: which GPU runs attention for
how many of a step's sequences.

Shape legend: G = GPUs (EP ranks), B = sequences in a decode step (``batch_size x G``).

With data-parallel attention every GPU runs the dense part (attention, shared experts, the
dense layers) for its own sequences, and each MoE layer's dispatch waits for the slowest
GPU's attention. SGLang and vLLM give every rank the same number of sequences, so on a mixed
cluster the slow GPUs set the attention stage; at decode batches the dense part is mostly
the read of the dense weights, which every GPU pays whatever its share, so moving sequences
to the fast GPUs only helps when a slow GPU gives up attention entirely (it then serves
experts only, as attention-FFN disaggregation does: MegaScale-Infer, Step-3).

Decision: sequences per GPU ``n[g] >= 0``, ``sum_g n = B``, each GPU's KV cache within the
memory its plan leaves free; objective: the attention stage, ``max_g dense(g, n[g])`` with
``dense(g, 0) = 0`` (the shared performance model, :func:`profiles.perf.dense_step_s`, on
the plan's engine). For one set of attention GPUs the stage is minimised exactly by water
filling (each sequence to the GPU whose time grows least: ``dense`` is nondecreasing in
``n``); the sets tried are the fastest 1, 2, ... GPU types (GPUs sorted by their dense time
at an equal share). Ties keep the larger set. On one GPU type every GPU keeps an equal
share and the result is ``None`` (what the engines do, bit for bit).
"""

from __future__ import annotations

import heapq

import numpy as np

from profiles.hardware import Hardware
from profiles.models import ModelSpec
from profiles.perf import dense_step_s

from .topology import Topology

__all__ = ["AttentionShares", "attention_shares"]


class AttentionShares:
    """The decision: ``counts[G]`` sequences per GPU at the planned batch, ``shares`` their
    fractions, the attention stage's seconds per step with them (``stage_s``) and with equal
    shares (``equal_s``)."""

    def __init__(self, gpus: tuple[str, ...], counts: np.ndarray, stage_s: float, equal_s: float):
        self.gpus, self.counts, self.stage_s, self.equal_s = gpus, counts, stage_s, equal_s

    @property
    def shares(self) -> dict[str, float]:
        total = float(self.counts.sum())
        return {g: float(c) / total for g, c in zip(self.gpus, self.counts)}

    @property
    def equal(self) -> bool:
        return bool(np.all(self.counts == self.counts[0]))


def _water_fill(times, members: list[int], total: int, limit: np.ndarray) -> np.ndarray | None:
    """Sequences per GPU over ``members`` minimising the largest ``times(g, n)`` (``None``: they cannot hold ``total``)."""
    counts = np.zeros(len(limit), np.int64)
    if limit[members].sum() < total:
        return None
    heap = [(times(g, 1), g) for g in members if limit[g] >= 1]
    heapq.heapify(heap)
    for _ in range(total):
        _, g = heapq.heappop(heap)
        counts[g] += 1
        if counts[g] < limit[g]:
            heapq.heappush(heap, (times(g, int(counts[g]) + 1), g))
    return counts


def attention_shares(seen: Hardware, topo: Topology, model: ModelSpec, dense_format: str, batch_size: int,
                     context_tokens: int, free_bytes: np.ndarray, memo: dict | None = None) -> AttentionShares:
    """Sequences per GPU for data-parallel attention (see the module docstring).

    Args:
        seen: the hardware as the plan's engine sees it (``EngineProfile.apply``).
        topo: the GPUs in rank order.
        model: for the dense weights and the KV cache per sequence.
        dense_format: the dense weights' format.
        batch_size: sequences per GPU (the step runs ``batch_size x G``).
        context_tokens: each sequence's context (its KV cache).
        free_bytes: ``[G]`` bytes each GPU has for KV cache beyond its weights.
        memo: dense times by ``(GPU, sequences)``, kept across calls with the same other arguments.
    """
    G = topo.num_gpus
    total = batch_size * G
    kv1 = float(model.kv_cache_bytes(context_tokens, batch_size=1))
    devices = [seen.devices[_compute_of(seen, g)] for g in topo.gpus]
    memo = {} if memo is None else memo

    def times(g: int, n: int) -> float:
        if n <= 0:
            return 0.0
        key = (g, n)
        if key not in memo:
            memo[key] = dense_step_s(devices[g], model, dense_format, n, n * kv1)
        return memo[key]

    limit = np.array([int(max(f, 0.0) // kv1) if kv1 > 0 else total for f in free_bytes], np.int64)  # [G]
    limit = np.minimum(limit, total)
    equal = np.full(G, batch_size, np.int64)
    equal_s = max(times(g, batch_size) for g in range(G))
    at_equal = np.array([times(g, batch_size) for g in range(G)])  # [G]
    order = np.argsort(at_equal, kind="stable")
    # prefixes that end where a GPU type ends (equal dense time), largest first: ties keep the larger set
    ends = [k for k in range(1, G + 1) if k == G or not np.isclose(at_equal[order[k]], at_equal[order[k - 1]])]
    best, best_s = None, np.inf
    for k in reversed(ends):
        counts = _water_fill(times, order[:k].tolist(), total, limit)
        if counts is None:
            continue
        stage = max(times(g, int(c)) for g, c in enumerate(counts))
        if stage < best_s * (1 - 1e-9):
            best, best_s = counts, stage
    if best is None or best_s >= equal_s * (1 - 1e-9):  # nothing beats equal shares (or nothing fits)
        best, best_s = equal, equal_s
    return AttentionShares(tuple(topo.gpus), best, float(best_s), float(equal_s))


def _compute_of(hw: Hardware, memory_id: str) -> str:
    """The GPU device whose memory is ``memory_id`` (topology ranks are memory ids)."""
    for d in hw.devices_of_kind("gpu"):
        if hw.memory_of(d.id).id == memory_id:
            return d.id
    return memory_id
