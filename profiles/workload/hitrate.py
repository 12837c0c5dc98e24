"""Expert-cache hit-rate curves ``h_l(c)`` for every cache size ``c = 0..E``, per MoE layer.

Legend: T = tokens, L = MoE layers, K = experts per token (top-k), E = routed experts per
layer, C = E + 1 cache sizes (0..E), P = policies simulated together.

Definitions (the contract the planner and the simulator share):

- An **access** is one (token, layer, expert) reference: ``expert_ids[t, l, k]``. Every
  layer has its own cache of ``c`` expert slots; layers never share slots.
- **Hit rate** ``h_l(c) = hits / accesses`` over the accesses of layer ``l``, cold (first)
  references included as misses. Curves are ``[L, E + 1]`` arrays indexed by ``c``.
- **Order within a token** (``token_as_set``):

  * ``False`` (default, "rank order"): a token's K experts are requested one after another
    in rank order, like a runtime that walks the token's experts and loads each on demand.
    An expert the token has already used in this step is never evicted by the token's
    later misses (with ``c >= K`` it is among the most recent), but a later miss can evict
    an expert the same token asks for further down its list, which then misses too. This
    is plain demand paging over the reference string ``(t0,k0) (t0,k1) ... (t1,k0) ...``,
    and it is the convention of the independent ESFT measurement in the shared traces'
    README: it gives LRU 0.215 / 0.392 / 0.607 / 0.726 at 6 / 12 / 24 / 32 slots on the
    ``summary`` task against the quoted 0.21 / 0.38 / 0.60 / 0.72, while treating the token
    as a set gives 0.291 at 6 slots (exactly the share of experts reused from the previous
    token, which the quoted 0.21 is well below).
  * ``True`` ("as a set"): all K accesses of a token are checked against the cache as it
    stood before the token, so a token's own experts never evict each other; the cache
    then holds the token's experts plus the most recent others. Among the experts of one
    token, a lower rank counts as more recently used (it is kept longer).

- **Sequences**: by default the cache is *not* reset between sequences (requests run
  back to back, as in the independent measurement); ``reset_per_sequence=True`` empties
  it (and the LFU counts, and Belady's look-ahead) at every sequence start.
- **Pinned experts** (``pinned``): a given set per layer that always hits and takes no
  slot. Their accesses are left out of the curves, which then describe what remains:
  ``curve[l, c]`` is the hit rate of the unpinned accesses with ``c`` dynamic slots
  (flat once ``c`` reaches the unpinned experts). :meth:`HitRateCurves.overall` folds the
  pinned hits back in.

Policies, all exact for every ``c`` from one pass (each is a stack algorithm, so the cache
of size ``c`` is the top ``c`` of one priority stack; Mattson et al., 1970):

- ``lru``: least recently used, from LRU stack distances (vectorised, O(T·L·K·E)).
- ``lfu``: least frequently used with demand loading; counts cover the whole past of the
  layer (evicted experts keep their count), ties go to the least recently used.
- ``belady``: the offline optimum (evict the expert whose next use is furthest away). In
  rank order it may evict an expert the current token has already used, since nothing
  requires a token's experts to be resident together; as a set it never does.
- ``static``: the ``c`` most frequent experts of the whole trace, loaded beforehand and
  never replaced (an oracle for the frequency-based placement the planner makes; no cold
  misses, so with few slots it can beat Belady, which must load every miss).

``lfu`` and ``belady`` walk the tokens in Python with numpy over all layers at once, so
they cost about T·K small numpy steps; ``lru`` and ``static`` are fully vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from .trace import Trace

__all__ = [
    "POLICIES",
    "HitRateCurves",
    "hit_rate_curves",
    "lru_stack_distances",
    "lru_band_distances",
    "lru_curve",
    "static_curve",
    "priority_stack_distances",
    "curve_from_distances",
    "pinned_mask",
]

POLICIES: tuple[str, ...] = ("lru", "lfu", "static", "belady")

# A stack distance meaning "cold miss": larger than any cache. Int64 so arrays stay integer.
COLD = np.iinfo(np.int64).max // 4
# Elements compared per vectorised block in the LRU pass (bools / int64 temporaries).
_BLOCK_ELEMS = 4_000_000


@dataclass(frozen=True, eq=False)
class HitRateCurves:
    """Hit-rate curves of one workload, per policy and layer.

    Attributes:
        curves: policy name -> ``[L, E + 1]`` float64, ``curves[p][l, c]`` = hit rate of the
            (unpinned) accesses of layer ``l`` with ``c`` cache slots.
        accesses: ``[L]`` accesses counted in the curves (pinned ones excluded).
        pinned_accesses: ``[L]`` accesses that went to pinned experts (all hits).
        token_as_set: whether a token's K accesses were processed as a set.
        reset_per_sequence: whether the cache was emptied at every sequence start.
    """

    curves: Mapping[str, np.ndarray]
    accesses: np.ndarray
    pinned_accesses: np.ndarray
    token_as_set: bool = False
    reset_per_sequence: bool = False

    @property
    def num_layers(self) -> int:
        return int(self.accesses.shape[0])

    @property
    def num_experts(self) -> int:
        return int(next(iter(self.curves.values())).shape[1] - 1)

    def curve(self, policy: str) -> np.ndarray:
        """``[L, E + 1]`` curve of ``policy``."""
        if policy not in self.curves:
            raise InputError("policy not computed", key="policy", value=policy,
                             expected=", ".join(self.curves), fix="ask hit_rate_curves for it")
        return self.curves[policy]

    def at(self, policy: str, cache_slots: int) -> np.ndarray:
        """``[L]`` hit rate with ``cache_slots`` slots per layer (clipped to ``E``)."""
        return self.curve(policy)[:, min(max(int(cache_slots), 0), self.num_experts)]

    def mean(self, policy: str, cache_slots: int) -> float:
        """Hit rate with ``cache_slots`` slots per layer, averaged over layers."""
        return float(self.at(policy, cache_slots).mean())

    def overall(self, policy: str) -> np.ndarray:
        """``[L, E + 1]`` hit rate over *all* accesses: pinned hits plus the curve's hits."""
        total = self.accesses + self.pinned_accesses
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (self.pinned_accesses[:, None] + self.curve(policy) * self.accesses[:, None]) / total[:, None]
        return np.nan_to_num(out, nan=0.0)


