"""Execution site per expert: band hit rates, per-token outcomes and the costs of split options.

A layer's option splits its offloaded experts by frequency rank: ranks [p, q) go through the
layer's cache (fetch / hybrid), ranks [q, E) run on the CPU where they live. These tests hold
the pieces to direct simulation: the band's LRU distances against the plain LRU pass with
everything outside the band pinned, the per-token outcomes against a simulated band cache,
and the option costs against the formulas of planner.costs written out expert by expert.

Legend: T = tokens, L = MoE layers, K = top-k, E = experts.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_planner_ilp import fast_cpu_setup

from planner.costs import MODES, option_costs
from planner.workload_view import planning_stats
from profiles.perf import expert_call_s
from profiles.workload.hitrate import COLD, lru_band_distances, lru_stack_distances
from profiles.workload.synthetic import SyntheticWorkload, generate

FETCH, LOCAL, HYBRID, STREAM = (MODES.index(m) for m in ("fetch", "local", "hybrid", "stream"))


# ----------------------------------------------------------------------------- band distances


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data(), T=st.integers(1, 30), L=st.integers(1, 3), K=st.integers(1, 3), E=st.integers(3, 9),
       token_as_set=st.booleans(), reset=st.booleans())
def test_band_distances_equal_lru_with_everything_outside_the_band_pinned(data, T, L, K, E, token_as_set, reset):
    K = min(K, E)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])  # [T, L, K]
    rank = np.stack([rng.permutation(E) for _ in range(L)])  # [L, E]
    edges = sorted(set(data.draw(st.lists(st.integers(0, E), min_size=1, max_size=5))))
    cut = data.draw(st.integers(0, T))
    seq_lens = np.array([n for n in (cut, T - cut) if n > 0])
    below, warm = lru_band_distances(ids, E, rank, edges, token_as_set=token_as_set, seq_lens=seq_lens,
                                     reset_per_sequence=reset)
    assert below.shape == (T, L, K, len(edges)) and warm.shape == (T, L, K)
    r = rank[np.arange(L)[None, :, None], ids]  # [T, L, K]
    for i, j in itertools.combinations(range(len(edges)), 2):
        outside = (rank < edges[i]) | (rank >= edges[j])
        expected = lru_stack_distances(ids, E, token_as_set=token_as_set, seq_lens=seq_lens,
                                       reset_per_sequence=reset, pinned=outside)
        in_band = (r >= edges[i]) & (r < edges[j])
        dist = below[..., j].astype(np.int64) - below[..., i]
        got = np.where(in_band, np.where(warm, dist, COLD), -1)
        assert (got == expected).all(), (edges[i], edges[j])


def test_band_distances_reject_unsorted_edges():
    from profiles.errors import InputError

    with pytest.raises(InputError, match="strictly increasing"):
        lru_band_distances(np.zeros((2, 1, 1), int), 4, np.arange(4)[None], [2, 1])


# ----------------------------------------------------------------------------- per-token outcomes


def _simulated_band_outcomes(stats, trace, layer: int, p: int, c: int, q: int) -> np.ndarray:
    """``[T, 4]`` (resident, hit, miss, local) per token: an LRU cache of ``c`` slots that sees
    only the accesses to ranks [p, q), walked access by access in rank order."""
    rank = np.empty(stats.num_experts, int)
    rank[stats.order[layer]] = np.arange(stats.num_experts)
    cache: list[int] = []  # most recent first
    out = []
    for token in trace.expert_ids[:, layer, :]:
        row = [0, 0, 0, 0]
        for e in token:
            r = rank[e]
            if r < p:
                row[0] += 1
            elif r >= q:
                row[3] += 1
            elif e in cache:
                row[1] += 1
                cache.remove(e)
                cache.insert(0, e)
            else:
                row[2] += 1
                cache.insert(0, e)
                del cache[c:]
        out.append(row)
    return np.array(out)


@pytest.fixture(scope="module")
def small_trace():
    return generate(SyntheticWorkload(num_layers=2, num_experts=8, top_k=2, skew=1.0, temporal=0.4, affinity=0.5,
                                      num_sequences=6, prompt_tokens=30, output_tokens=10, seed=4))


def test_token_outcomes_and_hit_rates_match_a_simulated_band_cache(small_trace):
    stats = planning_stats(small_trace)
    grid = [int(g) for g in stats.pinned_grid]  # 0..8: every rank is a grid point
    for layer in range(2):
        for p, q in itertools.combinations(grid, 2):
            for c in range(q - p + 1):
                n_res, n_hit, n_miss, n_local, share = stats.token_outcomes(layer, p, c, q)
                assert share.sum() == pytest.approx(1.0)
                assert ((n_res + n_hit + n_miss + n_local) == 2).all()
                sim = _simulated_band_outcomes(stats, small_trace, layer, p, c, q)
                cells, counts = np.unique(sim, axis=0, return_counts=True)
                got = np.stack([n_res, n_hit, n_miss, n_local], axis=1)
                assert (got == cells).all() and share == pytest.approx(counts / len(sim))
                band = sim[:, 1].sum() + sim[:, 2].sum()
                assert stats.hit_rate(layer, p, c, q) == pytest.approx(sim[:, 1].sum() / band if band else 0.0)


def test_many_outcomes_at_once_equal_one_at_a_time(small_trace):
    stats = planning_stats(small_trace)
    keys = np.array([(0, 2, 8), (2, 0, 2), (1, 3, 5), (3, 1, 8), (8, 0, 8), (2, 2, 6)])
    key, *cols = stats.outcome_table(1, keys)
    for k, (p, c, q) in enumerate(keys):
        one = stats.token_outcomes(1, p, c, q)
        for a, b in zip(one, cols):
            assert (a == b[key == k]).all()


# ----------------------------------------------------------------------------- option costs


def _by_hand(s, layer: int, spec) -> tuple[float, float, float]:
    """G, U, F of one option from the module docstring's formulas, one expert at a time
    (U at B > 1: the CPU's expert calls plus one round trip of the step's hidden states when
    it runs anything, with the experts active independently)."""
    p, q, bi, c, bo, hi, mode = (int(v) for v in spec)
    st_, B, m = s.stats, s.batch_size, s.model
    br, bof = s.formats[bi], s.formats[bo]
    h = st_.hit_rate(layer, p, c, q) if q > p else 0.0
    x = s.transfer_s(s.homes[hi], s.expert_bytes(bof))
    G = U = F = 0.0
    idle = 1.0  # P(the CPU runs nothing this step)
    for rank, e in enumerate(st_.order[layer]):
        f = float(st_.frequency[layer, e])
        a = 1 - (1 - f) ** B
        if a == 0:
            continue
        n = B * f / a

        def t(device, fm, n=n):
            return expert_call_s(device, fm, s.expert_bytes(fm), m.expert_flops_per_token * n, n)

        u = t(s.host, bof)
        if rank < p:
            G += a * t(s.compute, br)
        elif rank >= q or mode == LOCAL:
            U += a * u
            idle *= 1 - a
        elif mode == HYBRID:
            G += a * h * t(s.compute, bof)
            U += a * (1 - h) * u
            F += a * (1 - h) * x
            idle *= (1 - a) ** (1 - h)
        else:  # fetch
            G += a * t(s.compute, bof)
            F += a * (1 - h) * x
    return G, U + (1 - idle) * 2 * s.activation_s(B), F


@pytest.mark.parametrize("batch", [1, 4, 64])
def test_split_option_costs_follow_the_formulas_expert_by_expert(tmp_path, batch):
    s = dataclasses.replace(fast_cpu_setup(tmp_path, hbm=300_000, dram=600_000), batch_size=batch)
    specs = np.array([(2, 5, 0, 2, 1, 0, FETCH), (2, 5, 0, 2, 1, 0, HYBRID), (0, 3, 1, 0, 1, 0, FETCH),
                      (3, 8, 0, 2, 2, 0, FETCH), (3, 3, 0, 0, 2, 0, LOCAL), (1, 8, 0, 0, 0, 1, FETCH)])
    t = option_costs(s, 0, specs)
    for i, spec in enumerate(specs):
        G, U, F = _by_hand(s, 0, spec)
        assert (t.G[i], t.F[i]) == pytest.approx((G, F), rel=1e-12)
        if batch > 1:  # at batch 1 U is the exact mean over the per-token outcomes instead
            assert t.U[i] == pytest.approx(U, rel=1e-9)
    if batch > 1:  # many tokens per step: the busiest resource, from the expected busy times
        fetch = specs[:, 6] == FETCH
        assert t.tau[fetch] == pytest.approx(np.maximum(np.maximum(t.G + t.F, t.U), t.F)[fetch], rel=1e-12)


def test_batch_one_split_option_waits_for_each_tokens_slowest_resource(tmp_path, small_trace):
    """At batch 1 a split layer lasts the mean over tokens of max(GPU with the fetches
    overlapping it, CPU, link) of the experts that token routed to (the cache simulated
    access by access); the CPU gets the token's hidden state once and sends the sum back."""
    s = fast_cpu_setup(tmp_path, hbm=300_000, dram=600_000)
    s = dataclasses.replace(s, stats=planning_stats(small_trace))
    p, q, c = 1, 5, 2
    spec = np.array([(p, q, 0, c, 1, 0, FETCH), (p, q, 0, c, 1, 0, HYBRID)])
    t = option_costs(s, 1, spec)
    one = np.ones(1)
    t_res, t_off = s.call_s(s.compute, "bf16", one)[0], s.call_s(s.compute, "int8", one)[0]
    t_cpu, ax = s.call_s(s.host, "int8", one)[0], 2 * s.activation_s(1.0)
    x = s.transfer_s(s.homes[0], s.expert_bytes("int8"))
    n_res, n_hit, n_miss, n_local = _simulated_band_outcomes(s.stats, small_trace, 1, p, c, q).T

    def cpu(n):
        return n * t_cpu + np.where(n > 0, ax, 0.0)

    # the device runs resident experts and hits while the misses are fetched one by one
    work = n_res * t_res + (n_hit + n_miss) * t_off
    device = np.where(n_miss > 0, np.maximum.reduce([work, x + n_miss * t_off, n_miss * x + t_off]), work)
    fetch = np.maximum(device, cpu(n_local)).mean()
    hybrid = np.maximum(np.maximum(n_res * t_res + n_hit * t_off, cpu(n_local + n_miss)), n_miss * x).mean()
    assert t.tau == pytest.approx([fetch, hybrid], rel=1e-12)


