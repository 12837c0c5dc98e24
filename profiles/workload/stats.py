"""Routing statistics of a trace: frequency, gate mass, co-activation, transitions,
entropy, and the locality metrics of "Not All Models Suit Expert Offloading" (Liang et al.,
2025).

Legend: T = tokens, L = MoE layers, K = experts per token (top-k), E = routed experts per
layer, S = sequences, C = E + 1 cache sizes (0..E).

All counts are exact integers over every (token, layer, rank) entry. Hit-rate curves live
in :mod:`profiles.workload.hitrate`; :func:`compute_stats` gathers both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from .hitrate import POLICIES, HitRateCurves, hit_rate_curves
from .trace import Trace

__all__ = [
    "WorkloadStats",
    "NextLayerPredictability",
    "compute_stats",
    "expert_frequency",
    "gate_mass",
    "coactivation_counts",
    "transition_counts",
    "routing_entropy_bits",
    "previous_token_overlap",
    "segment_best_hit_rate",
    "next_layer_predictability",
    "default_cache_sizes",
]

# Pair entries (token, layer, rank, rank) counted per bincount call; bounds temporary memory.
_PAIR_CHUNK = 8_000_000


def _layer_index(shape: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.arange(shape[1])[None, :, None], shape)


def expert_frequency(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, E]`` int64: how many tokens chose expert ``e`` at layer ``l`` (any rank)."""
    ids = np.asarray(expert_ids)
    T, L, K = ids.shape
    flat = (_layer_index(ids.shape).astype(np.int64) * num_experts + ids).ravel()
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)


def gate_mass(expert_ids: np.ndarray, gate_weights: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, E]`` float64: the sum of router weights routed to each expert (unit: weight)."""
    ids = np.asarray(expert_ids)
    T, L, K = ids.shape
    flat = (_layer_index(ids.shape).astype(np.int64) * num_experts + ids).ravel()
    weights = np.asarray(gate_weights, np.float64).ravel()
    return np.bincount(flat, weights=weights, minlength=L * num_experts).reshape(L, num_experts)


def _pair_counts(a: np.ndarray, b: np.ndarray, num_experts: int) -> np.ndarray:
    """``[G, E, E]`` counts of (a[t, g, i], b[t, g, j]) over tokens t and all rank pairs i, j.

    ``a``, ``b``: ``[T, G, Ka]`` and ``[T, G, Kb]`` expert ids.
    """
    T, G, Ka = a.shape
    Kb = b.shape[2]
    E = num_experts
    out = np.zeros(G * E * E, np.int64)
    group = (np.arange(G, dtype=np.int64) * E * E)[None, :, None, None]
    chunk = max(1, _PAIR_CHUNK // max(1, G * Ka * Kb))
    for t0 in range(0, T, chunk):
        ai = a[t0:t0 + chunk].astype(np.int64)[:, :, :, None]
        bj = b[t0:t0 + chunk].astype(np.int64)[:, :, None, :]
        out += np.bincount((group + ai * E + bj).ravel(), minlength=G * E * E)
    return out.reshape(G, E, E)


def coactivation_counts(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, E, E]`` int64: tokens that chose both ``i`` and ``j`` at layer ``l``.

    Symmetric; the diagonal is the expert frequency (a token picks an expert at most once).
    """
    ids = np.asarray(expert_ids)
    return _pair_counts(ids, ids, num_experts)