# ----------------------------------------------------------------------------- inputs


def pinned_mask(pinned: np.ndarray | Sequence[Iterable[int]] | None, num_layers: int,
                num_experts: int) -> np.ndarray:
    """Normalise a pinned set to a ``[L, E]`` bool mask.

    Args:
        pinned: ``None``; a ``[L, E]`` bool mask; or one iterable of expert ids per layer
            (``[L, p]`` array or list of lists; layers may pin different numbers).
    """
    mask = np.zeros((num_layers, num_experts), bool)
    if pinned is None:
        return mask
    if isinstance(pinned, np.ndarray) and pinned.dtype == bool:
        if pinned.shape != (num_layers, num_experts):
            raise InputError("pinned mask has the wrong shape", key="pinned", value=pinned.shape,
                             expected=f"({num_layers}, {num_experts})", fix="give one row per MoE layer")
        return pinned.copy()
    rows = list(pinned)
    if len(rows) != num_layers:
        raise InputError("pinned sets must be given per layer", key="pinned", value=len(rows),
                         expected=f"{num_layers} sets (one per MoE layer)", fix="give one list of expert ids per layer")
    for layer, row in enumerate(rows):
        ids = np.asarray(list(row), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
            raise InputError("pinned expert id out of range", key=f"pinned[{layer}]", value=ids.tolist(),
                             expected=f"ids in [0, {num_experts})", fix="check the expert ids")
        mask[layer, ids] = True
    return mask


def _check_ids(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    ids = np.asarray(expert_ids)
    if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError("expert ids must be an integer array [tokens, layers, top_k]", key="expert_ids",
                         value=getattr(ids, "shape", None), expected="[T, L, K] integers", fix="pass trace.expert_ids")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise InputError("expert id out of range", key="expert_ids", value=int(ids.max()),
                         expected=f"ids in [0, {num_experts})", fix="check num_experts")
    return ids.astype(np.intp, copy=False)


def _seq_start_of_token(num_tokens: int, seq_lens: np.ndarray | None, reset: bool) -> np.ndarray:
    """``[T]`` index of the first token of each token's sequence (0 everywhere without reset)."""
    if not reset or seq_lens is None or len(seq_lens) == 0:
        return np.zeros(num_tokens, np.int64)
    seq_lens = np.asarray(seq_lens, np.int64)
    starts = np.concatenate([[0], np.cumsum(seq_lens)[:-1]])
    return np.repeat(starts, seq_lens)


def _valid(ids: np.ndarray, pinned: np.ndarray) -> np.ndarray:
    """``[T, L, K]`` True where the access counts (its expert is not pinned)."""
    L = ids.shape[1]
    return ~pinned[np.arange(L)[None, :, None], ids]


# ----------------------------------------------------------------------------- LRU


def lru_stack_distances(expert_ids: np.ndarray, num_experts: int, *, token_as_set: bool = False,
                        seq_lens: np.ndarray | None = None, reset_per_sequence: bool = False,
                        pinned: np.ndarray | Sequence[Iterable[int]] | None = None) -> np.ndarray:
    """LRU stack distance of every access: it hits a cache of ``c`` slots iff ``d < c``.

    The distance is the number of other (unpinned) experts of the same layer used more
    recently than the accessed one, at the moment of the access (see the module docstring
    for what "the moment" is in each mode). One vectorised pass, blocks of tokens at a time.

    Args:
        expert_ids: ``[T, L, K]`` expert ids.
        num_experts: E.
        token_as_set: process a token's K accesses as a set (module docstring).
        seq_lens: ``[S]`` sequence lengths (only needed with ``reset_per_sequence``).
        reset_per_sequence: empty the cache at every sequence start.
        pinned: experts that always hit and take no slot (see :func:`pinned_mask`).

    Returns:
        ``[T, L, K]`` int64: the distance, ``COLD`` for a first use (a miss at every size),
        ``-1`` for an access to a pinned expert (not counted).
    """
    ids = _check_ids(expert_ids, num_experts)
    T, L, K = ids.shape
    E = num_experts
    valid = _valid(ids, pinned_mask(pinned, L, E))
    start = _seq_start_of_token(T, seq_lens, reset_per_sequence)
    # Recency key of an access: a larger key is more recent. As a set, a lower rank of the
    # same token is the more recent one (kept longer); in rank order the later rank is.
    rank_key = (K - 1 - np.arange(K)) if token_as_set else np.arange(K)
    earlier = np.tril(np.ones((K, K), bool), -1)  # earlier[r, r'] = r' comes before r
    dist = np.full((T, L, K), -1, np.int64)
    last = np.full((L, E), -1, np.int64)  # key of each expert's latest access so far
    block = max(1, _BLOCK_ELEMS // max(1, L * K * E))
    lidx = np.arange(L)[None, :, None]
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        b = t1 - t0
        blk = ids[t0:t1]  # [b, L, K]
        v = valid[t0:t1]
        key = np.arange(t0, t1, dtype=np.int64)[:, None, None] * K + rank_key[None, None, :]  # [b, 1, K]
        occ = np.full((b, L, E), -1, np.int64)  # key of the access to (l, e) in this token, or -1
        bi, li, ki = np.nonzero(v)
        occ[bi, li, blk[bi, li, ki]] = key[bi, 0, ki]
        # 1. the recency of every expert at the start of each token: running max of keys
        run = np.maximum.accumulate(occ, axis=0)
        before = np.empty_like(occ)  # [b, L, E]
        before[0] = last
        np.maximum(run[:-1], last[None], out=before[1:])
        last = np.maximum(last, run[-1])
        # 2. experts more recent than the accessed one's last use
        prev = before[np.arange(b)[:, None, None], lidx, blk]  # [b, L, K] key of its last use
        depth = (before[:, :, None, :] > prev[..., None]).sum(axis=-1)  # [b, L, K]
        if not token_as_set:
            # 3. in rank order, the token's own earlier experts are more recent too, unless
            #    step 2 already counted them (used again since this expert's last use)
            own = (prev[:, :, None, :] <= prev[:, :, :, None]) & earlier & v[:, :, None, :]
            depth += own.sum(axis=-1)
        warm = prev >= (start[t0:t1, None, None] * K)  # used before, in this sequence if reset
        dist[t0:t1] = np.where(v, np.where(warm, depth, COLD), -1)
    return dist


def curve_from_distances(dist: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Turn stack distances into hit-rate curves.

    Args:
        dist: ``[T, L, K]`` distances (``-1`` = not counted, ``COLD`` = always a miss).
        num_experts: E.

    Returns:
        ``([L, E + 1] hit rate, [L] accesses counted)``; a layer with no access has rate 0.
    """
    T, L, K = dist.shape
    E = num_experts
    counted = dist >= 0
    layer = np.broadcast_to(np.arange(L)[None, :, None], dist.shape)
    bucket = np.minimum(dist, E)  # distance >= E misses at every size
    counts = np.bincount((layer * (E + 1) + bucket)[counted], minlength=L * (E + 1)).reshape(L, E + 1)
    hits = np.zeros((L, E + 1), np.int64)
    hits[:, 1:] = np.cumsum(counts[:, :E], axis=1)  # hits(c) = accesses with distance < c
    accesses = counted.sum(axis=(0, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(accesses[:, None] > 0, hits / np.maximum(accesses, 1)[:, None], 0.0)
    return rate, accesses


def lru_curve(expert_ids: np.ndarray, num_experts: int, **kwargs) -> np.ndarray:
    """``[L, E + 1]`` exact LRU hit rate for every cache size; keywords as :func:`lru_stack_distances`."""
    return curve_from_distances(lru_stack_distances(expert_ids, num_experts, **kwargs), num_experts)[0]


def lru_band_distances(expert_ids: np.ndarray, num_experts: int, rank: np.ndarray, edges: Sequence[int], *,
                       token_as_set: bool = False, seq_lens: np.ndarray | None = None,
                       reset_per_sequence: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """LRU stack distances of caches that serve only a band of experts, for every band at once.

    A cache that serves only the experts of a set S (the others are pinned elsewhere or run
    elsewhere and never enter it) sees the reference string with the other experts left
    out. Leaving accesses out does not change the order in which the experts of S were last
    used, so the stack distance of an access to ``e`` in S is the number of experts *of S*
    used more recently than ``e``: a count over S of the recency order of one unfiltered
    pass. With S a band of ranks ``[edges[i], edges[j])``, prefix counts give every band:

        dist_ij = below[..., j] - below[..., i]      (for an access whose rank is in the band)

    and the access hits a ``c``-slot cache of that band iff it is warm and ``dist_ij < c``.
    This equals :func:`lru_stack_distances` with every expert outside the band pinned.

    Args:
        expert_ids: ``[T, L, K]`` expert ids.
        num_experts: E (ids are below it).
        rank: ``[L, E]`` the rank of each expert per layer (the planner: by descending
            frequency); experts ranked at or above ``edges[-1]`` (or below 0) are in no band.
        edges: ``[G]`` strictly increasing ranks, ``0 <= edges[0]``.
        token_as_set, seq_lens, reset_per_sequence: as :func:`lru_stack_distances`.

    Returns:
        ``below``: ``[T, L, K, G]`` int32, how many experts of rank ``< edges[g]`` were used
        more recently than the accessed one (its own rank included in no count);
        ``warm``: ``[T, L, K]`` bool, the expert was used before (in this sequence with
        reset): a cold access misses at every size.
    """
    ids = _check_ids(expert_ids, num_experts)
    T, L, K = ids.shape
    E = num_experts
    edges = np.asarray(edges, np.int64)
    rank = np.asarray(rank, np.int64)
    if rank.shape != (L, E):
        raise InputError("rank must give every expert of every layer", key="rank", value=rank.shape,
                         expected=f"({L}, {E})", fix="pass one rank per (layer, expert)")
    if edges.ndim != 1 or not len(edges) or edges[0] < 0 or (np.diff(edges) <= 0).any() or edges[-1] > E:
        raise InputError("band edges must be strictly increasing ranks", key="edges", value=edges.tolist(),
                         expected=f"0 <= e0 < e1 < ... <= {E}", fix="sort the edges and drop duplicates")
    G, R = len(edges), int(edges[-1])
    in_bands = (rank >= 0) & (rank < R)
    by_rank = np.argsort(np.where(in_bands, rank, R), axis=1, kind="stable")[:, :R]  # [L, R] expert at each rank
    start = _seq_start_of_token(T, seq_lens, reset_per_sequence)
    rank_key = (K - 1 - np.arange(K)) if token_as_set else np.arange(K)  # recency order as lru_stack_distances
    earlier = np.tril(np.ones((K, K), bool), -1)
    below = np.zeros((T, L, K, G), np.int32)
    warm_out = np.zeros((T, L, K), bool)
    last = np.full((L, E), -1, np.int64)
    block = max(1, _BLOCK_ELEMS // max(1, L * K * max(E, 1)))
    lidx = np.arange(L)[None, :, None]
    access_rank = np.where(in_bands, rank, -1)[lidx, ids]  # [T, L, K] -1: in no band
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        b = t1 - t0
        blk = ids[t0:t1]
        key = np.arange(t0, t1, dtype=np.int64)[:, None, None] * K + rank_key[None, None, :]
        occ = np.full((b, L, E), -1, np.int64)
        occ[np.arange(b)[:, None, None], lidx, blk] = np.broadcast_to(key, blk.shape)
        # 1. recency of every expert at the start of each token (as lru_stack_distances)
        run = np.maximum.accumulate(occ, axis=0)
        before = np.empty_like(occ)
        before[0] = last
        np.maximum(run[:-1], last[None], out=before[1:])
        last = np.maximum(last, run[-1])
        prev = before[np.arange(b)[:, None, None], lidx, blk]  # [b, L, K]
        # 2. experts more recent than the accessed one, counted per band of ranks
        newer = before[:, np.arange(L)[:, None], by_rank][:, :, None, :] > prev[..., None]  # [b, L, K, R]
        head = newer[..., :edges[0]].sum(axis=-1, dtype=np.int32)  # ranks below edges[0]
        below[t0:t1, ..., 0] = head
        if G > 1:
            bands = np.add.reduceat(newer, edges[:-1], axis=-1, dtype=np.int32)  # [b, L, K, G-1]
            below[t0:t1, ..., 1:] = head[..., None] + np.cumsum(bands, axis=-1)
        if not token_as_set:
            # 3. in rank order the token's own earlier experts are more recent too, unless
            #    step 2 counted them already
            own = (prev[:, :, None, :] <= prev[:, :, :, None]) & earlier  # [b, L, K, K']
            r_own = access_rank[t0:t1]  # [b, L, K']
            counted = (r_own[..., None] >= 0) & (r_own[..., None] < edges)  # [b, L, K', G]
            below[t0:t1] += (own[..., None] & counted[:, :, None]).sum(axis=-2, dtype=np.int32)
        warm_out[t0:t1] = prev >= (start[t0:t1, None, None] * K)
    return below, warm_out


# ----------------------------------------------------------------------------- static


def static_curve(frequency: np.ndarray, pinned: np.ndarray | None = None) -> np.ndarray:
    """``[L, E + 1]`` hit rate of a fixed cache holding the ``c`` most frequent experts.

    Args:
        frequency: ``[L, E]`` access counts (or shares) per expert.
        pinned: ``[L, E]`` bool mask of pinned experts, left out of both the ranking and
            the accesses.
    """
    f = np.asarray(frequency, np.float64)
    if pinned is not None:
        f = np.where(pinned, 0.0, f)
    L, E = f.shape
    top = -np.sort(-f, axis=1)  # descending per layer
    hits = np.zeros((L, E + 1))
    hits[:, 1:] = np.cumsum(top, axis=1)
    total = f.sum(axis=1, keepdims=True)
    return np.where(total > 0, hits / np.where(total > 0, total, 1.0), 0.0)


# ----------------------------------------------------------------------------- LFU, Belady


def _reuse(ids: np.ndarray, valid: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per access: the position key ``t'*K + k'`` of the next access to the same (layer,
    expert), ``-1`` if none; and how many accesses to it came before (0 = first use).
    Both stay within one sequence when ``start`` marks resets. Shapes ``[T, L, K]``."""
    T, L, K = ids.shape
    t_idx, l_idx, k_idx = np.nonzero(valid)  # in (t, l, k) order
    e = ids[t_idx, l_idx, k_idx]
    pos = t_idx.astype(np.int64) * K + k_idx
    group = (l_idx.astype(np.int64) * (ids.max(initial=0) + 1) + e) * (T + 1) + start[t_idx]
    order = np.lexsort((pos, group))  # by group, then time
    g = group[order]
    same = g[1:] == g[:-1]
    nxt = np.full(pos.shape, -1, np.int64)
    nxt[order[:-1][same]] = pos[order][1:][same]
    first = np.concatenate([[True], ~same])
    idx = np.arange(g.size)
    run_start = np.maximum.accumulate(np.where(first, idx, 0))
    before = np.empty(g.size, np.int64)
    before[order] = idx - run_start
    out_next = np.full((T, L, K), -1, np.int64)
    out_next[t_idx, l_idx, k_idx] = nxt
    out_before = np.zeros((T, L, K), np.int64)
    out_before[t_idx, l_idx, k_idx] = before
    return out_next, out_before


def priority_stack_distances(expert_ids: np.ndarray, num_experts: int, policies: Sequence[str] = ("lfu", "belady"),
                             *, token_as_set: bool = False, seq_lens: np.ndarray | None = None,
                             reset_per_sequence: bool = False,
                             pinned: np.ndarray | Sequence[Iterable[int]] | None = None) -> dict[str, np.ndarray]:
    """Stack distances of priority-based policies (``lfu``, ``belady``), all sizes in one pass.

    Mattson's stack update: the accessed expert goes to the top; walking down to its old
    depth, of the expert carried so far and the one found there, the one the policy would
    evict first is carried on, so the top ``c`` entries are always exactly what a ``c``-slot
    cache under that policy holds. The carried expert after depth ``i`` is the one with the
    largest eviction key among depths ``0..i``: a prefix maximum, which numpy computes for
    every (policy, layer) row at once. Python loops over the T·K accesses only.

    Eviction keys (larger = evicted first, all distinct within a layer):
    ``belady``: position of the next use (``t*K + k``), never used again = beyond the end;
    ``lfu``: the rank of (uses so far, last use), fewer uses and then older ranking higher.

    Args and return: as :func:`lru_stack_distances`, one ``[T, L, K]`` array per policy.
    """
    ids = _check_ids(expert_ids, num_experts)
    T, L, K = ids.shape
    E = num_experts
    for p in policies:
        if p not in ("lfu", "belady"):
            raise InputError("not a priority policy", key="policies", value=p, expected="lfu or belady",
                             fix="use lru_stack_distances for LRU and static_curve for static")
    P = len(policies)
    B = P * L  # one stack per (policy, layer) row: row = policy * L + layer
    valid = _valid(ids, pinned_mask(pinned, L, E))
    start = _seq_start_of_token(T, seq_lens, reset_per_sequence)
    horizon = np.int64(T * K + 1)  # beyond every position key
    nxt, used_before = _reuse(ids, valid, start)
    nxt = np.where(nxt >= 0, nxt, horizon + ids)  # never used again: evicted first, distinct by id
    rank_key = (K - 1 - np.arange(K)) if token_as_set else np.arange(K)  # recency order as LRU
    position = np.arange(T, dtype=np.int64)[:, None, None] * K + rank_key[None, None, :]
    # LFU: fewer uses, then older, is evicted first. Only the order within a layer matters,
    # so the (uses, position) pairs are replaced by their rank: small keys, no overflow.
    lfu = np.empty((T, L, K), np.int64)
    order = np.lexsort((-np.broadcast_to(position, (T, L, K)).ravel(), -used_before.ravel()))
    lfu.ravel()[order] = np.arange(order.size)
    layer_of = np.tile(np.arange(L), P)  # [B]
    row_base = np.arange(B, dtype=np.int64) * E  # flat index of (row, expert 0)
    # Keys carry the flat index of their expert in the low bits, so the running maximum of
    # keys also names the expert being carried down (one bitwise and, no gather).
    shift = int(B * E + 1).bit_length()
    low = np.int64((1 << shift) - 1)
    if (int(horizon) + E + T * L * K).bit_length() + shift > 62:
        raise InputError("trace too long for one LFU/Belady pass", key="expert_ids", value=(T, L, K),
                         expected=f"fewer than 2**{62 - shift} accesses", fix="split the trace into parts")
    # Everything that does not depend on the stacks, precomputed as [T, K, B]:
    x_all = ids[:, layer_of, :].transpose(0, 2, 1)  # expert accessed
    act_all = valid[:, layer_of, :].transpose(0, 2, 1)  # counted (not pinned)
    xf_all = row_base[None, None, :] + x_all  # its flat index (row, expert)
    sink = B * E  # a spare key slot that absorbs the writes of inactive rows
    xf_write = np.where(act_all, xf_all, sink)
    first_all = (used_before == 0)[:, layer_of, :].transpose(0, 2, 1) & act_all
    final_key = (np.concatenate([(nxt if p == "belady" else lfu) for p in policies], axis=1)
                 .transpose(0, 2, 1) << shift) | xf_all
    depth_of_slot = np.tile(np.arange(E, dtype=np.int64), (B, 1))  # [B, E]
    top_key = np.iinfo(np.int64).max
    # While a token is served as a set, its experts get keys below every real key (those
    # are >= 0), so the walk never carries them down past the token's other experts.
    in_step = np.int64(-(K + 1))
    out = np.full((T, K, B), -1, np.int64)

    # State, flat over (row, expert) so that gathers are np.take on one index array:
    #   stack[row, i] = flat index (row*E + expert) at depth i;  depth[flat] = its depth;
    #   key[flat] = eviction key << shift | flat.
    stack = depth = key = n_seen = None

    def reset() -> None:
        nonlocal stack, depth, key, n_seen
        stack = row_base[:, None] + depth_of_slot
        depth = depth_of_slot.ravel().copy()
        key = np.arange(B * E + 1, dtype=np.int64)  # never-used experts; the last is the sink
        n_seen = np.zeros(B, np.int64)

    def touch(t: int, k: int) -> np.ndarray:
        """Move the expert of access (t, k) to the top of its stacks; return its old depth [B]."""
        act, xf = act_all[t, k], xf_all[t, k]
        cold = first_all[t, k]
        if cold.any():
            # a first use: swap it with the top of the never-used region first, so that its
            # depth is the number of experts seen so far (that region is unordered)
            rc = np.nonzero(cold)[0]
            xc, j = xf[rc], n_seen[rc]
            cur, y = depth[xc], stack[rc, j]
            stack[rc, j], stack[rc, cur] = xc, y
            depth[xc], depth[y] = j, cur
            n_seen[rc] += 1
        xf = np.where(act, xf, stack[:, 0])  # inactive rows: their own top, a no-op
        d = depth[xf]
        # 1. x's own key is the maximum for the walk: the carried expert then drops into
        #    x's old slot, and nothing below that moves
        saved = key[xf]
        key[xf] = top_key
        keys = np.take(key, stack)  # [B, E] by depth
        key[xf] = saved
        # 2. carried expert after depth i = the max key over depths 0..i; it drops at depth
        #    i+1 when the expert there has a larger key (which is then carried on instead)
        cm = np.maximum.accumulate(keys, axis=1)
        drop = keys[:, 1:] > cm[:, :-1]
        stack[:, 1:] = np.where(drop, cm[:, :-1] & low, stack[:, 1:])
        stack[:, 0] = xf
        np.put(depth, stack, depth_of_slot)
        return np.where(cold, COLD, np.where(act, d, -1))

    for t in range(T):
        if t == 0 or (reset_per_sequence and start[t] == t):
            reset()
        if token_as_set:
            # every access of the token is judged against the stacks before the token
            xf_t = xf_all[t]  # [K, B]
            out[t] = np.where(act_all[t], np.where(first_all[t], COLD, depth[xf_t]), -1)
            for k in range(K):
                touch(t, k)
                key[xf_write[t, k]] = ((in_step + k) << shift) | xf_all[t, k]
            for k in range(K):
                key[xf_write[t, k]] = final_key[t, k]
        else:
            for k in range(K):
                out[t, k] = touch(t, k)
                key[xf_write[t, k]] = final_key[t, k]
    out = out.transpose(0, 2, 1).reshape(T, P, L, K)
    return {p: np.ascontiguousarray(out[:, i]) for i, p in enumerate(policies)}


# ----------------------------------------------------------------------------- all together


def hit_rate_curves(trace: Trace | np.ndarray, policies: Sequence[str] = POLICIES, *, num_experts: int | None = None,
                    seq_lens: np.ndarray | None = None, token_as_set: bool = False, reset_per_sequence: bool = False,
                    pinned: np.ndarray | Sequence[Iterable[int]] | None = None) -> HitRateCurves:
    """Hit-rate curves of several policies for every layer and cache size.

    Args:
        trace: a :class:`Trace`, or a ``[T, L, K]`` expert-id array (then give
            ``num_experts``, and ``seq_lens`` for ``reset_per_sequence``).
        policies: any of ``lru``, ``lfu``, ``static``, ``belady``.
        token_as_set, reset_per_sequence, pinned: see the module docstring.

    Returns:
        :class:`HitRateCurves` with one ``[L, E + 1]`` curve per policy.
    """
    if isinstance(trace, Trace):
        ids, E, seq_lens = trace.expert_ids, trace.num_experts, trace.seq_lens
    else:
        if num_experts is None:
            raise InputError("num_experts is required with a bare id array", key="num_experts",
                             fix="pass num_experts=E or a Trace")
        ids, E = np.asarray(trace), int(num_experts)
    ids = _check_ids(ids, E)
    T, L, K = ids.shape
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise InputError("unknown cache policy", key="policies", value=unknown[0], expected=", ".join(POLICIES),
                         fix="pick from the listed policies")
    mask = pinned_mask(pinned, L, E)
    valid = _valid(ids, mask)
    pinned_accesses = (~valid).sum(axis=(0, 2))
    accesses = valid.sum(axis=(0, 2))
    opts = dict(token_as_set=token_as_set, seq_lens=seq_lens, reset_per_sequence=reset_per_sequence, pinned=mask)
    curves: dict[str, np.ndarray] = {}
    if "lru" in policies:
        curves["lru"] = curve_from_distances(lru_stack_distances(ids, E, **opts), E)[0]
    if "static" in policies:
        layer = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)
        freq = np.bincount((layer * E + ids).ravel(), minlength=L * E).reshape(L, E)
        curves["static"] = static_curve(freq, mask)
    prio = [p for p in ("lfu", "belady") if p in policies]
    if prio:
        for p, dist in priority_stack_distances(ids, E, prio, **opts).items():
            curves[p] = curve_from_distances(dist, E)[0]
    ordered = {p: curves[p] for p in policies}
    return HitRateCurves(curves=ordered, accesses=accesses, pinned_accesses=pinned_accesses,
                         token_as_set=token_as_set, reset_per_sequence=reset_per_sequence)
