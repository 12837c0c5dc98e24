"""An LRU cache serving a long step's accesses at once, in numpy (a prefill's thousands).

Legend: N = the step's accesses the cache sees, C = slots, M = N + the experts cached before.

The cache's contents before the step are read as accesses too (least recent first), so the
whole history is one sequence ``x [M]``. An access ``i`` of expert ``e`` whose previous
access was ``p`` hits exactly when fewer than ``C`` distinct experts were accessed between
them (LRU keeps the ``C`` most recently used). ``D(i)``, that number, is bounded below by the
distinct experts among the last ``W`` accesses before ``i`` for any ``W <= i - p - 1``, a
sliding-window count that numpy makes in one pass (:func:`_window_distinct`): a gap under
``C`` is a hit, a window of ``C`` or more distinct experts makes a miss, and the few
accesses neither settles are counted exactly. After the step the cache holds the ``C``
experts used last, least recent first. The results are :meth:`simulator.policies.LRUCache.serve`'s
(tests/test_simulator_shortcuts.py holds them against each other).
"""

from __future__ import annotations

import numpy as np

__all__ = ["serve_lru_step"]

EXACT_BUDGET = 4  # unsettled accesses are counted one by one up to this many window elements per access


def serve_lru_step(items, slots: int, x: np.ndarray) -> tuple[dict[int, bool], int, int] | None:
    """Serve accesses ``x [N]`` (the wanted ones, in order) with the LRU ``items`` (an
    OrderedDict, least recent first, updated in place) of ``slots`` slots.

    Returns:
        ``(first, hits, accesses)`` as :meth:`simulator.policies.LRUCache.serve` does (``first``:
        expert -> whether its first access in the step hit), or None (nothing changed) when
        too many accesses are left unsettled by the window bounds: serve those one by one.
    """
    N = len(x)
    if slots == 0:  # every access misses; nothing is kept
        firsts = np.unique(x)
        return dict.fromkeys(firsts.tolist(), False), 0, N
    P = len(items)
    full = np.concatenate([np.fromiter(items, np.int64, P), x.astype(np.int64, copy=False)])
    M = len(full)
    pos = np.arange(M)
    order = np.argsort(full, kind="stable")
    same = full[order[1:]] == full[order[:-1]]
    prev = np.full(M, -1, np.int64)  # the previous access of the same expert
    prev[order[1:][same]] = order[:-1][same]
    nxt = np.full(M, M, np.int64)  # the next one
    nxt[order[:-1][same]] = order[1:][same]
    real = pos[P:]
    p = prev[P:]
    gap = real - p - 1  # accesses in between
    hit = (p >= 0) & (gap < slots)
    open_ = np.flatnonzero((p >= 0) & ~hit)  # a miss unless fewer than C distinct in between
    W = slots
    while len(open_):
        fits = open_[gap[open_] >= W]  # the window lies between the two accesses
        if not len(fits):
            break
        settled = fits[_window_distinct(nxt, W)[real[fits]] >= slots]  # misses
        open_ = np.setdiff1d(open_, settled, assume_unique=True)
        W *= 2
    if len(open_):
        if gap[open_].sum() > EXACT_BUDGET * N:
            return None
        full_list = full.tolist()
        for k in open_.tolist():
            i, j = int(real[k]), int(p[k])
            hit[k] = len(set(full_list[j + 1:i])) < slots
    first_at = np.flatnonzero(p < P)  # the step's first access of each expert (its previous, if any, came before)
    first = dict(zip(x[first_at].tolist(), hit[first_at].tolist()))
    last = np.flatnonzero(nxt == M)[-slots:]  # the experts used last, least recent first
    items.clear()
    items.update(dict.fromkeys(full[last].tolist()))
    return first, int(hit.sum()), N


def _window_distinct(nxt: np.ndarray, W: int) -> np.ndarray:
    """``[M + 1]`` distinct experts among the ``W`` accesses before each position: access
    ``j`` counts at positions ``j + 1 .. min(j + W, nxt[j])`` (up to its expert's next access)."""
    M = len(nxt)
    j = np.arange(M)
    delta = np.bincount(j + 1, minlength=M + 2) - np.bincount(np.minimum(j + W, nxt) + 1, minlength=M + 2)
    return np.cumsum(delta)[:M + 1]
