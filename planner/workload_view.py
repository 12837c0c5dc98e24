"""The planner's view of a workload: per-layer frequency, importance, hit-rate curves of every
band of frequency ranks, per-token cache outcomes and next-layer predictability.

Legend: T = tokens, L = MoE layers, K = top-k, E = routed experts, P = rank grid points (resident counts p, split ranks q).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
from dataclasses import dataclass, field

import numpy as np

from profiles.workload.hitrate import lru_band_distances
from profiles.workload.stats import next_layer_predictability
from profiles.workload.trace import DECODE, Trace

__all__ = ["PlanningStats", "decode_steps", "planning_stats", "step_stream"]


@dataclass(frozen=True, eq=False)
class PlanningStats:
    """What the planner needs from a workload, per MoE layer.

    Experts are addressed by frequency rank (rank 0 = the most frequent of its layer): the
    planner makes the top ranks resident, sends a band of ranks through the cache and runs
    the rest where they live, so experts of equal rank statistics are interchangeable.

    Attributes:
        frequency: ``[L, E]`` activations per token (each row sums to the real top-k).
        importance: ``[L, E]`` frequency x mean gate weight (the quality weight).
        pinned_grid: ``[P]`` rank edges (0 and E included) at which hit rates were measured:
            the resident count p and the split rank q of the planner's options.
        hit: ``[L, P, P, E + 1]`` ``hit[l, i, j, c]``: LRU hit rate of a ``c``-slot cache that
            serves only the accesses to ranks ``[grid[i], grid[j])`` (0 unless ``i < j``;
            token-level, requests back to back). ``j = P - 1``: every expert outside the top-p.
        predictability: ``[L]`` recall of predicting layer l's experts from layer l-1's (0 for l = 0).
        order: ``[L, E]`` experts of each layer by descending frequency (ties: lower id first).
        source: where the statistics came from.
        access_rank: ``[T', L, K]`` frequency rank of every access's expert (-1: zero-computation).
        access_below: ``[T', L, K, P]`` per access, the experts of rank ``< grid[g]`` used more
            recently (:func:`profiles.workload.hitrate.lru_band_distances`): the LRU stack
            distance in the band ``[grid[i], grid[j])`` is ``below[..., j] - below[..., i]``.
        access_warm: ``[T', L, K]`` the access's expert was used before (else a miss at any size).
    """

    frequency: np.ndarray
    importance: np.ndarray
    pinned_grid: np.ndarray
    hit: np.ndarray
    predictability: np.ndarray
    order: np.ndarray
    source: str = ""
    access_rank: np.ndarray | None = None
    access_below: np.ndarray | None = None
    access_warm: np.ndarray | None = None
    seq_lens: np.ndarray | None = None  # [S'] sequences of the rows access_* describe
    decode_rows: np.ndarray | None = None  # [T'] bool: the row is a decode token (else prompt)
    batch: int = 1  # the hit rates are per expert call in steps of this many sequences (at_batch)
    access_hit: np.ndarray | None = None  # at batch > 1: the per-access hit rates (batch 1's hit)
    step_active: np.ndarray | None = None  # at batch > 1: [S, L, E] bool, decode step s uses rank e (at_batch)
    _histograms: dict = field(default_factory=dict, repr=False)
    _at_batch: dict = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int:
        return int(self.frequency.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.frequency.shape[1])

    def _bands(self, pinned: np.ndarray, split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grid indices ``(i, j)`` of the measured bands around ``[pinned, split)``: the grid
        point at or below ``pinned`` and the one at or above ``split`` (the measured band
        holds the real one, so its distances are no shorter: hits are never overstated)."""
        grid = self.pinned_grid
        i = np.maximum(np.searchsorted(grid, pinned, side="right") - 1, 0)
        j = np.minimum(np.searchsorted(grid, split, side="left"), len(grid) - 1)
        return i, j

    def token_outcomes(self, layer: int, pinned: int, slots: int, split: int | None = None
                       ) -> tuple[np.ndarray, ...]:
        """The distinct per-token outcomes at ``layer`` and their shares, when the top-``pinned``
        experts are resident, ``slots`` LRU slots serve ranks ``[pinned, split)`` and ranks
        ``[split, E)`` run where they live (``split`` None: E, no such experts).

        Returns ``(n_res, n_hit, n_miss, n_local, share)``, five ``[N]`` arrays: how many of a
        token's experts are resident, hit the cache, miss it and run locally
        (zero-computation experts are none of these: they are free), and the share of
        tokens with that outcome. The counts are exact for any ``pinned`` and ``split``;
        hits are exact when both are grid points (else see :meth:`_bands`).
        """
        q = self.num_experts if split is None else int(split)
        key = (layer, int(pinned), int(slots), q)
        if key not in self._histograms:
            self._histograms[key] = self.outcome_table(layer, np.array([[pinned, slots, q]]))[1:]
        return self._histograms[key]

    def outcome_table(self, layer: int, keys: np.ndarray, up: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """:meth:`token_outcomes` of many ``keys`` (``[G, 3]`` rows ``(pinned, slots, split)``) at once.

        Returns ``(key, n_res, n_hit, n_miss, n_local, share)``, six ``[M]`` arrays: the
        distinct outcomes of every key, grouped by key in key order (``key`` indexes ``keys``),
        each key's outcomes in order of their counts (resident, hit, miss, local).
        With ``up`` (``[G, E]`` by frequency rank: each key's tier, planner.format_tiers) a
        seventh, ``n_up``: how many of the token's local experts are in the key's tier.

        Resident, band and local counts come from one prefix count per token (accesses of rank
        below v), so only the hits (and tier experts) are counted access by access; outcomes
        are tallied by ``bincount`` over the few cells a token's K accesses can fill (counts
        summing to at most K), which keeps their order: the answer of a sort and ``unique``,
        several times faster (DeepSeek-V3's option tables with tiers were most of its build).
        """
        keys = np.asarray(keys, np.int64).reshape(-1, 3)
        rank = self.access_rank[:, layer]  # [T', K]
        warm = self.access_warm[:, layer]  # [T', K]
        T, K = rank.shape
        E = self.num_experts
        small = np.int16 if E < 2 ** 15 - 1 else np.int64
        below = self.access_below[:, layer].astype(small)  # [T', K, P]
        r16 = rank.astype(small)
        real = rank >= 0
        n = K + 1
        cells_all, lut = _outcome_cells(K, up is not None)  # [D] the cells a token can fill; cell code -> index
        D = len(cells_all)
        # below[t, v]: token t's accesses of rank < v (zero-computation accesses are no rank)
        hist = np.bincount((np.arange(T)[:, None] * (E + 1) + np.where(real, rank, E)).ravel(),
                           minlength=T * (E + 1)).reshape(T, E + 1)
        lt = np.zeros((T, E + 2), np.int64)
        np.cumsum(hist, axis=1, out=lt[:, 1:])  # lt[:, v] = accesses with rank < v; lt[:, E + 1] all of them
        n_real = lt[:, E][:, None]  # [T', 1]
        out = []
        step = max(1, 2_000_000 // max(T * K, 1))  # keys per block: bounded [T', K, keys] temporaries
        for k0 in range(0, len(keys), step):
            blk = keys[k0:k0 + step]
            G = len(blk)
            i, j = self._bands(blk[:, 0], blk[:, 2])
            p, c, q = (v.astype(small)[None, None, :] for v in blk.T)  # [1, 1, G]
            dist = below[:, :, j] - below[:, :, i]  # [T', K, G] stack distance in the measured band
            r = r16[..., None]
            hit = ((r >= p) & (r < q) & (dist < c) & warm[..., None]).sum(axis=1)  # [T', G]
            n_res = lt[:, blk[:, 0]]
            n_q = lt[:, blk[:, 2]]
            cell = ((n_res * n + hit) * n + (n_q - n_res - hit)) * n + (n_real - n_q)  # [T', G]
            if up is not None:  # how many of each token's local accesses are in its key's tier
                tier = up[k0:k0 + step].T[np.where(real, rank, 0)] & real[..., None] & (r >= q)  # [T', K, G]
                cell = cell * n + tier.sum(axis=1)
            code = (np.arange(G)[None, :] * D + lut[cell]).ravel()  # [T' G] (key, outcome)
            counts = np.bincount(code, minlength=G * D)
            seen = np.flatnonzero(counts)
            cells = cells_all[seen % D]
            if up is not None:
                n_up, cells = cells % n, cells // n
            out.append((k0 + seen // D, cells // n ** 3, cells // n ** 2 % n, cells // n % n, cells % n,
                        counts[seen] / max(T, 1)) + ((n_up,) if up is not None else ()))
        if not out:
            return tuple(np.zeros(0, np.int64) for _ in range(6 + (up is not None)))
        return tuple(np.concatenate(col) for col in zip(*out))

    def hit_rate(self, layer: int, pinned: int, slots: int, split: int | None = None, *,
                 per_access: bool = False) -> float:
        """h(p, q, c): hit rate of the band ``[pinned, split)`` (``split`` None: E) with ``slots``
        slots; exact at grid points, linear in p between them (toward 0 at an empty band).
        At ``batch`` > 1 it is per expert call (see :meth:`at_batch`); ``per_access`` asks for
        the per-access rate (what the reported expert hit rate counts)."""
        c = min(max(int(slots), 0), self.num_experts)
        j = int(self._bands(pinned, self.num_experts if split is None else split)[1])
        grid = self.pinned_grid
        table = self.access_hit if per_access and self.access_hit is not None else self.hit
        return float(np.interp(pinned, grid[:j + 1], table[layer, :j + 1, j, c]))

    def _lanes(self, batch: int) -> np.ndarray:
        """``[S]`` the decode tokens of each decode step of :func:`step_stream` at ``batch``, in order."""
        step = decode_steps(self.access_rank.shape[0], self.seq_lens, batch, self.decode_rows)
        return np.unique(step[step >= 0], return_counts=True)[1]

    def _full_steps(self, steps: np.ndarray, rank: np.ndarray, batch: int) -> np.ndarray | None:
        """:func:`_step_active` of the decode steps that hold ``batch`` tokens; None where none do
        (no decode step, or fewer sequences than the batch in the rows these statistics keep:
        planning_stats' LRU pass keeps ~1000 of DeepSeek-V3's tokens, a few sequences, whose
        steps use far fewer experts than a step of 32; the max of averages prices those)."""
        if not len(steps):
            return None
        lanes = self._lanes(batch)
        return _step_active(steps, rank, lanes) if lanes.max(initial=0) >= batch else None

    def at_batch(self, batch: int) -> "PlanningStats":
        """These statistics for decode steps of ``batch`` sequences: the hit rates per expert call.

        At batch 1 every access is a call. In a step of B sequences an expert a step uses is
        called once, and only its first access in the step decides where that call runs (a
        hit on the device, or a miss fetched or run on the host); the step's later accesses
        to it mostly hit without saving anything. So the cache is replayed on the step
        stream: B lanes of continuous batching (each takes the next sequence when its own
        ends), a step the set of experts its B tokens use, each a call (:func:`step_stream`).
        The per-access table stays as ``access_hit``; token outcomes (batch 1 pricing) are
        unchanged. ``step_active`` keeps which ranks each decode step uses (at most
        ``max_steps``, evenly spaced), for the per-step max (:mod:`planner.step_max`). Cached per batch."""
        if batch <= 1 or self.access_rank is None or self.seq_lens is None:
            return self
        if batch not in self._at_batch:
            ids = np.where(self.access_rank >= 0,
                           self.order[np.arange(self.num_layers)[None, :, None], np.maximum(self.access_rank, 0)],
                           -1)  # [T', L, K] expert ids (-1: zero-computation)
            steps, rank, counted = step_stream(ids, self.seq_lens, batch, self.order, self.decode_rows)
            pad = rank.shape[1] - 1
            below, warm = lru_band_distances(steps, pad + 1, rank, self.pinned_grid, token_as_set=True)
            access_rank = np.where(counted[:, None, None], rank[np.arange(self.num_layers)[None, :, None], steps], -1)
            hit = _band_hit_rates(access_rank, below, warm, self.pinned_grid, self.num_experts)
            self._at_batch[batch] = dataclasses.replace(self, hit=hit, batch=batch, access_hit=self.hit,
                                                        step_active=self._full_steps(steps[counted], rank, batch),
                                                        _histograms={}, _at_batch={})
        return self._at_batch[batch]


def _step_active(steps: np.ndarray, rank: np.ndarray, lanes: np.ndarray, max_steps: int = 128) -> np.ndarray:
    """``[S, L, E]`` bool by frequency rank: the experts each full decode step uses (``steps``:
    ``[S', L, W]`` ids, :func:`step_stream`'s decode rows; ``lanes``: ``[S']`` each one's tokens),
    at most ``max_steps`` of them evenly spaced. Full: as many tokens as the fullest step (the
    batch, where the workload has enough sequences): the planner prices a step of B tokens, and
    the stream's last steps, with lanes run dry, use fewer experts (DeepSeek-V2-Lite at batch 32:
    48.4 distinct a layer over all steps, 54.0 in full ones, as the simulator's)."""
    steps = steps[lanes == lanes.max(initial=0)]
    S, L, _ = steps.shape
    E = rank.shape[1] - 1
    if S > max_steps:
        steps = steps[np.linspace(0, S - 1, max_steps).round().astype(np.int64)]
        S = max_steps
    active = np.zeros((S, L, E + 1), bool)
    r = rank[np.arange(L)[None, :, None], steps]  # [S, L, W] (-1: the phantom)
    s_i, l_i, w_i = np.nonzero(r >= 0)
    active[s_i, l_i, r[s_i, l_i, w_i]] = True
    return active[..., :E]


@functools.lru_cache(maxsize=8)
def _outcome_cells(K: int, tiered: bool) -> tuple[np.ndarray, np.ndarray]:
    """The cells of :meth:`PlanningStats.outcome_table` a token with ``K`` accesses can fill,
    in code order (``[D]`` codes ``((res n + hit) n + miss) n + local``, times n plus the tier
    count when ``tiered``, n = K + 1: counts summing to at most K, the tier count at most
    local), and ``[n^4 or n^5]`` each code's index among them (-1: no token fills it)."""
    n = K + 1
    a = np.indices((n,) * (5 if tiered else 4)).reshape(5 if tiered else 4, -1)  # digits of every code, in order
    ok = a[:4].sum(axis=0) <= K
    if tiered:
        ok &= a[4] <= a[3]
    lut = np.full(a.shape[1], -1, np.int64)
    lut[ok] = np.arange(int(ok.sum()))
    return np.flatnonzero(ok), lut

def _pinned_grid(E: int, points: int = 9) -> np.ndarray:
    grid = np.unique(np.round(np.linspace(0, E, points)).astype(int))
    return grid


def planning_stats(trace: Trace, *, real_experts: int | None = None, pinned_points: int = 9,
                   max_work: float = 1.2e8) -> PlanningStats:
    """Statistics of ``trace`` for planning (see :class:`PlanningStats`).

    ``real_experts`` (default: all of the trace's experts) is E; ids at or above it are
    zero-computation experts (MoE++ / LongCat-Flash null, copy, constant): no weights, no
    flops, present on every device, so their accesses are free and never touch a cache.

    The hit rates of every band of ranks come from one exact LRU pass
    (:func:`profiles.workload.hitrate.lru_band_distances`) costing about T·L·K·E steps; it
    runs on the first whole sequences holding at most ``max_work / (L·K·E)`` tokens (at
    least 500). Frequency and predictability use the whole trace.
    """
    ids = trace.expert_ids.astype(np.int64)  # [T, L, K]
    T, L, K = ids.shape
    E_all = trace.num_experts
    E = E_all if real_experts is None else int(real_experts)
    layer = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)
    counts = np.bincount((layer * E_all + ids).ravel(), minlength=L * E_all).reshape(L, E_all).astype(float)
    frequency = counts[:, :E] / max(T, 1)  # [L, E] real experts only
    if trace.gate_weights is not None:
        gsum = np.bincount((layer * E_all + ids).ravel(), weights=trace.gate_weights.astype(float).ravel(),
                           minlength=L * E_all).reshape(L, E_all)
        importance = gsum[:, :E] / max(T, 1)  # = frequency x mean gate weight
    else:
        importance = frequency / K
    order = np.argsort(-frequency, axis=1, kind="stable")  # [L, E]
    grid = _pinned_grid(E, pinned_points)
    max_tokens = max(500, int(max_work // (L * K * E)))
    short = trace if T <= max_tokens else _head(trace, max_tokens)
    sids = short.expert_ids.astype(np.int64)  # [T', L, K]
    rank_of = np.full((L, E_all), -1, np.int64)  # -1: a zero-computation expert (free, in no band)
    rank_of[np.arange(L)[:, None], order] = np.arange(E)[None, :]
    below, warm = lru_band_distances(sids, E_all, rank_of, grid, seq_lens=short.seq_lens)
    access_rank = rank_of[np.arange(L)[None, :, None], sids].astype(np.int32)  # [T', L, K]
    hit = _band_hit_rates(access_rank, below, warm, grid, E)
    predictability = np.zeros(L)
    if L > 1:
        predictability[1:] = next_layer_predictability(ids, E_all, seq_lens=trace.seq_lens).recall
    small = np.int16 if E < np.iinfo(np.int16).max else np.int32
    return PlanningStats(frequency=frequency, importance=importance, pinned_grid=grid, hit=hit,
                         predictability=predictability, order=order, source=trace.source,
                         access_rank=access_rank, access_below=below.astype(small), access_warm=warm,
                         seq_lens=np.asarray(short.seq_lens, np.int64), decode_rows=short.phase == DECODE)


def step_stream(ids: np.ndarray, seq_lens: np.ndarray, batch: int, order: np.ndarray,
                decode: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The steps of ``batch`` sequences served together: ``(steps, rank, counted)``.

    ``ids``: ``[T, L, K]`` the sequences' tokens back to back (``-1``: a zero-computation
    expert); ``decode``: ``[T]`` which rows are decode tokens (``None``: all; a sequence's
    prompt rows come first). Lane ``b`` of ``batch`` takes the next sequence when its own ends
    (continuous batching; ties to the lower lane). At step ``t`` the prompts of the sequences
    starting then run (a row per prompt token, in order: in the cache's stream, not decode
    calls) and then every busy lane's decode token (one row), as the simulator's continuous
    scheduler runs them. ``steps``: ``[R, L, W]`` the distinct experts of each row
    per layer, ascending (as a set, the first is the most recent: lru_band_distances'
    ``token_as_set``), padded with the id ``E`` (a phantom in no band); ``rank``:
    ``[L, E + 1]`` each id's frequency rank (``-1``: the phantom); ``counted``: ``[R]`` the
    decode rows. A batch above the number of sequences runs as that many lanes.
    """
    T, L, K = ids.shape
    E = order.shape[1]
    key = _stream_keys(T, seq_lens, batch, decode)
    keys, row_of = np.unique(key, return_inverse=True)
    R = len(keys)
    present = np.zeros((R, L, E + 1), bool)
    t, l, k = np.nonzero(ids >= 0)
    present[row_of[t], l, ids[t, l, k]] = True
    W = max(int(present.sum(axis=2).max(initial=0)), 1)
    first = np.argsort(~present, axis=2, kind="stable")[..., :W]  # present ids first, ascending
    steps = np.where(np.take_along_axis(present, first, axis=2), first, E)
    rank = np.full((L, E + 1), -1, np.int64)
    rank[np.arange(L)[:, None], order] = np.arange(E)[None, :]
    return steps, rank, keys % (T + 1) == T


def decode_steps(num_tokens: int, seq_lens: np.ndarray, batch: int, decode: np.ndarray | None = None) -> np.ndarray:
    """``[T]`` the decode step each token runs in when ``batch`` sequences are served together
    (the lanes of :func:`step_stream`; ``-1``: a prompt token). A step's decode tokens are one
    per busy lane, so its tokens call each expert they chose once."""
    key = _stream_keys(num_tokens, seq_lens, batch, decode)
    return np.where(key % (num_tokens + 1) == num_tokens, key // (num_tokens + 1), -1)


def _stream_keys(T: int, seq_lens: np.ndarray, batch: int, decode: np.ndarray | None) -> np.ndarray:
    """``[T]`` each row's place in :func:`step_stream`'s stream: ``step (T + 1) + row`` for a
    prompt row, ``step (T + 1) + T`` for a decode row (a step's decode rows share one key)."""
    decode = np.ones(T, bool) if decode is None else np.asarray(decode, bool)
    batch = max(1, min(int(batch), len(seq_lens)))  # more lanes than sequences stay idle
    free = [(0, b) for b in range(batch)]  # (step the lane is free from, lane)
    heapq.heapify(free)
    key = np.empty(T, np.int64)  # stream order: (step, its prompt tokens one by one, then its decode row)
    row = 0
    for n in np.asarray(seq_lens, np.int64).tolist():
        t0, lane = heapq.heappop(free)
        dec = decode[row:row + n]
        key[row:row + n] = np.where(dec, (t0 + np.cumsum(dec) - 1) * (T + 1) + T, t0 * (T + 1) + np.arange(row, row + n))
        heapq.heappush(free, (t0 + max(int(dec.sum()), 1), lane))
        row += n
    return key


def _band_hit_rates(rank: np.ndarray, below: np.ndarray, warm: np.ndarray, grid: np.ndarray, E: int) -> np.ndarray:
    """``[L, P, P, E + 1]`` hit rate of every band of ranks ``[grid[i], grid[j])`` and cache size.

    Args:
        rank: ``[T', L, K]`` frequency rank per access (-1: in no band).
        below, warm: from :func:`profiles.workload.hitrate.lru_band_distances` over ``grid``.
    """
    L, P = rank.shape[1], len(grid)
    hit = np.zeros((L, P, P, E + 1))
    layer = np.broadcast_to(np.arange(L)[None, :, None], rank.shape)
    for i in range(P):
        for j in range(i + 1, P):
            band = (rank >= grid[i]) & (rank < grid[j])  # [T', L, K]
            accesses = band.sum(axis=(0, 2))  # [L]
            counted = band & warm
            dist = np.minimum(below[..., j][counted] - below[..., i][counted], E)  # distance >= E misses always
            counts = np.bincount(layer[counted] * (E + 1) + dist, minlength=L * (E + 1)).reshape(L, E + 1)
            hits = np.zeros((L, E + 1))
            hits[:, 1:] = np.cumsum(counts[:, :E], axis=1)  # hits(c) = warm accesses with distance < c
            hit[:, i, j, :] = np.where(accesses[:, None] > 0, hits / np.maximum(accesses, 1)[:, None], 0.0)
    return hit


def _head(trace: Trace, max_tokens: int) -> Trace:
    """The first whole sequences of ``trace`` holding at most ``max_tokens`` tokens (at least one)."""
    n = int(np.searchsorted(np.cumsum(trace.seq_lens), max_tokens, side="right"))
    return trace.subset_sequences(list(range(max(n, 1))))