def transition_counts(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L-1, E, E]`` int64: tokens that chose ``i`` at layer ``l`` and ``j`` at layer ``l+1``.

    All K x K rank pairs count, so each token adds K² to each layer pair.
    """
    ids = np.asarray(expert_ids)
    if ids.shape[1] < 2:
        return np.zeros((0, num_experts, num_experts), np.int64)
    return _pair_counts(ids[:, :-1], ids[:, 1:], num_experts)


def routing_entropy_bits(frequency: np.ndarray) -> np.ndarray:
    """``[L]`` Shannon entropy (bits) of each layer's load distribution ``f[l] / sum f[l]``.

    ``log2(E)`` is a perfectly balanced layer; ``log2(K)`` the most concentrated a top-K
    router can be.
    """
    f = np.asarray(frequency, np.float64)
    total = f.sum(axis=1, keepdims=True)
    p = np.divide(f, total, out=np.zeros_like(f), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=1)


def previous_token_overlap(expert_ids: np.ndarray, seq_lens: np.ndarray | None = None) -> np.ndarray:
    """``[L]`` share of a token's experts also used by the previous token of its sequence.

    The first token of every sequence has no predecessor and is left out.
    """
    ids = np.asarray(expert_ids)
    T, L, K = ids.shape
    if T < 2:
        return np.zeros(L)
    keep = np.ones(T - 1, bool)  # pairs (t-1, t)
    if seq_lens is not None and len(seq_lens) > 1:
        starts = np.cumsum(np.asarray(seq_lens, np.int64))[:-1]
        keep[starts - 1] = False
    cur, prev = ids[1:][keep], ids[:-1][keep]  # [N, L, K]
    shared = (cur[:, :, :, None] == prev[:, :, None, :]).any(axis=3).sum(axis=(0, 2))
    return shared / max(1, cur.shape[0] * K)


def segment_best_hit_rate(expert_ids: np.ndarray, num_experts: int, segment_len: int,
                          seq_lens: np.ndarray | None = None) -> np.ndarray:
    """Segment cache best hit rate (SCH) for every cache size: ``[L, E + 1]``.

    Sequences are cut into segments of ``segment_len`` consecutive tokens (the last one of
    a sequence may be shorter). Within a segment, the best a cache of ``c`` slots that may
    be refilled only between segments can do is to hold the segment's ``c`` most used
    experts; the rate is their share of the segment's accesses, pooled over segments
    (so every access weighs the same).

    Args:
        expert_ids: ``[T, L, K]``.
        num_experts: E.
        segment_len: tokens per segment, >= 1.
        seq_lens: ``[S]``; ``None`` treats the trace as one sequence.
    """
    if segment_len < 1:
        raise InputError("segment length must be at least 1 token", key="segment_len", value=segment_len,
                         expected="an integer >= 1", fix="pass e.g. 16")
    ids = np.asarray(expert_ids)
    T, L, K = ids.shape
    E = num_experts
    lens = np.asarray(seq_lens if seq_lens is not None else [T], np.int64)
    pos_in_seq = np.arange(T) - np.repeat(np.cumsum(lens) - lens, lens)
    new_segment = (pos_in_seq % segment_len) == 0
    segment = np.cumsum(new_segment) - 1  # [T] segment index of each token
    n_seg = int(segment[-1]) + 1 if T else 0
    hits = np.zeros((L, E + 1))
    chunk = max(1, 2_000_000 // max(1, L * E))  # segments per block
    for s0 in range(0, n_seg, chunk):
        s1 = min(n_seg, s0 + chunk)
        rows = (segment >= s0) & (segment < s1)
        seg = (segment[rows] - s0).astype(np.int64)[:, None, None]
        flat = ((seg * L + _layer_index((int(rows.sum()), L, K))) * E + ids[rows]).ravel()
        counts = np.bincount(flat, minlength=(s1 - s0) * L * E).reshape(s1 - s0, L, E)
        top = -np.sort(-counts, axis=2)  # per segment and layer, most used first
        hits[:, 1:] += np.cumsum(top, axis=2).sum(axis=0)
    return hits / max(1, T * K)


@dataclass(frozen=True)
class NextLayerPredictability:
    """How well layer ``l``'s experts predict layer ``l+1``'s, on held-out tokens.

    Attributes:
        recall: ``[L-1]`` mean share of a token's K experts at ``l+1`` that are among the
            ``top_k`` experts predicted from its experts at ``l``.
        baseline_recall: ``[L-1]`` the same for a prediction that ignores the token: the
            ``top_k`` most frequent experts of layer ``l+1`` in the training split.
        top_k: experts predicted per token and layer.
        train_tokens, test_tokens: split sizes.
    """

    recall: np.ndarray
    baseline_recall: np.ndarray
    top_k: int
    train_tokens: int
    test_tokens: int


def _split(num_tokens: int, seq_lens: np.ndarray | None, train_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Boolean token masks (train, test): whole sequences, the first ones for training."""
    lens = np.asarray(seq_lens if seq_lens is not None else [num_tokens], np.int64)
    train = np.zeros(num_tokens, bool)
    if len(lens) >= 2:
        n_train = min(len(lens) - 1, max(1, int(round(train_fraction * len(lens)))))
        train[: int(lens[:n_train].sum())] = True
    else:  # one sequence: split it in time
        train[: int(round(train_fraction * num_tokens))] = True
    return train, ~train


