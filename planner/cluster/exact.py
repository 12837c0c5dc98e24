"""The least traffic over the whole layer chain, exactly, when every layer has few layouts.

Shape legend: L = MoE layers, E = routed experts, G = GPUs, S = slots per GPU,
K = layouts of one layer.

With the copies per expert ``c[l, e]`` fixed (the placer's), a layer's *layout* says which
GPUs hold e's copies (``c[l, e]`` distinct GPUs) with ``S`` copies per GPU. On a small box
(Mixtral's 8 experts on 2 GPUs: 20 layouts per layer) they can all be listed; those that
break the load cap (``max_g load / speed <= cap[l]``) are dropped, and the traffic of the
chain, ``sum_l t_l(a_l, a_{l+1})`` with ``t_l(a, b) = sum_ij C[l, i, j] P_a[i]^T D P_b[j]``,
is minimised by dynamic programming over the layers (a shortest path through the layers'
layouts). That is the placement problem's optimum for these copies, so it bounds every
placement with them, ours included, with no gap of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["MAX_LAYOUTS", "chain_optimum", "layer_layouts"]

# a layer with more layouts than this is not listed (a size rule: the same inputs take the same path)
MAX_LAYOUTS = 400


def layer_layouts(copies: np.ndarray, num_gpus: int, per_gpu: int, limit: int = MAX_LAYOUTS) -> np.ndarray | None:
    """``[K, E, G]`` copies of every expert on every GPU (0/1) of every layout, or ``None``
    when there are more than ``limit`` (or the search takes more than ``50 x limit`` steps:
    dead ends, where an expert's copies find too few GPUs with room, cost steps too).

    Args:
        copies: ``[E]`` copies per expert (each on a different GPU).
        num_gpus: G; per_gpu: S, copies per GPU.
    """
    from itertools import combinations

    E = len(copies)
    out: list[np.ndarray] = []
    steps = [0]
    room = np.full(num_gpus, per_gpu)
    cur = np.zeros((E, num_gpus), np.int8)
    suffix = np.concatenate([np.cumsum(copies[::-1])[::-1], [0]])  # copies still to place from e on

    def place(e: int) -> bool:
        steps[0] += 1
        if len(out) > limit or steps[0] > 50 * limit:
            return False
        if e == E:
            out.append(cur.copy())
            return True
        if (room > 0).sum() < copies[e] or room.sum() != suffix[e]:
            return True  # a dead end
        for gpus in combinations([g for g in range(num_gpus) if room[g] > 0], int(copies[e])):
            sel = list(gpus)
            cur[e, sel] = 1
            room[sel] -= 1
            ok = place(e + 1)
            room[sel] += 1
            cur[e, sel] = 0
            if not ok:
                return False
        return True

    if not place(0) or len(out) > limit or not out:
        return None
    return np.array(out)


def chain_optimum(logcnt: np.ndarray, load: np.ndarray, trans: np.ndarray, D: np.ndarray, cap: np.ndarray,
                  speed: np.ndarray | None = None, limit: int = MAX_LAYOUTS,
                  keep: Callable[[int, np.ndarray], np.ndarray] | None = None) -> tuple[float, np.ndarray] | None:
    """The least traffic (link seconds, all tokens) of any placement with copies ``logcnt``
    under the load cap, and its ``phy2log [L, R]``; ``None`` when a layer has too many layouts.

    Args:
        logcnt: ``[L, E]`` copies per expert; load: ``[L, E]`` tokens per expert;
        trans: ``[L-1, E, E]``; D: ``[G, G]`` seconds per token between GPUs;
        cap: ``[L]`` largest GPU time a layer may give one GPU; speed: ``[G]`` (``None``: all 1).
        keep: ``keep(l, share [K, E, G]) -> [K]`` bool, a further test a layout must pass
            (the placer's balance over load draws).
    """
    L, E = load.shape
    G = D.shape[0]
    S = int(logcnt[0].sum()) // G
    inv = np.ones(G) if speed is None else 1.0 / np.asarray(speed, float)
    shares = []
    for l in range(L):
        lay = layer_layouts(logcnt[l], G, S, limit)
        if lay is None:
            return None
        share = lay / logcnt[l][None, :, None]  # [K, E, G]
        time_g = np.einsum("e,keg->kg", load[l], share) * inv  # [K, G]
        ok = time_g.max(1) <= cap[l] + 1e-9
        if keep is not None:
            ok &= keep(l, share)
        share = share[ok]
        if not len(share):
            return None
        shares.append(share)
    # best[a]: least traffic of layers 0..l ending in layout a of layer l; back[l][a]: its predecessor
    best = np.zeros(len(shares[0]))
    back = []
    for l in range(L - 1):
        A, B = shares[l], shares[l + 1]
        toward = np.einsum("aig,ij,gh->ajh", A, trans[l], D)  # [Ka, E, G]: pairs from a reaching j on h
        t = np.einsum("ajh,bjh->ab", toward, B)  # [Ka, Kb]
        total = best[:, None] + t
        back.append(np.argmin(total, axis=0))
        best = total.min(axis=0)
    k = int(np.argmin(best))
    value = float(best[k])
    picks = [k]
    for l in range(L - 2, -1, -1):
        picks.append(int(back[l][picks[-1]]))
    picks.reverse()
    rows = []
    for l, k in enumerate(picks):
        held = shares[l][k] > 0  # [E, G]
        rows.append(np.concatenate([np.flatnonzero(held[:, g]) for g in range(G)]))
    return value, np.array(rows)
