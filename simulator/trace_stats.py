"""What the policies know of the workload, read off the replayed trace.

Oracles and predictors need statistics of the whole trace: the static cache its expert
frequencies, Belady each expert's future uses, the transition prefetcher the inter-layer
transition counts, the next-layer predictor its accuracy. Zero-computation experts
(ids >= E) are left out.
"""

from __future__ import annotations

import numpy as np

from profiles.workload.trace import Trace

__all__ = ["frequency", "future_uses", "predictability", "transitions"]


def frequency(trace: Trace, E: int) -> np.ndarray:
    """``[L, E]`` accesses per expert over the whole trace."""
    ids = trace.expert_ids.astype(np.int64)
    L = ids.shape[1]
    layer = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)
    ok = ids < E
    return np.bincount((layer * E + ids)[ok], minlength=L * E).reshape(L, E).astype(float)


def future_uses(trace: Trace, l: int) -> dict[int, list[int]]:
    """Positions (token x K + rank) at which layer ``l`` uses each expert, ascending."""
    ids = trace.expert_ids[:, l, :].astype(np.int64).ravel()
    order = np.argsort(ids, kind="stable")
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    return {int(ids[g[0]]): g.tolist() for g in np.split(order, bounds) if len(g)}


def transitions(trace: Trace, E: int) -> np.ndarray:
    """``[L-1, E, E]`` counts of (expert at l, expert at l+1) pairs over the trace's tokens."""
    ids = trace.expert_ids.astype(np.int64)
    _T, L, K = ids.shape
    out = np.zeros((max(L - 1, 0), E, E))
    for l in range(L - 1):
        a = np.repeat(ids[:, l, :], K, axis=1).ravel()
        b = np.tile(ids[:, l + 1, :], (1, K)).ravel()
        ok = (a < E) & (b < E)
        out[l] = np.bincount(a[ok] * E + b[ok], minlength=E * E).reshape(E, E)
    return out


def predictability(trace: Trace) -> float:
    from profiles.workload.stats import next_layer_predictability

    if trace.num_layers < 2:
        return 0.0
    recall = next_layer_predictability(trace.expert_ids.astype(np.int64), trace.num_experts,
                                       seq_lens=trace.seq_lens).recall
    return float(np.mean(recall))
