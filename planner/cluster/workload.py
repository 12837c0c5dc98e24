"""The workload as an expert-parallel placer sees it: token counts per expert, transitions
between consecutive layers, the load unseen tokens are expected to bring, and DeepSeek's
group-limited routing imposed on a trace that lacks it.

Shape legend: S = sequences, L = MoE layers, E = routed experts, T = tokens, K = top-k,
B = bootstrap draws.
"""

from __future__ import annotations

import numpy as np

from profiles.workload.stats import expert_frequency, transition_counts
from profiles.workload.trace import Trace

__all__ = ["LOAD_RESAMPLES", "PRIOR_TOKENS", "expected_load", "group_limited", "sequence_loads", "workload_arrays"]

# Weight of plain popularity against the previous layer's transitions in a group-limited redraw.
_REDRAW_SMOOTHING = 0.05
# Expected load (planning for unseen tokens, not the sample): bootstrap draws of the sequences
# and a Dirichlet prior of this many pseudo-tokens per layer spread over the experts.
LOAD_RESAMPLES = 32
PRIOR_TOKENS = 256.0


def group_limited(trace: Trace, n_group: int, topk_group: int, *, num_experts: int | None = None,
                  seed: int = 0) -> Trace:
    """``trace`` with DeepSeek group-limited routing imposed: per token and layer, only the
    ``topk_group`` groups with the largest sum of their top-2 gate weights keep their
    experts; a choice in any other group is redrawn from the kept groups, in proportion to
    how often the token's (limited) experts at the previous layer are followed by it in the
    original trace (plus a little popularity), so the redraw keeps the inter-layer affinity
    a router's scores would have.

    Groups are contiguous id ranges of ``E / n_group`` experts (DeepSeek's layout). A token
    already within ``topk_group`` groups keeps all its choices, so a trace recorded from a
    group-limited model is returned unchanged. Ids ``>= num_experts`` (zero-computation
    experts) are left alone.
    """
    E = trace.num_experts if num_experts is None else int(num_experts)
    if n_group <= 1 or topk_group >= n_group or E % n_group:
        return trace
    gs = E // n_group
    ids = trace.expert_ids.astype(np.int64).copy()  # [T, L, K]
    T, L, K = ids.shape
    if topk_group * gs < K:
        return trace
    gates = (trace.gate_weights.astype(np.float64) if trace.gate_weights is not None
             else np.broadcast_to(1.0 / (1.0 + np.arange(K)), ids.shape))
    freq = expert_frequency(ids, trace.num_experts)[:, :E].astype(float)  # [L, E]
    after = np.zeros((max(L - 1, 0), E + 1, E), np.float32)  # [L-1, E + 1, E], before the limit; row E: zero experts
    after[:, :E, :] = transition_counts(ids, trace.num_experts)[:, :E, :E]
    rng = np.random.default_rng(seed)
    rows = np.arange(T)[:, None]
    before = np.tril(np.ones((K, K), bool), -1)  # [k, j]: j ranks before k
    changed = 0
    for l in range(L):
        idl, g = ids[:, l, :], gates[:, l, :]  # [T, K]
        real = idl < E
        grp = np.where(real, idl // gs, n_group)  # zero experts: a dummy group
        # gates are stored in descending order, so a group's first two entries are its top-2
        same = grp[:, :, None] == grp[:, None, :]  # [T, k, j]
        occurrence = (same & before[None]).sum(-1)  # [T, K]
        score = np.zeros((T, n_group + 1))
        np.add.at(score, (np.broadcast_to(rows, grp.shape), grp), np.where(occurrence < 2, g, 0.0))
        score[:, n_group] = -np.inf
        keep_rank = np.argsort(-score[:, :n_group], axis=1, kind="stable")[:, :topk_group]  # [T, topk_group]
        kept = np.zeros((T, n_group + 1), bool)
        kept[rows, keep_rank] = True
        kept[:, n_group] = True
        drop = real & ~kept[rows, grp]  # [T, K]
        if not drop.any():
            continue
        need = np.flatnonzero(drop.any(axis=1))  # tokens with a choice to redraw
        sub_ids, sub_drop = idl[need], drop[need]
        allowed = kept[need][:, np.arange(E) // gs]  # [T', E]
        sub_rows = np.broadcast_to(np.arange(len(need))[:, None], sub_ids.shape)
        allowed[sub_rows[sub_ids < E], sub_ids[sub_ids < E]] = False
        share = np.broadcast_to(freq[l] / max(freq[l].sum(), 1.0), (len(need), E))
        if l > 0:
            # follow the token's experts at the previous layer, as its router scores would
            prev = np.minimum(ids[need, l - 1, :], E)  # [T', K], already group-limited; E: a zero expert
            follow = np.zeros((len(need), E), np.float32)  # [T', E]
            for k in range(K):
                follow += after[l - 1][prev[:, k]]
            total = follow.sum(1, keepdims=True)
            share = np.divide(follow, total, out=np.zeros_like(follow), where=total > 0) + _REDRAW_SMOOTHING * share
        u = rng.random((len(need), E), dtype=np.float32)
        key = np.log(share.astype(np.float32) + 1e-12) - np.log(-np.log(np.maximum(u, 1e-30)))  # Gumbel race
        key[~allowed] = -np.inf
        top = np.argpartition(-key, K - 1, axis=1)[:, :K]  # K best keys, unordered
        pick = np.take_along_axis(top, np.argsort(-np.take_along_axis(key, top, 1), axis=1, kind="stable"), 1)
        nth = np.cumsum(sub_drop, axis=1) - 1
        sub_ids[sub_drop] = pick[sub_rows[sub_drop], nth[sub_drop]]
        idl[need] = sub_ids
        changed += int(drop.sum())
    meta = dict(trace.meta)
    meta["group_limited"] = {"n_group": n_group, "topk_group": topk_group, "redrawn_choices": changed, "seed": seed}
    return Trace(expert_ids=ids.astype(trace.expert_ids.dtype), seq_lens=trace.seq_lens, phase=trace.phase,
                 num_experts=trace.num_experts, layer_map=trace.layer_map, gate_weights=trace.gate_weights,
                 model=trace.model, source=f"{trace.source} (group-limited: {topk_group} of {n_group} groups)",
                 meta=meta)


def workload_arrays(trace: Trace, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """``(load [L, E], transitions [L-1, E, E])`` as float token counts, routed experts only."""
    E_all = trace.num_experts
    load = expert_frequency(trace.expert_ids, E_all)[:, :num_experts].astype(float)
    trans = transition_counts(trace.expert_ids, E_all)[:, :num_experts, :num_experts].astype(float)
    return load, trans


def sequence_loads(trace: Trace, num_experts: int) -> np.ndarray:
    """``[S, L, E]`` tokens per expert of every sequence (routed experts only): the unit a
    bootstrap resamples, since one sequence's tokens pick the same experts again and again."""
    ids = np.asarray(trace.expert_ids, np.int64)  # [T, L, K]
    T, L, K = ids.shape
    S = len(trace.seq_lens)
    seq = np.repeat(np.arange(S), trace.seq_lens)  # [T]
    flat = (seq[:, None, None] * L + np.arange(L)[None, :, None]) * (num_experts + 1) + np.minimum(ids, num_experts)
    counts = np.bincount(flat.ravel(), minlength=S * L * (num_experts + 1)).reshape(S, L, num_experts + 1)
    return counts[..., :num_experts].astype(float)


def expected_load(seq_load: np.ndarray, *, resamples: int = LOAD_RESAMPLES, prior_tokens: float = PRIOR_TOKENS,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The load to plan for, not the sample's: ``(expected [L, E], samples [B, L, E])``.

    ``expected`` is the posterior mean of a symmetric Dirichlet over each layer's expert shares
    (``prior_tokens`` pseudo-tokens spread evenly over the E experts), in the sample's token
    count; ``samples`` are ``resamples`` bootstrap draws of the sequences (with replacement,
    seeded), each smoothed the same way: the spread of the load a new workload of this size
    could bring. Both sum per layer to the sample's tokens.

    Args:
        seq_load: ``[S, L, E]`` from :func:`sequence_loads`.
        resamples: B, bootstrap draws.
        prior_tokens: Dirichlet pseudo-tokens per layer (0: the raw counts).
        seed: seed of the draws.
    """
    S, L, E = seq_load.shape
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(S, np.full(S, 1.0 / S), size=resamples).astype(float)  # [B, S]
    total = seq_load.sum(0)  # [L, E]
    samples = (weights @ seq_load.reshape(S, -1)).reshape(resamples, L, E)

    def smooth(x: np.ndarray) -> np.ndarray:
        n = x.sum(-1, keepdims=True)
        return (x + prior_tokens / E) * (n / np.maximum(n + prior_tokens, 1e-12))

    return smooth(total), smooth(samples)
