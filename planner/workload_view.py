"""The planner's view of a workload: per-layer frequency, importance, pinned hit-rate curves,
per-token cache outcomes and next-layer predictability.

Legend: T = tokens, L = MoE layers, K = top-k, E = routed experts, P = pinned-count grid points.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from profiles.workload.hitrate import curve_from_distances, lru_stack_distances
from profiles.workload.stats import next_layer_predictability
from profiles.workload.trace import Trace

__all__ = ["PlanningStats", "planning_stats"]


@dataclass(frozen=True, eq=False)
class PlanningStats:
    """What the planner needs from a workload, per MoE layer.

    Attributes:
        frequency: ``[L, E]`` activations per token (each row sums to the real top-k).
        importance: ``[L, E]`` frequency x mean gate weight (the quality weight).
        pinned_grid: ``[P]`` pinned counts p at which hit curves were measured.
        hit: ``[L, P, E + 1]`` LRU hit rate of the accesses to experts outside the top-p, with
            c dynamic slots (token-level, requests back to back).
        predictability: ``[L]`` recall of predicting layer l's experts from layer l-1's (0 for l = 0).
        order: ``[L, E]`` experts of each layer by descending frequency (ties: lower id first).
        source: where the statistics came from.
    """

    frequency: np.ndarray
    importance: np.ndarray
    pinned_grid: np.ndarray
    hit: np.ndarray
    predictability: np.ndarray
    order: np.ndarray
    source: str = ""
    access_rank: np.ndarray | None = None  # [T', L, K] frequency rank of every access's expert
    access_dist: np.ndarray | None = None  # [P, T', L, K] LRU stack distance with the top-p pinned (-1: pinned)
    _histograms: dict = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int:
        return int(self.frequency.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.frequency.shape[1])

    def token_outcomes(self, layer: int, pinned: int, slots: int) -> tuple[np.ndarray, ...]:
        """The distinct per-token cache outcomes at ``layer`` and their shares, when the
        top-``pinned`` experts are resident and ``slots`` LRU slots serve the rest.

        Returns ``(n_res, n_hit, n_miss, share)``, four ``[N]`` arrays: how many of a token's
        experts are resident, hit the cache and miss it (zero-computation experts are none of
        the three: they are free), and the share of tokens with that outcome.
        Residency is exact for any ``pinned``; hits use the stack distances measured with the
        nearest grid point at or below ``pinned`` pinned (fewer pinned: no more hits).
        """
        key = (layer, int(pinned), int(slots))
        if key not in self._histograms:
            rank = self.access_rank[:, layer]  # [T', K]
            K = rank.shape[1]
            g = int(np.searchsorted(self.pinned_grid, pinned, side="right") - 1)
            dist = self.access_dist[g, :, layer]  # [T', K]
            real = rank >= 0
            resident = real & (rank < pinned)
            hit = real & ~resident & (dist >= 0) & (dist < slots)
            miss = real & ~resident & ~hit
            cell = (resident.sum(axis=1) * (K + 1) + hit.sum(axis=1)) * (K + 1) + miss.sum(axis=1)
            cells, counts = np.unique(cell, return_counts=True)
            self._histograms[key] = (cells // (K + 1) ** 2, cells // (K + 1) % (K + 1), cells % (K + 1),
                                     counts / max(len(cell), 1))
        return self._histograms[key]

    def hit_rate(self, layer: int, pinned: int, slots: int) -> float:
        """h(p, c): linear interpolation over the measured p grid (exact at grid points)."""
        c = min(max(int(slots), 0), self.num_experts)
        grid = self.pinned_grid
        return float(np.interp(pinned, grid, self.hit[layer, :, c]))


def _pinned_grid(E: int, points: int = 9) -> np.ndarray:
    grid = np.unique(np.round(np.linspace(0, E, points)).astype(int))
    return grid


def planning_stats(trace: Trace, *, real_experts: int | None = None, pinned_points: int = 9,
                   max_work: float = 1.2e8) -> PlanningStats:
    """Statistics of ``trace`` for planning (see :class:`PlanningStats`).

    ``real_experts`` (default: all of the trace's experts) is E; ids at or above it are
    zero-computation experts (MoE++ / LongCat-Flash null, copy, constant): no weights, no
    flops, present on every device, so their accesses are free and never touch a cache.

    The hit curves need one exact LRU pass per pinned-grid point, each costing about
    T·L·K·E steps; they run on the first whole sequences holding at most
    ``max_work / (L·K·E)`` tokens (at least 500). Frequency and predictability use the whole trace.
    """
    ids = trace.expert_ids.astype(np.int64)  # [T, L, K]
    T, L, K = ids.shape
    E_all = trace.num_experts
    E = E_all if real_experts is None else int(real_experts)
    layer = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)
    counts = np.bincount((layer * E_all + ids).ravel(), minlength=L * E_all).reshape(L, E_all).astype(float)
    frequency = counts[:, :E] / max(T, 1)  # [L, E] real experts only
    if trace.gate_weights is not None:
        gsum = np.bincount((layer * E_all + ids).ravel(), weights=trace.gate_weights.astype(float).ravel(),
                           minlength=L * E_all).reshape(L, E_all)
        importance = gsum[:, :E] / max(T, 1)  # = frequency x mean gate weight
    else:
        importance = frequency / K
    order = np.argsort(-frequency, axis=1, kind="stable")  # [L, E]
    grid = _pinned_grid(E, pinned_points)
    max_tokens = max(500, int(max_work // (L * K * E)))
    short = trace if T <= max_tokens else _head(trace, max_tokens)
    hit = np.zeros((L, len(grid), E + 1))
    sids = short.expert_ids.astype(np.int64)  # [T', L, K]
    dist = np.empty((len(grid),) + sids.shape, np.int32)  # [P, T', L, K]
    zero = list(range(E, E_all))  # zero-computation experts: always present, never cached
    for i, p in enumerate(grid):
        pinned = [order[l, :p].tolist() + zero for l in range(L)]
        d = lru_stack_distances(sids, E_all, seq_lens=short.seq_lens, pinned=pinned)
        hit[:, i, :] = curve_from_distances(d, E_all)[0][:, :E + 1]
        dist[i] = np.minimum(d, E + 1)  # cold misses: a distance no cache reaches
    rank_of = np.full((L, E_all), -1, np.int64)  # -1: a zero-computation expert (free)
    rank_of[np.arange(L)[:, None], order] = np.arange(E)[None, :]
    access_rank = rank_of[np.arange(L)[None, :, None], sids].astype(np.int32)  # [T', L, K]
    predictability = np.zeros(L)
    if L > 1:
        predictability[1:] = next_layer_predictability(ids, E_all, seq_lens=trace.seq_lens).recall
    return PlanningStats(frequency=frequency, importance=importance, pinned_grid=grid, hit=hit,
                         predictability=predictability, order=order, source=trace.source,
                         access_rank=access_rank, access_dist=dist)


def _head(trace: Trace, max_tokens: int) -> Trace:
    """The first whole sequences of ``trace`` holding at most ``max_tokens`` tokens (at least one)."""
    n = int(np.searchsorted(np.cumsum(trace.seq_lens), max_tokens, side="right"))
    return trace.subset_sequences(list(range(max(n, 1))))
