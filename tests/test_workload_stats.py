"""Workload statistics: counts, entropy, locality metrics, and the aggregate-only workload.

Legend: T = tokens, L = MoE layers, K = top-k, E = experts.
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiles.errors import InputError
from profiles.workload.aggregate import AggregateWorkload, load_aggregate, save_aggregate
from profiles.workload.stats import (
    coactivation_counts,
    compute_stats,
    default_cache_sizes,
    expert_frequency,
    gate_mass,
    next_layer_predictability,
    previous_token_overlap,
    routing_entropy_bits,
    segment_best_hit_rate,
    transition_counts,
)
from profiles.workload.trace import Trace

from conftest import ESFT, needs_esft  # noqa: E402

# T = 3 tokens, L = 2 layers, K = 2, E = 4
IDS = np.array([
    [[0, 1], [2, 3]],
    [[1, 2], [3, 0]],
    [[0, 1], [2, 1]],
])
WEIGHTS = np.array([
    [[0.5, 0.25], [0.5, 0.5]],
    [[0.75, 0.25], [0.5, 0.25]],
    [[0.5, 0.5], [0.25, 0.25]],
])


def _trace(ids=IDS, seq_lens=(3,), weights=WEIGHTS, E=4) -> Trace:
    T, L, _ = ids.shape
    return Trace(expert_ids=np.asarray(ids), seq_lens=np.asarray(seq_lens), phase=np.zeros(T, np.uint8),
                 num_experts=E, layer_map=tuple(range(1, L + 1)),
                 gate_weights=None if weights is None else np.asarray(weights, np.float32), model="toy")


def test_counts_hand_worked():
    assert expert_frequency(IDS, 4).tolist() == [[2, 3, 1, 0], [1, 1, 2, 2]]
    assert gate_mass(IDS, WEIGHTS, 4).tolist() == [[1.0, 1.5, 0.25, 0.0], [0.25, 0.25, 0.75, 1.0]]
    co = coactivation_counts(IDS, 4)
    assert co[0].tolist() == [[2, 2, 0, 0], [2, 3, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    tr = transition_counts(IDS, 4)
    # token 0: {0,1} -> {2,3}; token 1: {1,2} -> {3,0}; token 2: {0,1} -> {2,1}
    assert tr.shape == (1, 4, 4)
    assert tr[0].tolist() == [[0, 1, 2, 1], [1, 1, 2, 2], [1, 0, 0, 1], [0, 0, 0, 0]]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(1, 12), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_count_invariants(T, L, K, seed):
    E = K + 3
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])
    freq = expert_frequency(ids, E)
    co = coactivation_counts(ids, E)
    tr = transition_counts(ids, E)
    assert freq.shape == (L, E) and co.shape == (L, E, E) and tr.shape == (max(0, L - 1), E, E)
    assert (freq.sum(axis=1) == T * K).all()
    assert (co == co.transpose(0, 2, 1)).all()
    assert (np.diagonal(co, axis1=1, axis2=2) == freq).all()
    assert (co.sum(axis=(1, 2)) == T * K * K).all()
    assert (tr.sum(axis=(1, 2)) == T * K * K).all()
    assert (tr.sum(axis=2) == K * freq[:-1]).all() and (tr.sum(axis=1) == K * freq[1:]).all()


def test_entropy():
    ent = routing_entropy_bits(np.array([[1, 1, 1, 1], [4, 0, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0]]))
    np.testing.assert_allclose(ent, [2.0, 0.0, 1.0, 0.0])


def test_previous_token_overlap_respects_sequences():
    # token 1 shares 1 of 2 with token 0 at layer 0; token 2 starts a new sequence
    assert previous_token_overlap(IDS, [2, 1]).tolist() == [0.5, 0.5]
    # without the boundary, token 2 also shares expert 1 with token 1 at layer 0, none at layer 1
    assert previous_token_overlap(IDS).tolist() == [0.5, 0.25]
    assert previous_token_overlap(IDS[:1]).tolist() == [0.0, 0.0]


def test_segment_best_hit_rate_hand_worked():
    # layer 0, segments of 2 tokens: {0,1,1,2} then {0,1}; 1 slot: 2 + 1 hits of 6
    seg = segment_best_hit_rate(IDS, 4, 2)
    assert seg.shape == (2, 5)
    assert seg[0].tolist() == [0.0, 3 / 6, 5 / 6, 1.0, 1.0]
    # one token per segment: a cache of K slots always holds the token's experts
    assert (segment_best_hit_rate(IDS, 4, 1)[:, 2] == 1.0).all()
    # a segment never crosses a sequence boundary: layer 1 with sequences [1, 2] has the
    # segments {2,3} | {3,0,2,1} (1 + 1 hits with one slot), without them {2,3,3,0} | {2,1}
    assert segment_best_hit_rate(IDS, 4, 2, [1, 2])[1, 1] == 2 / 6
    assert segment_best_hit_rate(IDS, 4, 2)[1, 1] == 3 / 6
    with pytest.raises(InputError, match="segment length"):
        segment_best_hit_rate(IDS, 4, 0)


def test_next_layer_predictability_deterministic_routing():
    # layer 1's experts are a fixed function of layer 0's: the predictor is perfect
    rng = np.random.default_rng(0)
    T, E, K = 400, 8, 2
    first = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])
    ids = np.stack([first, (first + 3) % E], axis=1)
    pred = next_layer_predictability(ids, E, seq_lens=np.full(8, 50))
    assert pred.recall.tolist() == [1.0]
    assert pred.train_tokens == 200 and pred.test_tokens == 200 and pred.top_k == K
    assert pred.baseline_recall[0] < 0.5
    # independent layers: no better than popularity (within noise)
    indep = np.stack([first, np.stack([rng.choice(E, K, replace=False) for _ in range(T)])], axis=1)
    pred = next_layer_predictability(indep, E, seq_lens=np.full(8, 50))
    assert abs(pred.recall[0] - pred.baseline_recall[0]) < 0.1
    with pytest.raises(InputError, match="train fraction"):
        next_layer_predictability(ids, E, train_fraction=1.0)


def test_compute_stats_shapes_and_summary():
    stats = compute_stats(_trace(), segment_len=2)
    L, E = 2, 4
    assert stats.frequency.shape == (L, E) and stats.gate_mass.shape == (L, E)
    assert stats.coactivation.shape == (L, E, E) and stats.transitions.shape == (L - 1, E, E)
    assert stats.entropy_bits.shape == (L,) and stats.segment_hit_rate.shape == (L, E + 1)
    assert set(stats.hit_rates.curves) == {"lru", "lfu", "static", "belady"}
    summary = stats.summary([1, 2])
    assert summary["cache_sizes"] == [1, 2] and len(summary["layers"]) == L
    assert summary["layers"][0]["hidden_layer"] == 1
    assert summary["layers"][1]["next_layer_recall"] is None
    assert set(summary["mean_over_layers"]["lru"]) == {"1", "2"}
    assert compute_stats(_trace(weights=None)).gate_mass is None


def test_default_cache_sizes():
    assert default_cache_sizes(6, 64) == [6, 12, 24, 32]
    assert default_cache_sizes(2, 8) == [2, 4, 8]
    assert default_cache_sizes(8, 64) == [8, 16, 32]


def test_aggregate_roundtrip_and_validation(tmp_path):
    agg = AggregateWorkload(expert_counts=np.array([[3, 1, 0], [1, 1, 2]]), layer_ids=(0, 7),
                            transition_counts=np.eye(3, dtype=np.int64)[None] * 4, transition_layers=((0, 7),),
                            top_k=1, num_tokens=4, model="toy", source="test")
    assert agg.static_curve()[0].tolist() == [0.0, 0.75, 1.0, 1.0]
    np.testing.assert_allclose(agg.entropy_bits(), [routing_entropy_bits(np.array([[3, 1, 0]]))[0], 1.5])
    summary = agg.summary([1, 2])
    assert summary["layer_pairs"][0]["layers"] == [0, 7]
    assert summary["layer_pairs"][0]["top1_agreement"] == 1.0
    path = save_aggregate(agg, tmp_path / "agg.npz")
    back = load_aggregate(path)
    assert back.layer_ids == (0, 7) and back.transition_layers == ((0, 7),) and back.top_k == 1
    assert (back.expert_counts == agg.expert_counts).all() and back.model == "toy"
    with pytest.raises(InputError, match="layer_ids"):
        AggregateWorkload(expert_counts=np.ones((2, 3)), layer_ids=(0,))
    with pytest.raises(InputError, match="non-negative"):
        AggregateWorkload(expert_counts=-np.ones((1, 3)), layer_ids=(0,))
    with pytest.raises(InputError, match="transition_counts"):
        AggregateWorkload(expert_counts=np.ones((1, 3)), layer_ids=(0,), transition_counts=np.ones((1, 2, 2)),
                          transition_layers=((0, 1),))
    with pytest.raises(InputError, match="not found"):
        load_aggregate(tmp_path / "missing.npz")


@needs_esft
def test_esft_locality_figures():
    """shared/traces/README: a token shares 26-29% of its experts with the previous one,
    and adjacent layers are strongly dependent (so the transition predictor beats
    popularity)."""
    from profiles.workload.importers import import_esft

    for task in ("intent", "summary"):
        trace = import_esft(ESFT, task)
        overlap = previous_token_overlap(trace.expert_ids, trace.seq_lens).mean()
        assert 0.255 <= overlap <= 0.295, (task, overlap)
        pred = next_layer_predictability(trace.expert_ids, 64, seq_lens=trace.seq_lens)
        assert pred.recall.mean() > pred.baseline_recall.mean() + 0.15


def test_next_layer_predictor_picks_the_stable_sorts_first_k():
    """The predictor's top k (by score, ties to the more frequent expert, then the lower id) is
    found by a partition; it must be exactly the set a stable sort puts first, ties and all."""
    from profiles.workload.stats import expert_frequency, transition_counts

    rng = np.random.default_rng(7)
    E, L, K, T = 6, 4, 2, 400  # few experts: many exact ties
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])
    seq_lens = np.array([100, 100, 100, 100])
    for k in (1, 2, 5):
        got = next_layer_predictability(ids, E, seq_lens=seq_lens, top_k=k).recall
        train = np.arange(T) < 200
        M, freq, te = transition_counts(ids[train], E), expert_frequency(ids[train], E), ids[~train]
        want = []
        for layer in range(L - 1):
            tie = freq[layer + 1]
            score = M[layer][te[:, layer, :]].sum(axis=1) * (int(tie.max()) + 1) + tie
            pred = np.argsort(-score, axis=1, kind="stable")[:, :k]
            actual = te[:, layer + 1, :]
            want.append((pred[:, :, None] == actual[:, None, :]).any(axis=1).sum() / actual.size)
        np.testing.assert_array_equal(got, np.array(want))
