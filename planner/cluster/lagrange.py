"""A Lagrangian bound on the token pairs that one layer pair can keep inside parts (GPUs or nodes).

Shape legend: E = routed experts (of layer l: i, of layer l + 1: j), U = units (copies of the
layer-l experts, at most ``u_i`` of i per part), Q = slots per part.

One layer pair, parts n with ``Q`` slots of each layer, every slot full; ``x[i, n]`` copies of
i (layer l) and ``y[j, n]`` copies of j (layer l + 1) on part n, ``sum_n x[i, n] = c_i``,
``sum_n y[j, n] = c_j``, ``sum_i x[i, n] = sum_j y[j, n] = Q``, ``x[i, n] <= u_i``. The pairs
kept inside parts are

    same = sum_n sum_ij C'_ij x[i, n] y[j, n],   C'_ij = C_ij / (c_i c_j)

(:func:`.metrics.placement_metrics`' ``P[l, i]^T P[l + 1, j]`` summed over a part's GPUs).
For any prices ``alpha [E]``, since ``sum_n x[i, n] = c_i`` and ``sum_j y[j, n] = Q``,

    same = sum_n sum_j y[j, n] sum_i (C'_ij - alpha_i / Q) x[i, n] + alpha . c
         <= sum_j c_j knap_j(alpha) + alpha . c =: UB(alpha),

    knap_j(alpha) = max { sum_i (C'_ij - alpha_i / Q) a_i : sum_i a_i = Q, 0 <= a_i <= u_i integer }

(each j on part n takes the part's layer-l copies as it likes: top ``Q`` units, exact).
``UB(0)`` is the per-expert fractional knapsack of :mod:`.bound`; prices on the experts that
too many j's want (the subgradient ``c_i - sum_j c_j a_i^(j) / Q``) lower it: the Lagrangian
dual of "a copy sits on one part", which equals the Dantzig-Wolfe master whose columns are
one j's part (a star). Every ``alpha`` gives a valid bound, so the subgradient method (Polyak
steps toward the incumbent's value, a fixed number of iterations: a work limit) keeps the
least ``UB`` it evaluated. The same holds with the layers' roles swapped (``C`` transposed).

What the prices can reach: each star's set is a knapsack polytope with integral vertices, so
``min_alpha UB`` is the transportation LP ``max sum C'_ij s_ij``, ``sum_j s_ij = c_i Q``,
``sum_i s_ij = c_j Q``, ``0 <= s_ij <= c_j u_i`` (``s``: copy pairs that share a part): any
``Q``-regular pairing of the copies, not only unions of parts. A band of affinity (the
synthetic workloads' token types) fits such a pairing with no boundary, so a tighter bound
needs what parts imply and pairings do not, e.g. transitivity (i with j, i' with j and i
with j' puts i' with j'): on DeepSeek-V3 over 64 GPUs the bound says at least 0.40 of the
token pairs cross nodes, the placer's plan has 0.53, and placing each layer's experts by the
synthetic generator's own token-type arcs (known only to the generator, and over the load
cap) gives 0.51.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LAGRANGE_ITERS", "star_bound"]

# subgradient iterations per layer pair and direction (a work limit: the bound does not
# depend on the machine's load)
LAGRANGE_ITERS = 60


def _knap(C: np.ndarray, rows: np.ndarray, c_from: np.ndarray, c_to: np.ndarray, alpha: np.ndarray,
          Q: int) -> tuple[float, np.ndarray]:
    """``(UB(alpha), units of each i taken summed over j with weight c_j)``."""
    value = C[rows] / c_from[rows, None] - np.outer(alpha[rows], c_to) / Q  # [U, E'] c_j x unit value
    top = np.argpartition(-value, Q - 1, axis=0)[:Q]  # [Q, E'] the Q largest units per column
    ub = float(np.take_along_axis(value, top, axis=0).sum() + alpha @ c_from)
    # sum_j c_j a_i^(j): taken units, each column's weight c_j
    taken = np.bincount(rows[top].ravel(), weights=np.broadcast_to(c_to, top.shape).ravel(), minlength=len(c_from))
    return ub, taken


def star_bound(C: np.ndarray, c_from: np.ndarray, c_to: np.ndarray, units: np.ndarray, Q: int, target: float,
               iters: int = LAGRANGE_ITERS) -> float:
    """The least ``UB(alpha)`` of the module docstring met by the subgradient method.

    Args:
        C: ``[E, E']`` pairs from layer l's experts (rows) to layer l + 1's.
        c_from, c_to: ``[E]``, ``[E']`` copies per expert; units: ``[E]`` at most this many
            copies of i on one part.
        Q: slots per part (every slot full).
        target: a value ``same`` reaches (the incumbent's): the Polyak steps aim at it.
        iters: subgradient iterations (0: ``UB(0)``).
    """
    rows = np.repeat(np.arange(C.shape[0]), units)  # [U] one row per unit
    if Q <= 0 or len(rows) < Q:  # no part can be full: nothing to price
        return np.inf
    c_from = c_from.astype(float)
    c_to = c_to.astype(float)
    alpha = np.zeros(C.shape[0])
    best, theta, stall = np.inf, 1.0, 0
    for _ in range(iters + 1):
        ub, taken = _knap(C, rows, c_from, c_to, alpha, Q)
        if ub < best - 1e-12 * abs(best if np.isfinite(best) else ub):
            best, stall = ub, 0
        else:
            stall += 1
            if stall >= 5:  # no progress: shorter steps
                theta, stall = theta / 2, 0
        g = c_from - taken / Q
        norm = float(g @ g)
        if norm <= 1e-24 or ub <= target:
            break
        alpha = alpha - theta * (ub - target) / norm * g
    return best
