"""The router's choices of one step: which experts each MoE layer runs, and for how many tokens.

Legend: n = tokens in the step, L = MoE layers, K = top-k, E = routed experts.

A step's trace rows name, per token and layer, K expert ids (ids >= E are zero-computation
experts: nothing runs). Each layer runs every distinct expert once for all the tokens that
chose it (one expert call); the calls are issued in first-use order (token, then rank), and
a call's token count and mean gate weight go with it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["distinct_rows", "route_step"]


def distinct_rows(expert_ids: np.ndarray, E: int) -> np.ndarray:
    """``[T]`` whether token ``t`` chose ``K`` distinct routed experts at every layer (``expert_ids``:
    ``[T, L, K]``): a step of that token alone calls each of them once."""
    srt = np.sort(expert_ids, axis=2)
    return (srt[:, :, -1] < E).all(axis=1) & (srt[:, :, 1:] != srt[:, :, :-1]).all(axis=(1, 2))


def route_step(ids: np.ndarray, gates: np.ndarray | None, E: int,
               distinct: bool | None = None) -> list[tuple[list, list, list | None]]:
    """Per layer of the step: ``(experts, tokens, mean gates)`` of its expert calls, in first-use order.

    Args:
        ids: ``[n, L, K]`` expert ids of the step's tokens.
        gates: ``[n, L, K]`` gate weights, or ``None`` (then the mean gates are ``None`` too).
        E: routed experts; ids >= E are dropped.
        distinct: for a step of one token, :func:`distinct_rows` of it when known.

    Returns:
        ``L`` tuples of equal-length lists. A step of one token whose experts are distinct and
        routed (the usual decode step at batch 1) shares one list of ones for the token counts.
    """
    n, L, K = ids.shape
    if n == 1:
        if distinct is None:
            distinct = bool(distinct_rows(ids, E)[0])
        if distinct:
            ones = [1] * K
            rows = ids[0].tolist()
            g = gates[0].tolist() if gates is not None else [None] * L
            return [(rows[l], ones, g[l]) for l in range(L)]
    # every layer at once: code = layer * M + expert; a code's first use (layer * nK + token * K
    # + rank) orders the calls layer by layer, then by first use (O(N): no sort of the N uses)
    M = int(ids.max()) + 1
    codes = (ids + _layer_offsets(L, M)).ravel()  # [n * L * K], token-major like ids
    first = np.full(L * M, n * L * K, np.int64)
    np.minimum.at(first, codes, _first_use(n, L, K))
    all_counts = np.bincount(codes, minlength=L * M)
    used = np.flatnonzero(all_counts)
    uniq = used[np.argsort(first[used])]
    counts = all_counts[uniq]
    layer, expert = np.divmod(uniq, M)
    keep = expert < E
    mean = None
    if gates is not None:
        w = gates.reshape(-1).astype(float)  # a call's weights add up token after token, as in a loop
        mean = (np.bincount(codes, weights=w, minlength=L * M)[uniq] / counts)[keep].tolist()
    layer, expert, counts = layer[keep], expert[keep].tolist(), counts[keep].tolist()
    bounds = np.searchsorted(layer, np.arange(L + 1)).tolist()
    return [(expert[a:b], counts[a:b], None if mean is None else mean[a:b])
            for a, b in zip(bounds[:-1], bounds[1:])]


@lru_cache(maxsize=64)
def _layer_offsets(L: int, M: int) -> np.ndarray:
    """``[1, L, 1]`` each layer's first code."""
    return (np.arange(L, dtype=np.int64) * M)[None, :, None]


@lru_cache(maxsize=64)
def _first_use(n: int, L: int, K: int) -> np.ndarray:
    """``[n * L * K]`` (token-major) each use's order within the step: layer, then token, then rank."""
    return (np.arange(L, dtype=np.int64)[None, :, None] * (n * K) + np.arange(n, dtype=np.int64)[:, None, None] * K
            + np.arange(K, dtype=np.int64)[None, None, :]).ravel()
