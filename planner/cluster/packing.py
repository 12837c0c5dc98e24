"""Bin packing under load caps, the building blocks of the expert-parallel placer: items
(expert copies) to bins (nodes or GPUs), a fixed number per bin, balanced by load, then
pairwise swaps that lower a traffic cost while every bin stays under its cap.

Shape legend: M = items (expert copies), B = bins (or, for load draws, draws).
"""

from __future__ import annotations

import numpy as np

__all__ = ["by_bands", "pack", "pack_drawn", "swaps"]


def by_bands(cost: np.ndarray, weight: np.ndarray, bins: int) -> np.ndarray:
    """Items to ``bins`` bins, ``M / bins`` each: the items, heaviest first, are cut into
    bands of ``bins``; every bin takes one item of every band (so bin loads differ by at most
    the sum of the bands' spreads), the cheapest item-to-bin match first within a band.

    Args:
        cost: ``[M, B]`` cost of item m in bin b.
        weight: ``[M]`` item loads.

    Returns:
        ``[M]`` bin of every item.
    """
    M = len(weight)
    where = np.full(M, -1)
    order = np.argsort(-weight, kind="stable")
    load = np.zeros(bins)
    for b0 in range(0, M, bins):
        band = order[b0:b0 + bins]
        sub = cost[band].copy()  # [bins, B]
        # the band's heaviest items go to the lightest bins when costs tie: a small load term
        sub += 1e-9 * load[None, :] * weight[band, None]
        free_rows = np.ones(len(band), bool)
        free_cols = np.ones(bins, bool)
        for _ in range(len(band)):
            masked = np.where(free_rows[:, None] & free_cols[None, :], sub, np.inf)
            r, c = divmod(int(np.argmin(masked)), bins)
            where[band[r]] = c
            load[c] += weight[band[r]]
            free_rows[r] = False
            free_cols[c] = False
    return where


def swaps(cost: np.ndarray, weight: np.ndarray, expert: np.ndarray, where: np.ndarray, bins: int, cap: float,
          distinct: bool, max_swaps: int, dev: np.ndarray | None = None, z: float = 0.0,
          speed: np.ndarray | None = None) -> np.ndarray:
    """Pairwise swaps between bins (counts stay): first to bring every bin under ``cap``
    (the swap that lowers the two bins' larger load the most, cheapest on ties), then the
    swap that lowers the total cost the most while both bins stay under ``cap``.

    ``distinct``: a bin never holds two copies of one expert. ``dev``: ``[M, B]`` the items'
    load in B draws minus its mean; a bin's load is then its mean plus ``z`` standard
    deviations over the draws (items that rise together count more than their means).
    ``speed``: ``[bins]`` relative speed of every bin; a bin's load (and ``cap``) is then its
    time, tokens / speed.
    """
    M = len(weight)
    where = where.copy()
    inv = np.ones(bins) if speed is None else 1.0 / np.asarray(speed, float)  # [bins] time per token
    load = np.bincount(where, weights=weight, minlength=bins) * inv
    idx = np.arange(M)
    if dev is not None:
        B = dev.shape[1]
        gram = dev @ dev.T  # [M, M]
        sq_step = np.diag(gram)[:, None] + np.diag(gram)[None, :] - 2 * gram  # [i, j] |d_j - d_i|^2
        dsum = np.zeros((bins, B))  # [bins, B] a bin's summed deviation
        np.add.at(dsum, where, dev)
    for _ in range(max_swaps):
        own = cost[idx, where]  # [M]
        cross = cost[:, where]  # [i, j]: cost of item i in j's bin
        gain = own[:, None] + own[None, :] - cross - cross.T  # [M, M] cost saved by swapping i and j
        li = load[where]
        step = inv[where][:, None]  # [M, 1] time per token of i's bin; the order of the sums is the speed-blind one's
        new_i = li[:, None] - weight[:, None] * step + weight[None, :] * step  # i's bin after the swap
        if dev is not None:
            sq = (dsum * dsum).sum(1)  # [bins]
            X = dev @ dsum.T  # [M, bins]
            toward = X[:, where].T - X[idx, where][:, None]  # [i, j] D_a . (d_j - d_i), a = i's bin
            sq_i = np.maximum(sq[where][:, None] + sq_step + 2 * toward, 0.0)  # i's bin after the swap
            new_i = new_i + z * np.sqrt(sq_i / B) * inv[where][:, None]
            li = li + z * np.sqrt(sq[where] / B) * inv[where]
        worst_before = np.maximum(li[:, None], li[None, :])
        worst_after = np.maximum(new_i, new_i.T)
        ok = where[:, None] != where[None, :]
        if distinct:
            held = np.zeros((bins, int(expert.max()) + 1), bool)
            held[where, expert] = True
            same = expert[:, None] == expert[None, :]
            ok &= (~held[where[:, None], expert[None, :]] & ~held[where[None, :], expert[:, None]]) | same
        bin_load = load if dev is None else load + z * np.sqrt(sq / B) * inv
        if bin_load.max() > cap + 1e-12:
            # repair: only swaps touching the most loaded bin, that lower its load
            top = int(np.argmax(bin_load))
            score = np.where(ok & (where[:, None] == top) & (worst_after < worst_before - 1e-12),
                             (worst_before - worst_after) + 1e-9 * gain, -np.inf)
        else:
            score = np.where(ok & (worst_after <= cap + 1e-12), gain, -np.inf)
        if bin_load.max() > cap + 1e-12:
            picks = [divmod(int(np.argmax(score)), M)]
        else:
            # several swaps per round, between disjoint pairs of bins (their loads stay exact)
            k = min(4 * bins * bins, score.size - 1)
            flat = np.argpartition(-score, k, axis=None)[:k]
            flat = flat[np.argsort(-score.ravel()[flat], kind="stable")]
            picks, used = [], set()
            for f in flat:
                i, j = divmod(int(f), M)
                if not score[i, j] > 1e-15 or len(picks) >= bins // 2:
                    break
                if where[i] in used or where[j] in used:
                    continue
                used.update((where[i], where[j]))
                picks.append((i, j))
        if not picks or not score[picks[0]] > 1e-15:
            break
        for i, j in picks:
            bi, bj = where[i], where[j]
            load[bi] += (weight[j] - weight[i]) * inv[bi]
            load[bj] += (weight[i] - weight[j]) * inv[bj]
            if dev is not None:
                dsum[bi] += dev[j] - dev[i]
                dsum[bj] += dev[i] - dev[j]
            where[i], where[j] = bj, bi
    return where