def next_layer_predictability(expert_ids: np.ndarray, num_experts: int, *, seq_lens: np.ndarray | None = None,
                              top_k: int | None = None, train_fraction: float = 0.5) -> NextLayerPredictability:
    """Recall of a next-layer expert predictor built from transition counts.

    1. Count transitions ``M[l, i, j]`` (:func:`transition_counts`) on the training split:
       the first ``round(train_fraction * S)`` sequences (a single sequence is split in time).
    2. For each held-out token, score layer ``l+1``'s experts by the sum of the rows of
       ``M[l]`` for its K experts at layer ``l``; predict the ``top_k`` best (ties go to the
       expert more frequent at ``l+1`` in training, then to the lower id).
    3. Recall = predicted ∩ actual / K, averaged over held-out tokens.

    Args:
        expert_ids: ``[T, L, K]``.
        num_experts: E.
        seq_lens: ``[S]``, or ``None`` for one sequence.
        top_k: experts predicted; defaults to K (prefetching as many as will be used).
        train_fraction: share of sequences used for the counts, in (0, 1).
    """
    ids = np.asarray(expert_ids).astype(np.int64)
    T, L, K = ids.shape
    E = num_experts
    k_pred = K if top_k is None else int(top_k)
    if not 0 < train_fraction < 1:
        raise InputError("train fraction must be in (0, 1)", key="train_fraction", value=train_fraction,
                         expected="e.g. 0.5", fix="pass a share of the sequences")
    if not 1 <= k_pred <= E:
        raise InputError("predicted experts out of range", key="top_k", value=k_pred, expected=f"1..{E}",
                         fix="predict between 1 and E experts")
    train, test = _split(T, seq_lens, train_fraction)
    if L < 2 or not train.any() or not test.any():
        return NextLayerPredictability(np.zeros(max(0, L - 1)), np.zeros(max(0, L - 1)), k_pred,
                                       int(train.sum()), int(test.sum()))
    M = transition_counts(ids[train], E)  # [L-1, E, E]
    freq = expert_frequency(ids[train], E)  # [L, E]
    recall = np.zeros(L - 1)
    baseline = np.zeros(L - 1)
    te = ids[test]
    for layer in range(L - 1):
        # score * (F+1) + frequency: the frequency only breaks ties between equal scores
        tie = freq[layer + 1]
        score = M[layer][te[:, layer, :]].sum(axis=1) * (int(tie.max()) + 1) + tie  # [N, E]
        # the k best by score, among exact ties the lower expert ids (a stable sort's first k):
        # the id folded into the key makes every key distinct, so a partition finds that set
        key = score * E + (E - 1 - np.arange(E))
        pred = np.argpartition(-key, k_pred - 1, axis=1)[:, :k_pred]  # [N, k], as a set
        actual = te[:, layer + 1, :]
        recall[layer] = (pred[:, :, None] == actual[:, None, :]).any(axis=1).sum() / actual.size
        popular = np.argsort(-tie, kind="stable")[:k_pred]
        baseline[layer] = np.isin(actual, popular).sum() / actual.size
    return NextLayerPredictability(recall, baseline, k_pred, int(train.sum()), int(test.sum()))


