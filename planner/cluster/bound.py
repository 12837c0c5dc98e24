"""A lower bound on the traffic of any placement at the load cap, and so the gap of ours.

Shape legend: L = MoE layers, E = routed experts, G = GPUs, N = nodes, S = slots per GPU,
Q = slots per part (a GPU: S; a node: S x G / N).

Objective (:func:`.metrics.placement_metrics`): traffic ``sum_l sum_ij C[l, i, j] sum_gh
P[l, i, g] D[g, h] P[l + 1, j, h]`` (link seconds) over the tokens T. Every pair of GPUs costs
at least ``d_gpu [g != h] + d_node [node(g) != node(h)]`` with ``d_gpu`` the cheapest link
between two GPUs and ``d_node`` what the cheapest cross-node link costs beyond it, so

    traffic >= (d_gpu X_gpu + d_node X_node) / T,   X_part = sum_l sum_ij C[l, i, j] - same_part,
    same_part = sum_l sum_ij C[l, i, j] sum_p P[l, i, p] P[l + 1, j, p]   (p: GPUs, or nodes)

with equality when the topology has two levels of equal links (one GPU type on NVSwitch,
one switch between nodes). Two bounds on ``same_part``, for the copies per expert ``c[l, e]``
the placer chose (EPLB's rule):

* **relaxation** (any size, numpy): for each expert j of layer l + 1, ``sum_i C_ij sum_p
  P_ip P_jp <= max_p sum_i C_ij P_ip`` (``sum_p P_jp = 1``), and a part holds ``Q`` slots,
  at most ``u_i = min(c_i, GPUs in the part)`` of them copies of i (``P_ip = k_ip / c_i``), so
  ``max_p ... <= `` the fractional knapsack of ``Q`` units of value ``C_ij / c_i``, ``u_i``
  units of each i. Likewise from each expert i of layer l; a layer pair takes the smaller
  sum. This drops the coupling of the layers (each expert picks its best neighbours) and
  the load cap: a valid bound, loose where the affinity is spread. When every slot is full,
  prices on the experts that too many neighbours pick (:mod:`.lagrange`, the Lagrangian
  dual of "a copy sits on one part", a fixed number of subgradient steps) lower each layer
  pair's knapsack sum; the least value met counts, so it is never above the plain sum.
* **MILP** (small instances, PuLP + HiGHS with a node limit): binaries ``x[l, e, g]`` (a copy
  of e on g), ``sum_g x = c[l, e]``, ``sum_e x = S``, the load cap ``sum_e w[l, e] / c[l, e]
  x[l, e, g] / speed[g] <= cap[l]``, no two copies on a GPU; ``a[l, i, j, g] <= x[l, i, g] /
  c_i, x[l + 1, j, g] / c_j`` (same GPU) and ``b[l, i, j, n]`` likewise over a node's GPUs;
  minimise ``sum C_ij (d_gpu (1 - sum_g a) + d_node (1 - sum_n b))``. Without replicas
  (``c = 1``) ``a`` and ``b`` are the products, and on a two-level topology this is the
  placement problem exactly; with replicas ``min >= product``, still a bound. Its dual bound
  counts when it is larger.

Where every layer has few layouts (:mod:`.exact`), the optimum itself is found by dynamic
programming over the layer chain and is the bound (method ``exact``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .exact import MAX_LAYOUTS, chain_optimum
from .lagrange import star_bound
from .metrics import distribution, node_share
from .topology import Topology

__all__ = ["Bound", "MILP_MAX_PAIRS", "traffic_bound"]

# the MILP is built only when the nonzero transition pairs x (G + N) are at most this many
# pair variables (a size rule, so the same inputs always take the same path): its LP
# relaxation is weak (x = 1 / G makes every pair "same"), so only branching proves anything,
# and Mixtral on 2 GPUs (6k pair variables) ran into the safety net with a bound below the
# relaxation's
MILP_MAX_PAIRS = 2_000
# HiGHS branch-and-bound nodes (a work limit: the bound does not depend on the machine's load)
MILP_NODES = 2_000
# wall-clock safety net of the MILP, seconds
MILP_TIME_LIMIT_S = 60.0


@dataclass(frozen=True)
class Bound:
    """Lower bounds of the placement problem at the load cap (see the module docstring).

    Attributes:
        traffic_s_per_token: on the traffic objective (link seconds per token).
        cross_node_fraction: on the fraction of consecutive-layer token pairs across nodes.
        cross_gpu_fraction: on the fraction across GPUs.
        method: ``exact`` (:mod:`.exact`, every layout listed), ``milp`` or ``relaxation``;
            status: ``optimal`` for ``exact``, the MILP's (``optimal``, ``node limit``,
            ``time limit``) or ``relaxation``.
    """

    traffic_s_per_token: float
    cross_node_fraction: float
    cross_gpu_fraction: float
    method: str
    status: str


def _knapsack_same(C: np.ndarray, c_from: np.ndarray, units: np.ndarray, Q: int) -> float:
    """``sum_j`` of the fractional knapsack of column j: ``Q`` units of value ``C[i, j] / c_from[i]``,
    ``units[i]`` of each i (``C [E, E']``)."""
    rows = np.repeat(np.arange(C.shape[0]), units)  # [sum units] one row per unit
    value = C[rows] / c_from[rows, None]  # [U, E']
    Q = min(Q, len(rows))
    if Q <= 0:
        return 0.0
    top = np.partition(value, len(rows) - Q, axis=0)[len(rows) - Q:]  # [Q, E'] the Q largest per column
    return float(top.sum())


def _same_upper(trans: np.ndarray, logcnt: np.ndarray, Q: int, per_part: int,
                incumbent: np.ndarray | None = None) -> float:
    """Upper bound on the token pairs whose experts share a part of ``Q`` slots (relaxation;
    with ``incumbent`` ``[L-1]``, the pairs each layer pair keeps inside parts in the incumbent,
    every slot full: the prices of :func:`.lagrange.star_bound` too)."""
    total = 0.0
    for l in range(trans.shape[0]):
        C = trans[l]
        ci, cj = logcnt[l], logcnt[l + 1]
        ui, uj = np.minimum(ci, per_part), np.minimum(cj, per_part)
        by_col = _knapsack_same(C, ci, ui, Q)
        by_row = _knapsack_same(C.T, cj, uj, Q)
        best = min(by_col, by_row, float(C.sum()))
        if incumbent is not None and best > incumbent[l]:
            best = min(best, star_bound(C, ci, cj, ui, Q, float(incumbent[l])),
                       star_bound(C.T, cj, ci, uj, Q, float(incumbent[l])))
        total += best
    return total


def _incumbent_same(placement: np.ndarray, trans: np.ndarray, E: int, topo: Topology) -> tuple[np.ndarray, np.ndarray]:
    """``[L-1]`` pairs kept on one GPU and on one node by ``placement`` per layer pair."""
    P = distribution(placement, E, topo.num_gpus)  # [L, E, G]
    PN = node_share(P, topo)  # [L, E, N]
    gpu = np.array([float((trans[l] * (P[l] @ P[l + 1].T)).sum()) for l in range(len(trans))])
    node = np.array([float((trans[l] * (PN[l] @ PN[l + 1].T)).sum()) for l in range(len(trans))])
    return gpu, node


def _levels(topo: Topology, hidden_size: int) -> tuple[float, float]:
    """``(d_gpu, d_node)``: the cheapest link between two GPUs, and the cheapest cross-node
    link's extra (seconds per token)."""
    D = topo.token_cost_s(hidden_size)
    G = topo.num_gpus
    off = ~np.eye(G, dtype=bool)
    d_gpu = float(D[off].min()) if G > 1 else 0.0
    cross = topo.node_of[:, None] != topo.node_of[None, :]
    d_node = max(float(D[cross].min()) - d_gpu, 0.0) if cross.any() else 0.0
    return d_gpu, d_node


def traffic_bound(placement: np.ndarray, load: np.ndarray, trans: np.ndarray, topo: Topology, hidden_size: int,
                  num_tokens: int, cap: np.ndarray, speed: np.ndarray | None = None,
                  max_pairs: int = MILP_MAX_PAIRS, max_layouts: int = MAX_LAYOUTS) -> Bound:
    """Lower bounds for placements with ``placement``'s copies per expert, at the load cap.

    Args:
        placement: ``[L, R]`` phy2log of the incumbent (its copies ``c[l, e]`` are kept).
        load: ``[L, E]`` tokens per expert; trans: ``[L-1, E, E]`` consecutive-layer pairs.
        topo: ranks and links; hidden_size: H; num_tokens: T.
        cap: ``[L]`` the largest GPU time (tokens / speed) a layer may give one GPU.
        speed: ``[G]`` relative GPU speeds (``None``: all 1).
        max_pairs: the MILP's size rule (:data:`MILP_MAX_PAIRS`; 0: no MILP).
        max_layouts: the exact chain's size rule (:data:`.exact.MAX_LAYOUTS` per layer; 0: not tried).
    """
    L, R = placement.shape
    E = load.shape[1]
    G, N = topo.num_gpus, topo.num_nodes
    S, GN = R // G, topo.gpus_per_node
    logcnt = np.stack([np.bincount(placement[l][placement[l] >= 0], minlength=E) for l in range(L)])  # [L, E]
    if (placement < 0).any():  # empty slots (:mod:`.slots`): the relaxation holds (a GPU keeps <= S), the rest assume S
        max_pairs = max_layouts = 0
    total = float(trans.sum())
    # the Lagrangian prices need every slot full (a part's Q slots of each layer)
    inc_gpu, inc_node = (None, None) if (placement < 0).any() or L < 2 else _incumbent_same(placement, trans, E, topo)
    same_gpu = _same_upper(trans, logcnt, S, 1, inc_gpu)
    same_node = _same_upper(trans, logcnt, S * GN, GN, inc_node) if N > 1 else total
    x_gpu, x_node = max(total - same_gpu, 0.0), max(total - same_node, 0.0)
    d_gpu, d_node = _levels(topo, hidden_size)
    T = max(num_tokens, 1)
    traffic = (d_gpu * x_gpu + d_node * x_node) / T
    method, status = "relaxation", "relaxation"
    pairs = int((trans > 0).sum()) * (G + N)
    exact = (chain_optimum(logcnt, load, trans, topo.token_cost_s(hidden_size), cap, speed, max_layouts)
             if total > 0 and max_layouts > 0 else None)
    if exact is not None:  # every layout listed: the optimum itself
        return Bound(traffic_s_per_token=max(exact[0] / T, traffic), cross_node_fraction=x_node / total,
                     cross_gpu_fraction=x_gpu / total, method="exact", status="optimal")
    if 0 < pairs <= max_pairs and total > 0:
        milp = _milp(logcnt, load, trans, topo, cap, speed, d_gpu, d_node)
        if milp is not None:
            status = milp[1]
            if milp[0] / T >= traffic * (1 - 1e-9):
                traffic, method = max(milp[0] / T, traffic), "milp"
    return Bound(traffic_s_per_token=traffic, cross_node_fraction=x_node / total if total else 0.0,
                 cross_gpu_fraction=x_gpu / total if total else 0.0, method=method, status=status)


def _milp(logcnt: np.ndarray, load: np.ndarray, trans: np.ndarray, topo: Topology, cap: np.ndarray,
          speed: np.ndarray | None, d_gpu: float, d_node: float) -> tuple[float, str] | None:
    """The MILP of the module docstring: ``(dual bound in link seconds, status)``, or ``None``
    when HiGHS proves nothing."""
    import highspy
    import pulp

    from ..ilp_mip import _HiGHS

    L, E = load.shape
    G, N, GN = topo.num_gpus, topo.num_nodes, topo.gpus_per_node
    S = int(logcnt[0].sum()) // G
    unit = d_gpu + d_node  # HiGHS sees link costs in this unit (seconds near 1e-9 read as zero)
    if unit <= 0:
        return None
    d_gpu, d_node = d_gpu / unit, d_node / unit
    inv = np.ones(G) if speed is None else 1.0 / np.asarray(speed, float)
    prob = pulp.LpProblem("ep_traffic_bound", pulp.LpMinimize)
    x = {(l, e, g): pulp.LpVariable(f"x_{l}_{e}_{g}", cat="Binary")
         for l in range(L) for e in range(E) for g in range(G)}
    for l in range(L):
        for e in range(E):
            # copies[l, e]: sum_g x[l, e, g] = c[l, e]
            prob += pulp.lpSum(x[l, e, g] for g in range(G)) == int(logcnt[l, e]), f"copies[{l},{e}]"
        for g in range(G):
            # slots[l, g]: sum_e x[l, e, g] = S
            prob += pulp.lpSum(x[l, e, g] for e in range(E)) == S, f"slots[{l},{g}]"
            # cap[l, g]: sum_e w[l, e] / c[l, e] x[l, e, g] / speed[g] <= cap[l]
            prob += pulp.lpSum(float(load[l, e] / logcnt[l, e] * inv[g]) * x[l, e, g] for e in range(E)) \
                <= float(cap[l]) + 1e-9, f"cap[{l},{g}]"
    cost, constant = [], 0.0
    for l in range(L - 1):
        for i, j in zip(*np.nonzero(trans[l])):
            w = float(trans[l, i, j])
            ci, cj = float(logcnt[l, i]), float(logcnt[l + 1, j])
            same_g = []
            for g in range(G):
                a = pulp.LpVariable(f"a_{l}_{i}_{j}_{g}", 0, 1)
                # same_gpu: a <= x[l, i, g] / c_i, a <= x[l + 1, j, g] / c_j
                prob += a <= x[l, i, g] * (1 / ci), f"ai[{l},{i},{j},{g}]"
                prob += a <= x[l + 1, j, g] * (1 / cj), f"aj[{l},{i},{j},{g}]"
                same_g.append(a)
            same_n = []
            for n in range(N):
                gs = range(n * GN, (n + 1) * GN)
                b = pulp.LpVariable(f"b_{l}_{i}_{j}_{n}", 0, 1)
                # same_node: b <= sum_{g in n} x[l, i, g] / c_i, likewise for j
                prob += b <= pulp.lpSum(x[l, i, g] for g in gs) * (1 / ci), f"bi[{l},{i},{j},{n}]"
                prob += b <= pulp.lpSum(x[l + 1, j, g] for g in gs) * (1 / cj), f"bj[{l},{i},{j},{n}]"
                same_n.append(b)
            # traffic >= C_ij (d_gpu (1 - sum_g a) + d_node (1 - sum_n b)); the constant kept apart
            constant += w * (d_gpu + d_node)
            cost.append(-w * d_gpu * pulp.lpSum(same_g) - w * d_node * pulp.lpSum(same_n))
    prob += pulp.lpSum(cost)
    engine = _HiGHS(msg=False, timeLimit=MILP_TIME_LIMIT_S, gapRel=0.0, gapAbs=1e-15, threads=1, random_seed=0,
                    mip_max_nodes=MILP_NODES)
    prob.solve(engine)
    model_status = prob.solverModel.getModelStatus()
    if model_status == highspy.HighsModelStatus.kInfeasible:
        return None
    info = prob.solverModel.getInfo()
    status = {highspy.HighsModelStatus.kOptimal: "optimal",
              highspy.HighsModelStatus.kTimeLimit: "time limit"}.get(model_status, "node limit")
    return (constant + float(info.mip_dual_bound)) * unit, status
