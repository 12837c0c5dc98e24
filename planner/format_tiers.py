"""Per-expert formats within a layer: a tier of the tail's most sensitive experts at a wider format.

Legend: E = routed experts per layer, N = options of a layer, b = storage format.

A placement option (:mod:`planner.costs`) puts frequency ranks ``[0, p)`` on the device at
``b_res``, ranks ``[p, q)`` through the cache at ``b_off`` and the tail ``[q, E)`` on the CPU
where it lives at ``b_off``. Where an expert is placed follows its frequency (that is what
time depends on); how much its quantisation costs follows its importance, frequency x gate x
its *measured* error, which frequency need not predict: a cold expert can be ten times as
sensitive as a hot one. A **tier** ``(k, b_up)`` therefore adds, to an option with a tail,
the ``k`` tail experts of greatest error gain

    gain_e = w_e (err_e(b_off) - err_e(b_up))        (w_e = frequency x mean gate weight)

stored at ``b_up`` (wider than ``b_off``) instead: a count vector over formats for the tail
(``E - q - k`` at ``b_off``, ``k`` at ``b_up``) assigned in importance order, and a layer may
then hold three formats (``b_res``, ``b_off``, ``b_up``). For fixed counts that order is
the least error: every tail expert costs the same bytes at a format, so taking the k
largest gains is exact for the error, and the time of the chosen set is priced exactly
(:func:`planner.costs.option_costs` counts each token's upgraded tail experts, whose CPU
calls take ``b_up``'s seconds). The tier goes to the tail only: the band shares cache slots
of one format (``cache_format``), and the tail runs where it lives, so a wider tail expert
changes the host bytes, the CPU's seconds and the error, never the cache or a site.

Where the rank structure is exact no tier is offered: when a layer's experts share one
error per format (the constants of ``QUANT_ERROR``, or a measurement that does not tell
them apart), gain_e is w_e times one number, so the most important experts are the most
frequent ones (up to their gate weights) and the options' ranks already give them the wider
formats; the plans are then those of the rank structure alone. Tiers exist for what
measured error adds: an expert more (or less) sensitive than its rank says. ``k`` runs over
powers of two up to the tail's experts with a positive gain, at most :data:`MAX_TIER` (and
that count itself), as p and q run over a grid; tiers are offered on the options on their
layer's front without them (:func:`planner.ilp_model.build_problem`), for either prefetch
setting. Both are restrictions of the option set, as the rank grid is: the bound and gap
a solve reports are over the options offered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .costs import Setup

__all__ = ["MAX_TIER", "tier_rows", "tier_masks", "offers_tiers", "gain_order"]

# The most experts a tier holds. A tier is for the few experts more sensitive than their rank
# says; a tail that needs a wider format wholesale takes it as b_off. Without the cap the
# powers of two run to the tail's size, and on DeepSeek-V3 (desktop-4090, int4 budget,
# lognormal per-expert errors) the options near-duplicate each other: the MIP's node budget
# ran out at a 1.1% gap after 103 CPU-s; with it the gap closed in 19 CPU-s, to a plan 0.03% slower.
MAX_TIER = 16


def offers_tiers(s: "Setup", layer: int) -> bool:
    """Whether ``layer``'s experts differ in measured error (else the rank structure is exact),
    and the engine can run a layer whose experts differ in format."""
    if s.expert_error is None:
        return False
    if s.engine is not None and s.engine.profile.placement != "expert":
        return False  # a layer's experts share one tensor, so one format
    if s.fixes is not None and s.fixes.expert_format:
        return False  # every expert at the fixed format
    return any(np.ptp(s.expert_error[fm][layer]) > 0 for fm in s.formats if fm in s.expert_error)


def gain_order(s: "Setup", layer: int, b_off: int, b_up: int) -> tuple[np.ndarray, np.ndarray]:
    """``(order, gain)``: frequency ranks by descending gain of moving ``b_off -> b_up``
    (ties: the colder rank first, whose wider calls cost the least), and ``[E]`` the gain by rank."""
    st = s.stats
    by_rank = st.order[layer]
    w = st.importance[layer][by_rank]
    gain = w * (s.errors_of(layer, s.formats[b_off])[by_rank] - s.errors_of(layer, s.formats[b_up])[by_rank])
    E = len(gain)
    order = np.lexsort((-np.arange(E), -gain))
    return order, gain


def tier_masks(s: "Setup", layer: int, q: np.ndarray, k: np.ndarray, b_off: np.ndarray,
               b_up: np.ndarray) -> np.ndarray:
    """``[N, E]`` by frequency rank, whether each option's tier holds the rank: the ``k`` ranks
    of the tail ``[q, E)`` with the greatest gain (none where ``k == 0``)."""
    E = s.stats.num_experts
    out = np.zeros((len(q), E), bool)
    rows = np.flatnonzero(k > 0)
    if not len(rows):
        return out
    pairs = np.unique(np.stack([b_off[rows], b_up[rows]], axis=1), axis=0)
    for bo, bu in pairs:
        order, _ = gain_order(s, layer, int(bo), int(bu))
        mine = rows[(b_off[rows] == bo) & (b_up[rows] == bu)]
        sets, which = np.unique(np.stack([q[mine], k[mine]], axis=1), axis=0, return_inverse=True)
        for g, (qq, kk) in enumerate(sets):
            mask = np.zeros(E, bool)
            mask[order[order >= qq][:kk]] = True
            out[mine[which.ravel() == g]] = mask
    return out


def tier_rows(s: "Setup", layer: int, specs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Options with a tier: ``(rows, tiers)``, ``rows`` indexing ``specs`` (``[N, 7]``,
    SPEC_COLUMNS) and ``tiers`` ``[n, 2]`` ``(k, b_up)``, for every option with a tail on the
    CPU, every format wider than its ``b_off`` that the CPU runs, every ``k`` of the grid."""
    if not len(specs) or not offers_tiers(s, layer):
        return np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
    E = s.stats.num_experts
    q, bo = specs[:, 1], specs[:, 4]
    eb = np.array([s.expert_bytes(fm) for fm in s.formats])
    runs_cpu = np.array([s.runs(s.host, fm) for fm in s.formats])
    out_rows, out_tiers = [], []
    for j in np.unique(bo):
        for u in np.flatnonzero((eb > eb[j]) & runs_cpu):
            order, gain = gain_order(s, layer, int(j), int(u))
            positive = gain > 0
            for qq in np.unique(q[(bo == j) & (q < E)]):
                n = int(positive[qq:].sum())  # tail experts an upgrade helps
                n = min(n, MAX_TIER)
                ks = sorted({2 ** i for i in range(max(n, 1).bit_length()) if 2 ** i <= n} | ({n} if n else set()))
                rows = np.flatnonzero((bo == j) & (q == qq))
                for kk in ks:
                    out_rows.append(rows)
                    out_tiers.append(np.tile([kk, u], (len(rows), 1)))
    if not out_rows:
        return np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
    return np.concatenate(out_rows), np.concatenate(out_tiers).astype(np.int64)