def default_cache_sizes(top_k: int, num_experts: int) -> list[int]:
    """K, 2K, 4K and E/2 slots (6, 12, 24, 32 for DeepSeek-V2-Lite), capped at E."""
    sizes = {min(num_experts, s) for s in (top_k, 2 * top_k, 4 * top_k, num_experts // 2) if s > 0}
    return sorted(sizes)


@dataclass(frozen=True, eq=False)
class WorkloadStats:
    """Everything :func:`compute_stats` derives from one trace.

    Attributes:
        num_tokens, num_layers, top_k, num_experts: T, L, K, E.
        layer_map: ``[L]`` hidden-layer index of each MoE layer.
        frequency: ``[L, E]`` int64 selections per expert (all ranks).
        gate_mass: ``[L, E]`` float64 summed router weight, or ``None`` without weights.
        coactivation: ``[L, E, E]`` int64 tokens choosing both experts.
        transitions: ``[L-1, E, E]`` int64 (expert at l, expert at l+1) over all rank pairs.
        entropy_bits: ``[L]`` entropy of each layer's load distribution.
        previous_token_overlap: ``[L]`` share of experts reused from the previous token.
        hit_rates: LRU / LFU / static / Belady curves (:class:`HitRateCurves`).
        segment_len: tokens per segment of ``segment_hit_rate``.
        segment_hit_rate: ``[L, E + 1]`` segment cache best hit rate.
        predictability: next-layer predictor recall on held-out sequences.
        model, source: copied from the trace.
    """

    num_tokens: int
    num_layers: int
    top_k: int
    num_experts: int
    layer_map: tuple[int, ...]
    frequency: np.ndarray
    gate_mass: np.ndarray | None
    coactivation: np.ndarray
    transitions: np.ndarray
    entropy_bits: np.ndarray
    previous_token_overlap: np.ndarray
    hit_rates: HitRateCurves
    segment_len: int
    segment_hit_rate: np.ndarray
    predictability: NextLayerPredictability
    model: str = ""
    source: str = ""

    def summary(self, cache_sizes: Sequence[int]) -> dict[str, Any]:
        """A JSON-ready digest: per-layer figures at ``cache_sizes`` and layer means."""
        sizes = [int(c) for c in cache_sizes]
        per_layer = []
        for layer in range(self.num_layers):
            row: dict[str, Any] = {
                "moe_layer": layer,
                "hidden_layer": int(self.layer_map[layer]),
                "entropy_bits": float(self.entropy_bits[layer]),
                "top_expert_share": float(self.frequency[layer].max() / max(1, self.frequency[layer].sum())),
                "previous_token_overlap": float(self.previous_token_overlap[layer]),
                "next_layer_recall": (float(self.predictability.recall[layer])
                                      if layer < len(self.predictability.recall) else None),
            }
            for policy in self.hit_rates.curves:
                row[policy] = {str(c): float(self.hit_rates.at(policy, c)[layer]) for c in sizes}
            row["segment_best"] = {str(c): float(self.segment_hit_rate[layer, min(c, self.num_experts)])
                                   for c in sizes}
            per_layer.append(row)
        means: dict[str, Any] = {p: {str(c): self.hit_rates.mean(p, c) for c in sizes} for p in self.hit_rates.curves}
        means["segment_best"] = {str(c): float(self.segment_hit_rate[:, min(c, self.num_experts)].mean())
                                 for c in sizes}
        return {
            "model": self.model, "source": self.source, "tokens": self.num_tokens, "moe_layers": self.num_layers,
            "top_k": self.top_k, "experts": self.num_experts, "cache_sizes": sizes,
            "conventions": {"token_as_set": self.hit_rates.token_as_set,
                            "reset_per_sequence": self.hit_rates.reset_per_sequence,
                            "segment_len": self.segment_len, "predictor_top_k": self.predictability.top_k,
                            "predictor_train_tokens": self.predictability.train_tokens,
                            "predictor_test_tokens": self.predictability.test_tokens},
            "mean_over_layers": {
                **means,
                "entropy_bits": float(self.entropy_bits.mean()),
                "previous_token_overlap": float(self.previous_token_overlap.mean()),
                "next_layer_recall": float(self.predictability.recall.mean()) if self.num_layers > 1 else None,
                "next_layer_baseline_recall": (float(self.predictability.baseline_recall.mean())
                                               if self.num_layers > 1 else None),
            },
            "layers": per_layer,
        }


def compute_stats(trace: Trace, *, policies: Sequence[str] = POLICIES, token_as_set: bool = False,
                  reset_per_sequence: bool = False, segment_len: int = 16, predictor_top_k: int | None = None,
                  train_fraction: float = 0.5) -> WorkloadStats:
    """All statistics of ``trace`` (see :class:`WorkloadStats`).

    Args:
        trace: the routing trace.
        policies: hit-rate curves to compute (``lru``, ``lfu``, ``static``, ``belady``).
        token_as_set, reset_per_sequence: cache conventions (:mod:`profiles.workload.hitrate`).
        segment_len: tokens per segment for the segment best hit rate.
        predictor_top_k: experts predicted per token for next-layer predictability (K).
        train_fraction: share of sequences that build the predictor.
    """
    ids, E = trace.expert_ids, trace.num_experts
    freq = expert_frequency(ids, E)
    return WorkloadStats(
        num_tokens=trace.num_tokens, num_layers=trace.num_layers, top_k=trace.top_k, num_experts=E,
        layer_map=tuple(trace.layer_map), frequency=freq,
        gate_mass=None if trace.gate_weights is None else gate_mass(ids, trace.gate_weights, E),
        coactivation=coactivation_counts(ids, E), transitions=transition_counts(ids, E),
        entropy_bits=routing_entropy_bits(freq),
        previous_token_overlap=previous_token_overlap(ids, trace.seq_lens),
        hit_rates=hit_rate_curves(trace, policies, token_as_set=token_as_set, reset_per_sequence=reset_per_sequence),
        segment_len=segment_len, segment_hit_rate=segment_best_hit_rate(ids, E, segment_len, trace.seq_lens),
        predictability=next_layer_predictability(ids, E, seq_lens=trace.seq_lens, top_k=predictor_top_k,
                                                 train_fraction=train_fraction),
        model=trace.model, source=trace.source,
    )
