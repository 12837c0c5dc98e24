"""The Lagrangian prices of the placement's traffic bound (planner/cluster/lagrange.py):
bound <= brute-force optimum <= incumbent on small instances, and never above the plain
per-expert knapsack sum (strictly below it where the affinity is shared)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from planner.cluster import placement_metrics, topology
from planner.cluster.bound import _knapsack_same, _same_upper, traffic_bound
from planner.cluster.lagrange import star_bound
from profiles.hardware import load_profile


def _cluster(nodes: int, gpus: int):
    import tempfile
    from pathlib import Path

    from conftest import small_cluster

    return topology(load_profile(small_cluster(Path(tempfile.mkdtemp()) / "c.yaml", nodes=nodes, gpus=gpus))[1])


def _best_same(C: np.ndarray, c_from: np.ndarray, c_to: np.ndarray, parts: int, Q: int) -> float:
    """Brute force: the most pairs inside parts over every way to put the copies (one copy of
    an expert per part) on ``parts`` parts of ``Q`` slots of each layer."""

    def layouts(c):
        units = np.repeat(np.arange(len(c)), c)
        out = []
        for parts_of in itertools.product(range(parts), repeat=len(units)):
            X = np.zeros((len(c), parts))
            np.add.at(X, (units, np.array(parts_of)), 1)
            if (X.sum(0) == Q).all() and X.max() <= 1:
                out.append(X / c[:, None])
        return out

    C = np.asarray(C, float)
    return max(float((C * (X @ Y.T)).sum()) for X in layouts(c_from) for Y in layouts(c_to))


@pytest.mark.parametrize("seed", range(4))
def test_star_bound_is_above_the_brute_force_optimum_and_below_the_knapsack(seed):
    rng = np.random.default_rng(seed)
    E, parts, Q = 5, 2, 3
    c_from, c_to = np.array([2, 1, 1, 1, 1]), np.array([1, 1, 2, 1, 1])  # a replica on both parts
    C = rng.integers(0, 20, size=(E, E)).astype(float) * (rng.random((E, E)) < 0.7)
    best = _best_same(C, c_from, c_to, parts, Q)
    units = np.minimum(c_from, 1)
    plain = _knapsack_same(C, c_from, units, Q)
    priced = star_bound(C, c_from, c_to, units, Q, target=best, iters=200)
    assert best <= priced * (1 + 1e-9) + 1e-9  # a bound
    assert priced <= plain * (1 + 1e-12)  # never worse than UB(0)


def test_priced_bound_is_tighter_than_the_plain_knapsack_on_a_fixed_instance():
    # every expert of layer 1 wants experts 0 and 1 of layer 0; they cannot all sit with both
    C = np.array([[9, 9, 9, 9], [9, 9, 9, 9], [1, 0, 0, 1], [0, 1, 1, 0]], float)
    ones = np.ones(4, np.int64)
    best = _best_same(C, ones, ones, 2, 2)
    plain = _knapsack_same(C, ones, ones, 2)
    priced = star_bound(C, ones, ones, ones, 2, target=best, iters=200)
    assert best <= priced + 1e-9 and priced < plain - 1.0


def test_traffic_bound_below_the_brute_force_optimum_and_above_the_old_bound():
    """2 MoE layers x 6 experts on 2 nodes x 1 GPU (3 slots each): every placement listed."""
    topo = _cluster(2, 1)
    rng = np.random.default_rng(7)
    base = rng.integers(0, 4, size=(6, 6)).astype(float)
    base[:3, :3] += 10 * rng.random((3, 3))  # affinity a bound can see
    base[:, 4] += 6  # one expert everyone wants
    trans = base[None]
    load = np.stack([trans[0].sum(1), trans[0].sum(0)]) + 1.0
    H, T = 64, 10
    rows = [sorted(a) + sorted(set(range(6)) - set(a)) for a in itertools.combinations(range(6), 3)]
    best = min(placement_metrics(np.array([r0, r1]), load, trans, topo, H, T)["traffic_s_per_token"]
               for r0 in rows for r1 in rows)
    incumbent = np.array([[0, 2, 4, 1, 3, 5], [0, 1, 3, 2, 4, 5]])
    ours = placement_metrics(incumbent, load, trans, topo, H, T)["traffic_s_per_token"]
    bound = traffic_bound(incumbent, load, trans, topo, H, T, np.full(2, 1e9), max_pairs=0, max_layouts=0)
    logcnt = np.ones((2, 6), np.int64)
    d = topo.token_cost_s(H)[0, 1]
    old = d * (trans.sum() - _same_upper(trans, logcnt, 3, 1)) / T  # the plain knapsack sum
    assert bound.method == "relaxation"
    assert bound.traffic_s_per_token <= best * (1 + 1e-12) and best <= ours * (1 + 1e-12)
    assert bound.traffic_s_per_token >= old * (1 - 1e-12)
    assert bound.traffic_s_per_token > old * 1.01  # the prices count here