def test_a_split_with_q_equal_to_e_or_p_is_the_per_layer_option(tmp_path):
    """q = E sends every offloaded expert through the cache and q = p runs them all on the CPU:
    the per-layer modes the planner had before execution sites were chosen per expert."""
    s = fast_cpu_setup(tmp_path, hbm=300_000, dram=600_000)
    E = s.stats.num_experts
    t = option_costs(s, 0, np.array([(2, E, 0, 2, 1, 0, FETCH), (2, 2, 0, 0, 1, 0, LOCAL),
                                     (2, E, 0, 0, 1, 0, FETCH)]))
    n_local = s.stats.token_outcomes(0, 2, 2, E)[3]
    assert (n_local == 0).all()
    _, n_hit, n_miss, _, _ = s.stats.token_outcomes(0, 2, 0, 2)
    assert (n_hit == 0).all() and (n_miss == 0).all()
    assert t.U[0] == 0.0 and t.F[1] == 0.0 and t.G[1] == pytest.approx(option_costs(
        s, 0, np.array([(2, 2, 0, 0, 1, 0, LOCAL)])).G[0])
    assert t.F[2] > t.F[0]  # no slots: every band access crosses the link


def test_the_best_split_moves_with_the_batch(tmp_path):
    """With more tokens per step a frequent expert serves more tokens per call: its CPU time
    grows while one fetch serves them all, so more ranks go through the cache (q rises)."""
    s1 = fast_cpu_setup(tmp_path, hbm=300_000, dram=600_000)
    E = s1.stats.num_experts
    best = []
    for batch in (1, 4, 16, 64):
        s = dataclasses.replace(s1, batch_size=batch)
        specs = np.array([(0, q, 0, 0, 0, 0, FETCH) for q in range(1, E + 1)] + [(0, 0, 0, 0, 0, 0, LOCAL)])
        t = option_costs(s, 0, specs)
        best.append(int(t.q[np.argmin(t.tau)]))
    assert best == sorted(best) and best[0] < best[-1] < E