def pack(weight: np.ndarray, expert: np.ndarray, bins: int, per_bin: int,
         speed: np.ndarray | None = None) -> np.ndarray:
    """Balanced packing (heaviest first into the lightest bin with room), one copy of an expert per bin.

    ``speed``: ``[bins]`` relative speeds; the item goes where the bin's time ``(load + w) /
    speed`` is then least (with equal speeds: the lightest bin, as without)."""
    inv = np.ones(bins) if speed is None else 1.0 / np.asarray(speed, float)
    where = np.full(len(weight), -1)
    load = np.zeros(bins)
    count = np.zeros(bins, np.int64)
    held = np.zeros((bins, int(expert.max()) + 1), bool)
    for m in np.argsort(-weight, kind="stable"):
        bad = (count >= per_bin) | held[:, expert[m]]
        if bad.all():
            bad = count >= per_bin
        b = int(np.argmin(np.where(bad, np.inf, load if speed is None else (load + weight[m]) * inv)))
        where[m] = b
        load[b] += weight[m]
        count[b] += 1
        held[b, expert[m]] = True
    return where


def pack_drawn(draws: np.ndarray, expert: np.ndarray, bins: int, per_bin: int, max_swaps: int,
               speed: np.ndarray | None = None) -> np.ndarray:
    """Items to bins, ``per_bin`` each, one copy of an expert per bin, balanced over load draws:
    heaviest first into the bin that raises the draws' average largest bin load least, then
    the pairwise swaps that lower it most.

    Args:
        draws: ``[M, B]`` item loads in B draws.
        expert: ``[M]`` expert of every item.
        speed: ``[bins]`` relative speeds: bin loads are times, tokens / speed.

    Returns:
        ``[M]`` bin of every item.
    """
    M, B = draws.shape
    inv = np.ones(bins) if speed is None else 1.0 / np.asarray(speed, float)  # [bins]
    where = np.full(M, -1)
    load = np.zeros((bins, B))
    count = np.zeros(bins, np.int64)
    held = np.zeros((bins, int(expert.max()) + 1), bool)
    eye = np.eye(bins, dtype=bool)
    for m in np.argsort(-draws.mean(1), kind="stable"):
        bad = (count >= per_bin) | held[:, expert[m]]
        if bad.all():
            bad = count >= per_bin
        after = load[None, :, :] + eye[:, :, None] * (inv[:, None, None] * draws[m][None, None, :])  # [cand, bin, B]
        score = after.max(1).mean(1) + 1e-9 * load.mean(1)  # [candidate]
        b = int(np.argmin(np.where(bad, np.inf, score)))
        where[m] = b
        load[b] += draws[m] * inv[b]
        count[b] += 1
        held[b, expert[m]] = True
    same = expert[:, None] == expert[None, :]
    for _ in range(max_swaps):
        padded = np.vstack([load, np.zeros((2, B))])  # two empty bins: "the rest" exists with 2 bins
        order = np.argsort(-padded, axis=0, kind="stable")[:3]  # [3, B] the three largest bins of every draw
        top = np.take_along_axis(padded, order, 0)  # [3, B]
        # an item out of the bin that is largest in the most draws (the swap that helps most
        # leaves it; M x M x B for every pair would cost bins times more)
        rows = np.flatnonzero(where == np.bincount(order[0], minlength=bins).argmax())  # [M']
        if not rows.size:  # every bin empty in every draw
            break
        a, b = where[rows, None, None], where[None, :, None]  # [M', 1, 1], [1, M, 1]
        rest = np.where((order[0] != a) & (order[0] != b), top[0],
                        np.where((order[1] != a) & (order[1] != b), top[1], top[2]))  # [M', M, B]
        delta = draws[None, :, :] - draws[rows, None, :]  # [i, j, B]: j in, i out of i's bin
        new_max = np.maximum(rest, np.maximum(load[where[rows]][:, None, :] + delta * inv[where[rows]][:, None, None],
                                              load[where][None, :, :] - delta * inv[where][None, :, None]))
        gain = top[0].mean() - new_max.mean(-1)  # [M', M]
        held = np.zeros((bins, int(expert.max()) + 1), bool)
        held[where, expert] = True
        ok = (where[rows, None] != where[None, :]) & (
            (~held[where[rows, None], expert[None, :]] & ~held[where[None, :], expert[rows, None]]) | same[rows])
        gain = np.where(ok, gain, -np.inf)
        r, j = divmod(int(np.argmax(gain)), M)
        i = int(rows[r])
        if not gain[r, j] > 1e-9 * top[0].mean():
            break
        bi, bj = where[i], where[j]
        load[bi] += (draws[j] - draws[i]) * inv[bi]
        load[bj] += (draws[i] - draws[j]) * inv[bj]
        where[i], where[j] = bj, bi
    return where
